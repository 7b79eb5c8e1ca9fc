"""`minitron distill` with Mixture-of-Experts models on the embedded corpus: a randomly initialised MoE
student (narrower experts) distilled from a briefly trained `tiny-moe` teacher at EP2 under torchrun wins
back validation loss within 30 steps and logs its router aux loss beside the KD loss; and bad MoE input
is refused before any process starts."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from megatron_minitron.cli import main
from tests.conftest import REPO, child_env, torchrun

RUN = ["--train-iters", "30", "--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", "8",
       "--lr", "3e-3", "--lr-warmup-iters", "2", "--eval-interval", "30", "--eval-iters", "4", "--log-interval", "10"]


@pytest.fixture(scope="module")
def moe_teacher(tmp_path_factory, data_cache):
    save = tmp_path_factory.mktemp("moe-teacher") / "run"
    cmd = [sys.executable, "-m", "megatron_minitron", "pretrain", "--arch", "tiny-moe", "--save", str(save),
           "--cache-dir", str(data_cache), "--train-iters", "100", "--seq-length", "64", "--micro-batch-size", "4",
           "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "5", "--eval-interval", "100",
           "--eval-iters", "2", "--log-interval", "50"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return save


def _random_checkpoint(teacher, out, single_rank_runtime, **changes):
    """A randomly initialised model of the teacher's architecture with `changes`, and its tokenizer."""
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.checkpoint import resolve, save_checkpoint

    info = resolve(teacher)
    arch = info.arch.replace(**changes)
    save_checkpoint(out, model=build_model(arch, single_rank_runtime), arch=arch, runtime=single_rank_runtime,
                    iteration=None, tokenizer=info.tokenizer)
    return out


@pytest.fixture(scope="module")
def moe_student(moe_teacher, single_rank_runtime, tmp_path_factory):
    return _random_checkpoint(moe_teacher, tmp_path_factory.mktemp("moe-student") / "s", single_rank_runtime,
                              moe_ffn_hidden_size=32)


@pytest.fixture(scope="module")
def run(moe_teacher, moe_student, data_cache, tmp_path_factory):
    save = tmp_path_factory.mktemp("distill-moe") / "kd"
    output = torchrun("-m", "megatron_minitron", "distill", "--teacher", moe_teacher, "--student", moe_student,
                      "--save", save, "--ep", "2", "--cache-dir", data_cache, "--moe-aux-loss-coeff", "0.02", *RUN,
                      nproc=2, timeout=900)
    return save, output


def test_moe_student_wins_back_validation_loss_at_ep2(run):
    save, output = run
    assert "EP=2 DP=2" in output and "teacher: mixture of experts, 4 experts, top-2" in output
    assert "router aux-loss coefficient 0.02 (added to the KD loss)" in output and "frozen, in eval mode" in output
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["kind"] == "valid"]
    assert [r["iteration"] for r in valid] == [0, 30]
    assert valid[-1]["val lm loss"] < valid[0]["val lm loss"] - 0.5, valid
    assert valid[-1]["val kd loss"] < valid[0]["val kd loss"] / 2
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 30
    for r in train:  # beside the KD loss: coefficient x the sum over the 4 MoE layers, and each expert's load
        assert r["moe aux loss"] == pytest.approx(0.02 * 4 * r["moe load-balancing loss"], rel=1e-9)
        assert r["loss"] == pytest.approx(r["kd loss"], rel=1e-9)
        assert sorted(r["moe expert load"]) == ["0", "1", "2", "3"]
        assert all(sum(load) == pytest.approx(1.0, abs=1e-5) for load in r["moe expert load"].values())
        assert "moe starved experts" in r


def test_the_distilled_student_is_a_moe_checkpoint_saved_at_ep2(run, moe_student):
    from megatron_minitron.model.checkpoint import resolve

    save, _ = run
    info = resolve(save)
    assert info.arch == resolve(moe_student).arch and info.arch.expert_ffn_hidden_size == 32
    assert info.metadata["saved_with"]["expert_parallel"] == 2 and info.iteration == 30


def _fails(argv, capsys) -> str:
    assert main(["distill", *map(str, argv)]) == 2
    return capsys.readouterr().err


def test_bad_moe_input_is_refused_before_training(moe_teacher, moe_student, single_rank_runtime, tmp_path, capsys):
    from megatron_minitron.config import MOE_FIELDS, ArchConfig, preset
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.checkpoint import save_checkpoint

    base = ["--teacher", moe_teacher, "--student", moe_student, "--save", tmp_path / "r"]
    assert "the student: expert-parallel size 3 does not divide num_experts=4" in _fails([*base, "--ep", "3"], capsys)
    assert "expert-parallel size 2 does not divide the data-parallel size 1" in _fails([*base, "--ep", "2"], capsys)
    more = _random_checkpoint(moe_teacher, tmp_path / "more", single_rank_runtime, num_experts=8,
                              moe_ffn_hidden_size=16)
    assert "the student is larger than the teacher: num_experts 8 > 4" in _fails(
        ["--teacher", moe_teacher, "--student", more, "--save", tmp_path / "r"], capsys)
    dense_fields = {f.name: f.default for f in dataclasses.fields(ArchConfig) if f.name in MOE_FIELDS}
    dense = _random_checkpoint(moe_teacher, tmp_path / "dense", single_rank_runtime, **dense_fields)
    assert "needs a Mixture-of-Experts teacher or student; both are dense" in _fails(
        ["--teacher", dense, "--student", dense, "--save", tmp_path / "r", "--ep", "2"], capsys)
    other_vocab = tmp_path / "other-vocab"
    save_checkpoint(other_vocab, model=build_model(preset("tiny-moe"), single_rank_runtime), arch=preset("tiny-moe"),
                    runtime=single_rank_runtime, iteration=None)
    err = _fails(["--teacher", moe_teacher, "--student", other_vocab, "--save", tmp_path / "r"], capsys)
    assert "teacher and student vocabularies differ" in err and "vocab_size=1000" in err
    assert not (tmp_path / "r").exists()
