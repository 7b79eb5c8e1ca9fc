"""`minitron importance` end to end (TP2 under torchrun, the embedded corpus) and its input errors,
each caught before any forward pass."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_minitron.cli import main
from tests.conftest import REPO, child_env, torchrun

ARGS = ["--num-samples", "12", "--seq-length", "64", "--micro-batch-size", "4"]


@pytest.fixture(scope="module")
def scores_dir(tiny_teacher, data_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "tp2"
    output = torchrun("-m", "megatron_minitron", "importance", "--load", tiny_teacher, "--out", out, "--tp", "2",
                      "--cache-dir", data_cache, "--lm-loss-blocks", "2", *ARGS, nproc=2, timeout=600)
    return out, output


def test_scores_directory_describes_itself(scores_dir, tiny_teacher):
    from megatron_minitron.importance.scores import load_scores
    from megatron_minitron.model.checkpoint import resolve

    out, output = scores_dir
    scores = load_scores(out)
    arch = resolve(tiny_teacher).arch
    scores.check_belongs_to(arch)
    m = scores.manifest
    assert (m.num_samples, m.seq_length, m.layout["tp"], m.layout["dp"]) == (12, 64, 2, 1)
    assert m.data["embedded"] and m.data["tokenizer"]["kind"] == "sentencepiece"
    assert m.block_sizes == (2,) and scores["blocks_lm_loss"].shape == (1, 4)
    assert scores["heads"].shape == (4, 4) and scores["hidden"].shape == (64,)
    assert m.megatron_core == "0.16.1" and m.layer_spec == "local"
    # a trained model's calibration loss is far below uniform (ln 8192 = 9.0)
    assert m.data["lm_loss"] < 8.5
    assert "importance: 12/12 samples" in output and "block importance: most important layers" in output
    # the hooks' cost is reported, a positive share of the forward passes' own CPU time
    hooks, forward, share = re.search(r"importance hooks: ([\d.]+) s .* against ([\d.]+) s .* \(([\d.]+)%\)",
                                      output).groups()
    assert 0 < float(share) < 100 and float(hooks) <= float(forward)


def test_existing_scores_are_not_overwritten(scores_dir, tiny_teacher, capsys):
    out, _ = scores_dir
    before = (out / "scores.safetensors").read_bytes()
    assert main(["importance", "--load", str(tiny_teacher), "--out", str(out), *ARGS]) == 2
    assert "already holds scores; choose a new directory or pass --overwrite" in capsys.readouterr().err
    assert (out / "scores.safetensors").read_bytes() == before


def _fails(argv, capsys) -> str:
    assert main(["importance", *argv]) == 2
    return capsys.readouterr().err


def test_bad_input_fails_before_any_forward_pass(tiny_teacher, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["--load", str(tiny_teacher), "--out", out]
    assert "--seq-length 512 exceeds the model's max_position_embeddings=256" in _fails(
        [*base, "--seq-length", "512"], capsys)
    (tmp_path / "empty.txt").write_text("")
    assert "--data-file" in _fails([*base, "--data-file", str(tmp_path / "empty.txt")], capsys)
    assert f"--data-file {tmp_path / 'nope.jsonl'} does not exist" in _fails(
        [*base, "--data-file", str(tmp_path / "nope.jsonl")], capsys)
    assert "does not exist" in _fails([*base, "--data-path", str(tmp_path / "missing")], capsys)
    assert "--lm-loss-blocks 4: a block must hold 1..3 layers" in _fails([*base, "--lm-loss-blocks", "4"], capsys)
    assert "is inside the checkpoint" in _fails(["--load", str(tiny_teacher), "--out", str(tiny_teacher / "s")],
                                                capsys)
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_the_model_is_refused(tiny_teacher, tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(9000)} | {"</s>": 9000, "[UNK]": 9001}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    err = _fails(["--load", str(tiny_teacher), "--out", str(tmp_path / "o"), "--tokenizer",
                  str(tmp_path / "tokenizer.json")], capsys)
    assert "9002" in err and "8192" in err


def test_checkpoint_without_an_architecture_is_refused(tiny_teacher, tmp_path, capsys):
    from megatron_minitron.model.checkpoint import resolve

    bare = tmp_path / "bare"
    shutil.copytree(resolve(tiny_teacher).path, bare)
    (bare / "minitron.json").unlink()
    torch.save({"iteration": 20}, bare / "common.pt")  # no Megatron-LM args either
    err = _fails(["--load", str(bare), "--out", str(tmp_path / "o")], capsys)
    assert "has neither minitron.json nor Megatron-LM 'args'" in err and "architecture is unknown" in err


def test_fewer_samples_than_requested_is_an_error_not_a_repeat(tiny_teacher, data_cache, tmp_path):
    """Checked once the dataset index exists (after the processes start), still before any forward pass."""
    (tmp_path / "small.jsonl").write_text("\n".join(json.dumps({"text": f"document {i} " * 40}) for i in range(20)))
    cmd = [sys.executable, "-m", "megatron_minitron", "importance", "--load", str(tiny_teacher), "--out",
           str(tmp_path / "o"), "--cache-dir", str(data_cache), "--data-file", str(tmp_path / "small.jsonl"),
           "--num-samples", "5000", "--seq-length", "64"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "distinct samples of 64 tokens, fewer than --num-samples 5000" in proc.stderr
    assert "--cap-samples" in proc.stderr and not (tmp_path / "o").exists()
