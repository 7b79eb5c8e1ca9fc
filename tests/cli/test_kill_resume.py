"""SIGKILL at a step and during a checkpoint write, then --resume: the same losses and weights as an
uninterrupted run, one metrics line per step; --resume refuses settings that change the run and
leaves a finished run alone."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from megatron_minitron.cli import main
from megatron_minitron.model import checkpoint as ckpt
from tests.conftest import REPO, child_env

ITERS = 9
SHORT = ["--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--save-interval", "3",
         "--eval-interval", "3", "--eval-iters", "1", "--log-interval", "1", "--train-iters", str(ITERS)]


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "megatron_minitron", *map(str, args)]


def run_and_kill(cmd: list[str], *, at_line: str | None = None, save: Path | None = None) -> str:
    """Run cmd and SIGKILL it once a stdout line contains `at_line`, or (with save) while a checkpoint
    is being written: a `*.partial` directory in save whose final directory is not there yet, checked
    with the process stopped (SIGSTOP) so the evidence cannot move. Returns what it printed."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline, killed = time.monotonic() + 600, False
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if at_line is not None and any(at_line in line for line in lines):
                killed = True
            elif save is not None and save.is_dir():
                partial = [p for p in save.iterdir() if p.name.endswith(".partial")]
                if partial:
                    os.killpg(proc.pid, signal.SIGSTOP)
                    if any(p.is_dir() and not p.with_name(p.name[:-len(".partial")]).exists() for p in partial):
                        killed = True
                    else:
                        os.killpg(proc.pid, signal.SIGCONT)
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.0005)
    finally:
        if proc.poll() is None and not killed:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=10)
    output = "".join(lines)
    assert killed, f"{' '.join(cmd)} ended before it could be killed:\n{output[-3000:]}"
    return output


def finish(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def trajectory(save: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    valid = [r for r in records if r["kind"] == "valid"]
    return train, valid


def losses(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k == "iteration" or k.endswith("loss")} for r in records]


def assert_same_run(killed: Path, reference: Path) -> None:
    train, valid = trajectory(killed)
    ref_train, ref_valid = trajectory(reference)
    assert [r["iteration"] for r in train] == list(range(1, ITERS + 1))  # one line per step
    assert losses(train) == losses(ref_train) and losses(valid) == losses(ref_valid)
    a, b = (ckpt.read_tensors(ckpt.resolve(d).path) for d in (killed, reference))
    assert ckpt.resolve(killed).iteration == ITERS and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def kill_twice_and_resume(base: list[str], save: Path) -> str:
    """Killed while writing a checkpoint, resumed and killed at a step past its last checkpoint
    (step 8, checkpoint 6), resumed to the end."""
    run_and_kill(base + ["--save", save], save=save)
    assert not (save / ckpt.TRACKER).exists() or ckpt.latest_iteration(save) in ("3", "6")
    out = run_and_kill(base + ["--save", save, "--resume"], at_line=f"iter      8/{ITERS}")
    assert ckpt.latest_iteration(save) == "6"
    assert f"iter      7/{ITERS}" in out
    return finish(base + ["--save", save, "--resume"])


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_pretrain_killed_twice_resumes_exactly(data_cache, tmp_path, capsys):
    # default warm-up (20) on a 9-step run: cut to a tenth of it, with a note
    base = _cmd("pretrain", "--arch", "tiny", "--cache-dir", data_cache, *SHORT)
    note = finish(base + ["--save", tmp_path / "reference"])
    assert "--lr-warmup-iters 20 is not below --train-iters 9" in note
    out = kill_twice_and_resume(base, tmp_path / "killed")
    assert "resumed from" in out and "dropped" in out
    assert_same_run(tmp_path / "killed", tmp_path / "reference")

    # --resume with settings that change the run: refused, listing them, nothing touched
    ref = tmp_path / "reference"
    before = digest(ref)
    argv = ["pretrain", "--arch", "tiny", "--cache-dir", str(data_cache), *SHORT, "--save", str(ref), "--resume"]
    assert main(argv + ["--lr", "2e-3", "--seq-length", "64", "--micro-batch-size", "4"]) == 2
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not line.startswith("note: "))
    assert err.count("\n") == 0 and str(ref) in err, err
    assert "train.lr 0.001 -> 0.002" in err and "train.seq_length 32 -> 64" in err and "micro_batch_size 2 -> 4" in err
    assert main(argv + ["--train-iters", "5"]) == 2
    err = capsys.readouterr().err
    assert "--train-iters 5" in err and f"already at iteration {ITERS}" in err
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert digest(ref) == before

    # extending it is allowed and recorded truthfully: the LR schedule keeps its length
    finish(_cmd(*argv[:-3], "--save", ref, "--resume", "--train-iters", ITERS + 1))
    record = json.loads((ref / "run.json").read_text())
    assert record["train"]["train_iters"] == ITERS + 1 and record["lr_schedule_steps"] == ITERS
    assert record["resumes"] == [{"iteration": ITERS, "changes": {"train.train_iters": [ITERS, ITERS + 1]}}]
    assert [r["iteration"] for r in trajectory(ref)[0]] == list(range(1, ITERS + 2))


def test_distill_killed_twice_resumes_exactly(tiny_teacher, data_cache, tmp_path):
    base = _cmd("distill", "--teacher", tiny_teacher, "--student", tiny_teacher, "--cache-dir", data_cache,
                "--skip-teacher-check", "--lr-warmup-iters", "1", *SHORT)
    finish(base + ["--save", tmp_path / "reference"])
    out = kill_twice_and_resume(base, tmp_path / "killed")
    assert "resumed from" in out
    assert_same_run(tmp_path / "killed", tmp_path / "reference")
