"""A full disk, for real: a small tmpfs mounted for the test (root only; skipped elsewhere, saying why); and
a read-only filesystem, which root cannot write either (a read-only directory does not stop root).

Each writer must fail with one line that names its output and says the disk is full, and leave nothing that
looks complete: pretrain refuses before step 1 when one checkpoint cannot fit, and a disk that fills up
during training, prune or export-hf loses only the unfinished output."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env


@pytest.fixture
def small_disk(tmp_path):
    """A factory of tmpfs mounts of a given size under tmp_path, unmounted afterwards."""
    mounts = []

    def mount(size: str, options: str = "") -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}); needs root")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _minitron(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_minitron", *map(str, args)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=600, **kwargs)


def _last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


RUN = ["--arch", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "2",
       "--eval-interval", "1000", "--eval-iters", "1", "--log-interval", "1"]


def test_pretrain_refuses_a_disk_too_small_for_one_checkpoint_before_step_one(small_disk, data_cache):
    disk = small_disk("600k")
    proc = _minitron("pretrain", *RUN, "--train-iters", "4", "--save", disk / "run", "--cache-dir", data_cache)
    assert proc.returncode == 2
    line = _last_line(proc)
    assert line.startswith("minitron pretrain: error: --save ") and "MB free on its filesystem" in line, line
    assert not any(disk.iterdir())  # nothing written


def test_a_disk_that_fills_during_training_loses_only_the_unfinished_checkpoint(small_disk, data_cache):
    disk = small_disk("40m")
    save = disk / "run"
    cmd = [sys.executable, "-m", "megatron_minitron", "pretrain", *RUN, "--train-iters", "40", "--save", str(save),
           "--cache-dir", str(data_cache)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (save / "metrics.jsonl").is_file() or not (save / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(bytes(max(0, free - (64 << 10))))  # training goes on; its checkpoint cannot
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert "could not write checkpoint" in line and str(save) in line and "the disk is full" in line, line
    assert "--resume" in line
    assert not (save / "latest_checkpointed_iteration.txt").exists()
    assert not list(save.glob("iter_*"))  # neither a finished nor a partial checkpoint is left


@pytest.mark.parametrize("command", ["prune", "export-hf"])
def test_offline_writers_on_a_full_disk(command, small_disk, tiny_teacher, tmp_path):
    disk = small_disk("300k")
    out = disk / "out"
    if command == "prune":
        from megatron_minitron.model.checkpoint import resolve
        from megatron_minitron.plan.plan import identity_plan

        identity_plan(resolve(tiny_teacher).arch).save(tmp_path / "plan.json")
        proc = _minitron("prune", "--load", tiny_teacher, "--plan", tmp_path / "plan.json", "--workers", "2",
                         "--save", out)
    else:
        proc = _minitron("export-hf", "--load", tiny_teacher, "--save", out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _last_line(proc)
    assert line.startswith(f"minitron {command}: error: could not write") and str(out) in line, line
    assert "the disk is full" in line
    assert not any(disk.iterdir())  # neither the output nor its .partial directory


@pytest.mark.parametrize("command", [["pretrain", "--arch", "tiny"], ["prune", "--plan", "{plan}", "--load", "{teacher}"],
                                     ["export-hf", "--load", "{teacher}"]])
def test_a_read_only_filesystem_is_refused_before_any_work(command, small_disk, tiny_teacher, tmp_path):
    disk = small_disk("1m", ",ro")
    from megatron_minitron.model.checkpoint import resolve
    from megatron_minitron.plan.plan import identity_plan

    identity_plan(resolve(tiny_teacher).arch).save(tmp_path / "plan.json")
    args = [a.format(plan=tmp_path / "plan.json", teacher=tiny_teacher) for a in command]
    proc = _minitron(*args, "--save", disk / "out")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _last_line(proc)
    assert proc.stderr.count("\n") == 1 and str(disk) in line and "not writable" in line, proc.stderr
