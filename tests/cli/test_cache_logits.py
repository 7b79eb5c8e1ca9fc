"""`minitron cache-logits` and `minitron distill --teacher-logits` end to end on the embedded corpus: the
cache holds distill's samples in distill's order, a student learns from it without the teacher, a cache
for something else is refused naming the field, a truncated cache is completed by running the command
again, and a disk too small for the announced size is refused before the first forward pass."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_minitron.cli import main
from tests.cli.test_disk_full import small_disk  # noqa: F401 (fixture)
from tests.conftest import REPO, child_env

DATA = ["--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", "8", "--eval-iters", "2"]
ITERS, K = 4, 16


def _minitron(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_minitron", *map(str, argv)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=600)


def _cache_cmd(teacher, out, data_cache, *extra):
    return ["cache-logits", "--teacher", teacher, "--out", out, "--cache-dir", data_cache, "--train-iters", ITERS,
            "--top-k", K, *DATA, *extra]


@pytest.fixture(scope="module")
def student(tiny_teacher, tmp_path_factory):
    from megatron_minitron.model.checkpoint import resolve
    from megatron_minitron.plan import Target, random_plan
    from megatron_minitron.prune.rewrite import prune_checkpoint

    out = tmp_path_factory.mktemp("cache-student") / "student"
    plan = random_plan(resolve(tiny_teacher).arch.explicit(), Target(hidden_size=32, ffn_hidden_size=96), seed=1)
    prune_checkpoint(tiny_teacher, plan, out, print_fn=lambda _: None)
    return out


@pytest.fixture(scope="module")
def cache(tiny_teacher, data_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("logits-cache") / "top16"
    proc = _minitron(*_cache_cmd(tiny_teacher, out, data_cache))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_the_announced_size_is_what_is_written(cache):
    out, stdout = cache
    per_token = 12 + 8 * K
    tokens = (ITERS + 2) * 8 * 64
    assert f"{tokens:,} tokens x top-{K} = {tokens * per_token / 1e6:,.1f} MB ({per_token} bytes/token)" in stdout
    assert sum(p.stat().st_size for p in out.glob("*.bin")) == tokens * per_token
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples_written"] == (ITERS + 2) * 8 and metrics["bytes_written"] == tokens * per_token


@pytest.mark.parametrize("dp", [1, 2])
def test_the_cache_holds_distills_samples_in_distills_order(cache, tiny_teacher, data_cache, dp):
    """Token ids sample by sample: what each data-parallel rank of `minitron distill` (data/loader.py's
    run_batches with the same flags) is fed, against the cached sample of the same global index."""
    from types import SimpleNamespace

    from megatron_minitron.cli.distill import shared_tokenizer
    from megatron_minitron.data.loader import DataConfig, load_tokenizer, run_batches
    from megatron_minitron.distill.logits_cache import LogitsCache
    from megatron_minitron.model.checkpoint import resolve
    from megatron_minitron.training.loop import TrainConfig

    info = resolve(tiny_teacher)
    data_cfg = DataConfig(seq_length=64, cache_dir=str(data_cache), tokenizer=shared_tokenizer(None, info, info))
    cfg = TrainConfig(train_iters=ITERS, seq_length=64, micro_batch_size=4, global_batch_size=8, eval_iters=2,
                      lr_warmup_iters=0)
    lc = LogitsCache(cache[0])
    mbs = 4
    for rank in range(dp):
        runtime = SimpleNamespace(dp_rank=rank, data_parallel=dp)
        batches = run_batches(data_cfg, load_tokenizer(data_cfg), cfg, runtime, model_vocab_size=info.arch.vocab_size)
        for split, iterator, iters in (("train", batches["train_batches"](0), ITERS),
                                       ("valid", batches["valid_batches"](), 2)):
            for step in range(iters * 8 // (mbs * dp)):
                tokens = next(iterator)["tokens"]
                for o in range(mbs):
                    index = step * mbs * dp + rank * mbs + o
                    assert torch.equal(tokens[o], lc.sample(split, index)["tokens"].long()), (split, index)


def test_a_student_learns_from_the_cache_without_its_teacher(cache, student, data_cache, tmp_path):
    save = tmp_path / "run"
    proc = _minitron("distill", "--teacher-logits", cache[0], "--student", student, "--save", save,
                     "--cache-dir", data_cache, "--train-iters", ITERS, *DATA, "--lr", "3e-3",
                     "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", str(ITERS))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no teacher in memory" in proc.stdout
    assert "before training: teacher lm loss" in proc.stdout  # read from the cache, logged as online runs do
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == ITERS and train[-1]["kd loss"] < 0.8 * train[0]["kd loss"], train
    final = json.loads((save / "final_validation.json").read_text())
    assert final["iteration"] == ITERS and final["kd loss"] > 0
    assert 0 < final["teacher lm loss"] < final["student lm loss"]
    assert json.loads((save / "run.json").read_text())["cache"]["top_k"] == K


def _fails(argv, capsys) -> str:
    assert main([*map(str, argv)]) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_cache_for_another_run_is_refused_naming_the_field(cache, student, tiny_teacher, data_cache, tmp_path,
                                                             capsys):
    base = ["distill", "--teacher-logits", cache[0], "--student", student, "--save", tmp_path / "r",
            "--cache-dir", data_cache, "--train-iters", ITERS, *DATA]
    err = _fails([*base, "--seq-length", "32"], capsys)
    assert "was written for data.seq_length 64, this run has 32" in err
    assert "written for data.seed 1234, this run has 7" in _fails([*base, "--seed", "7"], capsys)
    assert "written for temperature 1.0, this run has 2.0" in _fails([*base, "--kd-temperature", "2"], capsys)
    assert "teacher_fingerprint" in _fails([*base, "--teacher", student], capsys)  # another model as --teacher
    assert "holds 32 training samples" in _fails([*base, "--train-iters", ITERS + 1], capsys)
    assert "--intermediate-layers needs the teacher's hidden states" in _fails(
        [*base, "--intermediate-layers", "1:1"], capsys)
    assert not (tmp_path / "r").exists()
    err = _fails(["distill", "--student", student, "--save", tmp_path / "r"], capsys)
    assert "--teacher is required (or --teacher-logits DIR" in err


def test_a_cache_of_the_first_format_is_refused_naming_the_versions(cache, student, tiny_teacher, data_cache, tmp_path,
                                                                     capsys):
    """Format /1 had no label log-probabilities: refused before any work, by `distill` and by `cache-logits`
    into it, saying which versions and how to write it again; `--overwrite` then replaces it."""
    old = tmp_path / "old"
    shutil.copytree(cache[0], old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format": "minitron-logits-cache/1"}))
    err = _fails(["distill", "--teacher-logits", old, "--student", student, "--save", tmp_path / "r",
                  "--cache-dir", data_cache, "--train-iters", ITERS, *DATA], capsys)
    assert (f"{old / 'manifest.json'}: the cache is in format 'minitron-logits-cache/1', this version reads "
            f"'minitron-logits-cache/2'") in err and "write it again with `minitron cache-logits ... --overwrite`" in err
    assert not (tmp_path / "r").exists()
    again = _minitron(*_cache_cmd(tiny_teacher, old, data_cache))
    assert again.returncode == 2 and "the cache is in format 'minitron-logits-cache/1'" in again.stderr, again.stderr
    again = _minitron(*_cache_cmd(tiny_teacher, old, data_cache, "--overwrite"))  # what the message says works
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert json.loads((old / "manifest.json").read_text())["format"] == "minitron-logits-cache/2"


def test_a_truncated_cache_is_refused_then_completed_by_the_same_command(cache, student, tiny_teacher, data_cache,
                                                                        tmp_path, capsys):
    cut = tmp_path / "cut"
    shutil.copytree(cache[0], cut)
    shard = cut / "train_000001.bin"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:len(whole) // 3])  # what a kill during a non-atomic copy leaves
    err = _fails(["distill", "--teacher-logits", cut, "--student", student, "--save", tmp_path / "r",
                  "--cache-dir", data_cache, "--train-iters", ITERS, *DATA], capsys)
    assert "is incomplete: 1 train shard(s) missing or cut short (first train_000001.bin)" in err
    proc = _minitron(*_cache_cmd(tiny_teacher, cut, data_cache))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{len(whole) / 1e6:,.1f} MB still to write" in proc.stdout
    assert json.loads((cut / "metrics.json").read_text())["samples_written"] == 8  # the one shard redone
    assert shard.read_bytes() == whole  # redone, bit for bit
    other = _minitron(*_cache_cmd(tiny_teacher, cut, data_cache, "--seed", "7"))
    assert other.returncode == 2 and "holds a cache written for data.seed 1234, this command asks for 7" in other.stderr


def test_a_disk_too_small_for_the_announced_size_is_refused(small_disk, tiny_teacher, data_cache):  # noqa: F811
    disk = small_disk("1m")
    proc = _minitron(*_cache_cmd(tiny_teacher, disk / "c", data_cache, "--top-k", "1024"))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "the cache needs 25.2 MB more, its filesystem has" in line and "lower --top-k" in line, line
    assert not any(disk.iterdir())


def test_every_search_candidate_and_the_winner_read_the_same_cache(cache, tiny_teacher, tiny_scores, data_cache,
                                                                    tmp_path, capsys):
    out = tmp_path / "search"
    proc = _minitron("search", "--load", tiny_teacher, "--scores", tiny_scores, "--out", out, "--cache-dir",
                     data_cache, "--teacher-logits", cache[0], "--hidden", "56", "48", "--ffn", "96", "--budget",
                     "950k", "--tolerance", "0.1", "--train-iters", ITERS, *DATA, "--lr", "2e-3", "--lr-warmup-iters",
                     "1", "--eval-interval", "2", "--log-interval", "2", "--winner-iters", ITERS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"distilling every candidate from the cached top-{K}" in proc.stdout
    assert f"the winner's {ITERS} steps are in the cache too" in proc.stdout and "loading the teacher" not in proc.stdout
    result = json.loads((out / "search.json").read_text())
    assert result["teacher_logits"] == str(cache[0]) and len(result["candidates"]) == 2
    by_name = {c["name"]: c for c in result["candidates"]}
    assert by_name["L4-h48-f96-H4-G2"]["train_curve"][0][1] > by_name["L4-h56-f96-H4-G2"]["train_curve"][0][1] > 0
    # the winner's run has the candidate's length here: from the same cache it repeats the candidate's run exactly
    winner, again = by_name[result["winner"]], result["winner_distilled"]
    assert len(again["train_curve"]) == ITERS and all(math.isfinite(loss) for _, loss in again["train_curve"])
    losses = [[loss for _, loss in run["train_curve"]] for run in (again, winner)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert again["val_lm_loss"] == pytest.approx(winner["val_lm_loss"], rel=1e-6)
    err = _fails(["search", "--load", tiny_teacher, "--scores", tiny_scores, "--out", tmp_path / "s2",
                  "--cache-dir", data_cache, "--teacher-logits", cache[0], "--hidden", "56", "--ffn", "96", "--budget", "950k",
                  "--tolerance", "0.1", "--train-iters", ITERS, *DATA, "--seed", "3"], capsys)
    assert "written for data.seed 1234, this run has 3" in err


def test_the_command_at_tp2_writes_the_ids_of_tp1(cache, tiny_teacher, data_cache, tmp_path):
    from megatron_minitron.distill.logits_cache import LogitsCache
    from tests.conftest import torchrun

    torchrun("-m", "megatron_minitron", *_cache_cmd(tiny_teacher, tmp_path / "tp2", data_cache, "--tp", "2"),
             nproc=2, timeout=600)
    tp1, tp2 = LogitsCache(cache[0]), LogitsCache(tmp_path / "tp2")
    for split in ("train", "valid"):
        for i in range(tp1.manifest.samples(split)):
            a, b = tp1.sample(split, i), tp2.sample(split, i)
            assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["teacher_ids"], b["teacher_ids"]), (split, i)
            assert torch.allclose(a["teacher_logp"], b["teacher_logp"], atol=1e-5)
            assert torch.allclose(a["teacher_rest"], b["teacher_rest"], atol=1e-5)
            assert torch.allclose(a["teacher_label_logp"], b["teacher_label_logp"], atol=1e-5)


def test_a_killed_cache_run_is_completed_by_the_same_command(tiny_teacher, data_cache, tmp_path):
    """SIGKILL (the whole process group, as a scheduler does) once a few shards are in place; the same
    command then writes only the rest, and the cache equals an uninterrupted one byte for byte."""
    iters = ["--train-iters", "40"]
    reference = _minitron(*_cache_cmd(tiny_teacher, tmp_path / "whole", data_cache, *iters))
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "megatron_minitron", *map(str, _cache_cmd(tiny_teacher, out, data_cache, *iters))]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while len(list(out.glob("train_*.bin"))) < 3:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*.bin")))
    assert json.loads((out / "manifest.json").read_text())["complete"] is False and done < 42
    again = _minitron(*_cache_cmd(tiny_teacher, out, data_cache, *iters))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["samples_written"] <= (42 - done + 1) * 8
    names = sorted(p.name for p in (tmp_path / "whole").glob("*.bin"))
    assert names == sorted(p.name for p in out.glob("*.bin")) and len(names) == 42
    assert all((out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes() for name in names)
    assert json.loads((out / "manifest.json").read_text())["complete"] is True


def test_a_cached_run_stopped_and_resumed_equals_the_uninterrupted_one(cache, student, data_cache, tmp_path):
    flags = ["distill", "--teacher-logits", cache[0], "--student", student, "--cache-dir", data_cache,
             "--train-iters", ITERS, *DATA, "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1",
             "--eval-interval", str(ITERS)]
    runs = {}
    for name, extra in (("whole", [[]]), ("split", [["--exit-interval", "2"], ["--resume"]])):
        for more in extra:
            proc = _minitron(*flags, "--save", tmp_path / name, *more)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [(r["iteration"], r["loss"]) for r in records if r["kind"] == "train"]
    assert len(runs["whole"]) == ITERS and runs["split"] == runs["whole"]
    resumes = json.loads((tmp_path / "split" / "run.json").read_text())["resumes"]
    assert resumes[-1]["iteration"] == 2


def test_a_cache_cut_with_another_tokenizer_is_refused(cache):
    """The batches of a cached run are checked against the tokenizer the samples were cut with (every rank,
    before any step): another tokenizer's fingerprint is refused naming the field, the cache's own passes."""
    from types import SimpleNamespace

    from megatron_minitron.config import ConfigError
    from megatron_minitron.distill.logits_cache import LogitsCache, check_tokenizer

    logits = LogitsCache(cache[0])
    with pytest.raises(ConfigError, match="was written for tokenizer_fingerprint .*, this run's tokenizer is "
                                          "'another'; write a cache with this run's tokenizer"):
        check_tokenizer(logits, SimpleNamespace(fingerprint="another"))
    check_tokenizer(logits, SimpleNamespace(fingerprint=logits.manifest.tokenizer_fingerprint))


def test_a_cache_of_an_untrained_teacher_is_refused_before_step_one(tiny_teacher, student, data_cache,
                                                                    single_rank_runtime, tmp_path):
    """The cache's label log-probabilities give the teacher's validation loss, so a cached run checks the
    teacher as an online run does (a randomly initialised teacher scores about ln(vocab))."""
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.checkpoint import resolve, save_checkpoint

    info = resolve(tiny_teacher)
    random_teacher = tmp_path / "random-teacher"
    save_checkpoint(random_teacher, model=build_model(info.arch, single_rank_runtime), arch=info.arch,
                    runtime=single_rank_runtime, iteration=None, tokenizer=info.tokenizer)
    made = _minitron(*_cache_cmd(random_teacher, tmp_path / "cache", data_cache))
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    proc = _minitron("distill", "--teacher-logits", tmp_path / "cache", "--student", student, "--save",
                     tmp_path / "run", "--cache-dir", data_cache, "--train-iters", ITERS, *DATA)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the teacher looks untrained: its validation loss" in proc.stderr
    assert "--teacher-logits cache" in proc.stderr and "--skip-teacher-check" in proc.stderr
    assert not list((tmp_path / "run").glob("iter_*"))
