"""`minitron pretrain` end to end on the embedded corpus (TP2 under torchrun), and its input errors."""

from __future__ import annotations

import json
import math

import pytest

from megatron_minitron.cli import main
from tests.conftest import torchrun


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_cache):
    save = tmp_path_factory.mktemp("pretrain") / "run"
    torchrun("-m", "megatron_minitron", "pretrain", "--arch", "tiny", "--tp", "2", "--save", save,
             "--cache-dir", data_cache, "--train-iters", "60", "--seq-length", "64", "--micro-batch-size", "4",
             "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "5", "--eval-interval", "10",
             "--eval-iters", "2", "--log-interval", "10", nproc=2, timeout=900)
    return save


def _records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_loss_falls_on_the_embedded_corpus(run_dir):
    valid = _records(run_dir, "valid")
    assert [r["iteration"] for r in valid] == [10, 20, 30, 40, 50, 60]
    first, last = valid[0]["val lm loss"], valid[-1]["val lm loss"]
    assert first < math.log(8192) + 0.5  # starts near uniform
    assert last < first - 0.8, f"validation loss fell only from {first:.3f} to {last:.3f}"
    train = _records(run_dir, "train")
    assert len(train) == 60 and all(r["tokens_per_s"] > 0 for r in train)


def test_checkpoint_carries_architecture_and_tokenizer(run_dir):
    from megatron_minitron.model.checkpoint import resolve

    info = resolve(run_dir)
    assert info.iteration == 60 and info.arch.vocab_size == 8192 and info.arch.num_layers == 4
    assert info.tokenizer["kind"] == "sentencepiece"
    assert (run_dir / "tokenizer").is_dir() and info.tokenizer["path"].startswith(str(run_dir.resolve()))


def test_existing_run_needs_resume_or_overwrite(run_dir, capsys):
    assert main(["pretrain", "--arch", "tiny", "--save", str(run_dir)]) == 2
    assert "already holds a run; pass --resume to continue it or --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--seq-length", "512"], "--seq-length 512 exceeds the model's max_position_embeddings=256"),
    (["--tp", "3"], "tensor-parallel size 3 does not divide num_attention_heads=4"),
    (["--pp", "3"], "pipeline-parallel size 3 does not divide num_layers=4"),
    (["--global-batch-size", "6"], "global_batch_size=6 is not a multiple of micro_batch_size=4"),
    (["--arch", "nope"], "--arch 'nope' is neither a preset"),
    (["--init", "/no/such/ckpt"], "checkpoint directory /no/such/ckpt does not exist"),
    (["--resume"], "holds no run to continue"),
])
def test_bad_input_fails_fast_with_a_clear_error(tmp_path, capsys, argv, message):
    assert main(["pretrain", "--arch", "tiny", "--save", str(tmp_path / "new"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_non_run_directory_is_never_overwritten(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["pretrain", "--arch", "tiny", "--save", str(tmp_path), "--overwrite"]) == 2
    assert "is not a megatron-minitron run directory" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_tokenizer_larger_than_model_is_refused(run_dir, tmp_path, capsys):
    """--init fixes the vocabulary: a tokenizer with more ids than the model has rows is an error."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(9000)} | {"</s>": 9000, "[UNK]": 9001}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    argv = ["pretrain", "--init", str(run_dir), "--tokenizer", str(tmp_path / "tokenizer.json"),
            "--save", str(tmp_path / "x"), "--seq-length", "64"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "9002" in err and "8192" in err
