"""`minitron distill` end to end on the embedded corpus: a randomly width-pruned `tiny` teacher wins
back its loss, KD beats LM-loss-only retraining at equal tokens (the Minitron paper's Table 15
direction), and every bad input is refused before training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megatron_minitron.cli import main
from tests.conftest import REPO, child_env

RUN = ["--train-iters", "25", "--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", "8",
       "--lr", "2e-3", "--lr-warmup-iters", "2", "--eval-interval", "25", "--eval-iters", "4", "--log-interval", "25"]


def _minitron(*argv, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_minitron", *map(str, argv)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pruned(tiny_teacher, tmp_path_factory):
    """hidden 64 -> 32 and ffn 192 -> 96 with a random ranking: a student that lost a lot."""
    from megatron_minitron.model.checkpoint import resolve
    from megatron_minitron.plan import Target, random_plan
    from megatron_minitron.prune.rewrite import prune_checkpoint

    out = tmp_path_factory.mktemp("pruned") / "student"
    plan = random_plan(resolve(tiny_teacher).arch.explicit(), Target(hidden_size=32, ffn_hidden_size=96), seed=1)
    prune_checkpoint(tiny_teacher, plan, out, print_fn=lambda _: None)
    return out


@pytest.fixture(scope="module")
def runs(tiny_teacher, pruned, data_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrain")
    kd = _minitron("distill", "--teacher", tiny_teacher, "--student", pruned, "--save", root / "kd",
                   "--cache-dir", data_cache, *RUN)
    assert kd.returncode == 0, kd.stdout[-3000:] + kd.stderr[-3000:]
    lm = _minitron("pretrain", "--init", pruned, "--save", root / "lm", "--cache-dir", data_cache, *RUN)
    assert lm.returncode == 0, lm.stdout[-3000:] + lm.stderr[-3000:]
    return root


def _valid(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "valid"]


def test_distillation_wins_back_the_pruned_loss(runs):
    before, after = _valid(runs / "kd")[0], _valid(runs / "kd")[-1]
    assert before["iteration"] == 0 and after["iteration"] == 25
    assert after["val lm loss"] < before["val lm loss"] - 0.5, (before, after)
    assert after["val kd loss"] < before["val kd loss"] / 3
    final = json.loads((runs / "kd" / "final_validation.json").read_text())
    assert final["student lm loss"] == pytest.approx(after["val lm loss"], rel=1e-6)
    assert final["teacher lm loss"] < final["student lm loss"]


def test_kd_beats_lm_loss_only_retraining_at_equal_tokens(runs):
    kd, lm = _valid(runs / "kd")[-1], _valid(runs / "lm")[-1]
    train_kd = [r for r in map(json.loads, (runs / "kd" / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]
    train_lm = [r for r in map(json.loads, (runs / "lm" / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]
    assert train_kd[-1]["consumed_samples"] == train_lm[-1]["consumed_samples"] == 200
    assert kd["val lm loss"] < lm["val lm loss"], f"KD {kd['val lm loss']:.4f} vs LM-only {lm['val lm loss']:.4f}"


def test_the_student_checkpoint_describes_itself(runs, pruned):
    from megatron_minitron.model.checkpoint import resolve

    info = resolve(runs / "kd")
    assert info.arch == resolve(pruned).arch and info.iteration == 25
    assert info.metadata["provenance"]["command"] == "distill"
    assert info.metadata["provenance"]["plan"]["hidden"] == resolve(pruned).metadata["plan"]["hidden"]


@pytest.fixture(scope="module")
def random_teachers(tiny_teacher, single_rank_runtime, tmp_path_factory):
    """A randomly initialised and an all-zero model of the teacher's architecture and tokenizer."""
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.checkpoint import resolve, save_checkpoint

    info = resolve(tiny_teacher)
    out = {}
    for name in ("random", "zero"):
        model = build_model(info.arch, single_rank_runtime)
        if name == "zero":
            with torch.no_grad():
                for param in model.parameters():
                    param.zero_()
        out[name] = tmp_path_factory.mktemp(name) / "teacher"
        save_checkpoint(out[name], model=model, arch=info.arch, runtime=single_rank_runtime, iteration=None,
                        tokenizer=info.tokenizer)
    return out


@pytest.mark.parametrize("kind", ["random", "zero"])
def test_an_untrained_teacher_is_refused_before_step_one(kind, random_teachers, pruned, data_cache, tmp_path):
    proc = _minitron("distill", "--teacher", random_teachers[kind], "--student", pruned, "--save", tmp_path / "r",
                     "--cache-dir", data_cache, *RUN)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the teacher looks untrained: its validation loss" in proc.stderr and "--skip-teacher-check" in proc.stderr
    assert not list((tmp_path / "r").glob("iter_*"))


def _fails(argv, capsys) -> str:
    assert main(["distill", *map(str, argv)]) == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_before_training(tiny_teacher, pruned, single_rank_runtime, tmp_path, capsys):
    from megatron_minitron.config import preset
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.checkpoint import save_checkpoint

    base = ["--teacher", tiny_teacher, "--student", pruned, "--save", tmp_path / "r"]
    assert "did you swap --teacher and --student" in _fails(
        ["--teacher", pruned, "--student", tiny_teacher, "--save", tmp_path / "r"], capsys)
    assert "--seq-length 512 exceeds the teacher's max_position_embeddings=256" in _fails(
        [*base, "--seq-length", "512"], capsys)
    assert "teacher layer 0 is on pipeline stage 0" in _fails([*base, "--pp", "2", "--intermediate-layers", "0:3"],
                                                              capsys)
    assert "the teacher has layers 0..3" in _fails([*base, "--intermediate-layers", "9:1"], capsys)
    assert "expected TEACHER:STUDENT" in _fails([*base, "--intermediate-layers", "3-1"], capsys)
    assert "is inside --teacher" in _fails([*base[:4], "--save", tiny_teacher / "sub"], capsys)
    other_vocab = tmp_path / "other-vocab"
    save_checkpoint(other_vocab, model=build_model(preset("tiny"), single_rank_runtime), arch=preset("tiny"),
                    runtime=single_rank_runtime, iteration=None)
    err = _fails(["--teacher", tiny_teacher, "--student", other_vocab, "--save", tmp_path / "r"], capsys)
    assert "teacher and student vocabularies differ: teacher vocab_size=8192" in err and "vocab_size=1000" in err
    assert not (tmp_path / "r").exists()
