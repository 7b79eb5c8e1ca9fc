"""The Slurm templates for real: a one-node cluster on localhost runs importance -> prune -> distill
on a `tiny` teacher (gloo, 2 tasks each, chained with --dependency=afterok), and a failing job must
read FAILED with its exit code and hold back the job that depends on it. Skips where Slurm is not
installed (CI installs it in .ci/run)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env
from tests.launch.slurm import Cluster, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

TINY_RUN = ["--seq-length", "64", "--micro-batch-size", "4", "--cache-dir"]


@pytest.fixture(scope="module")
def cluster():
    # A short path: munge's socket path must fit in a sockaddr_un (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="minitron-slurm-", dir="/tmp"))
    cluster = Cluster(root, cpus=max(2, os.cpu_count() or 1))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
    assert not any(_alive(p) for p in (root / "run").glob("*.pid")), "a Slurm or munge daemon outlived stop()"
    shutil.rmtree(root, ignore_errors=True)


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site file for this cluster: the same variables a real one sets, local values. Its interpreter
    records each rank's CPU time (the shared machine's load makes wall time a poor measure)."""
    root = tmp_path_factory.mktemp("site")
    python = root / "python"
    python.write_text(f"#!/usr/bin/env bash\n{sys.executable} \"$@\"\nrc=$?\n"
                      f"times > {root}/cpu-$SLURM_JOB_ID-$SLURM_PROCID\nexit $rc\n")
    python.chmod(0o755)
    path = root / "site.env"
    path.write_text("export SBATCH_PARTITION=debug\nexport SBATCH_TIMELIMIT=10\nMINITRON_SRUN_ARGS=()\n"
                    f"MINITRON_PYTHON={python}\nexport OMP_NUM_THREADS=1\n")
    return path


def _cpu_seconds(site: Path, job_id: str) -> float:
    """User + system CPU seconds of all ranks of a job (bash `times`: its children's line)."""
    total = 0.0
    for path in site.parent.glob(f"cpu-{job_id}-*"):
        for minutes, seconds in re.findall(r"(\d+)m([\d.]+)s", path.read_text().splitlines()[-1]):
            total += 60 * int(minutes) + float(seconds)
    return total


def _submit(cluster, site, work: Path, template: str, *args, sbatch=()) -> str:
    env = {**child_env(), "SLURM_CONF": cluster.env["SLURM_CONF"], "MINITRON_SITE": str(site)}
    cmd = ["bash", str(REPO / "launch" / "sbatch.sh"), "--parsable", "--nodes", "1", "--ntasks-per-node", "2",
           "--output", str(work / "%x-%j.out"), *sbatch, str(REPO / "launch" / "slurm" / f"{template}.sbatch"),
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().split(";")[0]


def _log(info: dict) -> str:
    path = Path(info["StdOut"])
    assert path.is_file(), f"job {info['JobId']} wrote no output file {path} (a launch that never ran)"
    return path.read_text()


def test_importance_prune_distill_chain(cluster, site, tiny_teacher, data_cache, tmp_path):
    from megatron_minitron.importance.scores import load_scores
    from megatron_minitron.model.checkpoint import resolve

    started = time.monotonic()
    scores, pruned, student = tmp_path / "scores", tmp_path / "pruned", tmp_path / "student"
    export_config = tmp_path / "target.json"
    export_config.write_text(json.dumps({"hidden_size": 48, "ffn_hidden_size": 128, "num_attention_heads": 2}))
    importance = _submit(cluster, site, tmp_path, "importance", "--load", tiny_teacher, "--out", scores, "--tp", 2,
                         "--num-samples", 16, *TINY_RUN, data_cache)
    prune = _submit(cluster, site, tmp_path, "prune", "--load", tiny_teacher, "--scores", scores,
                    "--export-config", export_config, "--tp", 2, "--save", pruned,
                    sbatch=[f"--dependency=afterok:{importance}"])
    distill = _submit(cluster, site, tmp_path, "distill", "--teacher", tiny_teacher, "--student", pruned,
                      "--save", student, "--tp", 2, "--train-iters", 4, "--global-batch-size", 8, "--lr", 1e-3,
                      "--lr-warmup-iters", 1, "--eval-interval", 4, "--eval-iters", 2, "--log-interval", 2,
                      *TINY_RUN, data_cache, sbatch=[f"--dependency=afterok:{prune}"])
    jobs = cluster.wait([importance, prune, distill], timeout=600)
    logs = {name: _log(jobs[j]) for name, j in (("importance", importance), ("prune", prune), ("distill", distill))}
    for name, job_id in (("importance", importance), ("prune", prune), ("distill", distill)):
        info = jobs[job_id]
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{name}: {info}\n{logs[name][-4000:]}"
        assert f"minitron {name}: 1 node(s) x 2 task(s)" in logs[name], logs[name][-2000:]
        assert "Traceback" not in logs[name], logs[name][-4000:]
    assert jobs[prune]["StartTime"] >= jobs[importance]["EndTime"]  # ISO timestamps order as strings
    assert jobs[distill]["StartTime"] >= jobs[prune]["EndTime"]

    # importance ran at TP=2 over both tasks and wrote layout-independent scores of the teacher
    got = load_scores(scores)
    assert got.manifest.layout["tp"] == 2
    got.check_belongs_to(resolve(tiny_teacher).arch, what="the teacher")
    assert f"scores written to {scores}" in logs["importance"]
    # prune: the export config's shape, both ranks sharing the rewrite
    arch = resolve(pruned).arch
    assert (arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads, arch.num_layers) == (48, 128, 2, 4)
    # distill: a student checkpoint of the pruned shape after 4 iterations of a 2-rank job
    info = resolve(student)
    assert info.arch == arch and info.iteration == 4
    run = json.loads((student / "run.json").read_text())
    assert run["world_size"] == 2 and run["parallel"]["tensor_parallel"] == 2
    valid = [r for r in map(json.loads, (student / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "valid"]
    assert valid[-1]["iteration"] == 4
    assert cluster.node_state() == "idle"  # not drained by a failed launch
    names = (("importance", importance), ("prune", prune), ("distill", distill))
    print(f"slurm chain: {time.monotonic() - started:.1f}s wall; " + ", ".join(
        f"{name} {jobs[j]['RunTime']} ({_cpu_seconds(site, j):.0f} CPU s)" for name, j in names))


def test_a_failing_job_reads_failed_and_holds_its_dependants(cluster, site, tmp_path):
    # a bad flag fails both ranks at argument parsing (exit 2), before any heavy import
    bad = _submit(cluster, site, tmp_path, "prune", "--load", tmp_path, "--save", tmp_path / "never",
                  "--workers", "many")
    after = _submit(cluster, site, tmp_path, "prune", "--load", tmp_path, "--save", tmp_path / "never2",
                    sbatch=[f"--dependency=afterok:{bad}"])
    info = cluster.wait([bad], timeout=120)[bad]
    log = _log(info)
    # srun reports the largest task exit code: 2 from the CLI, or 143 for the rank --kill-on-bad-exit ended
    assert info["JobState"] == "FAILED" and info["ExitCode"] in ("2:0", "143:0"), f"{info}\n{log}"
    assert re.search(r"tasks? [0-9-]+: Exited with exit code 2", log), log  # "task 1:" or "tasks 0-1:"
    assert "argument --workers: 'many' is not an integer" in log, log
    deadline = time.monotonic() + 60
    while (waiting := cluster.job(after))["Reason"] != "DependencyNeverSatisfied" and time.monotonic() < deadline:
        time.sleep(0.5)  # the scheduler re-evaluates dependencies on its own schedule
    subprocess.run(["scancel", after], env=cluster.env, check=True)
    assert (waiting["JobState"], waiting["Reason"]) == ("PENDING", "DependencyNeverSatisfied"), waiting
    assert not (tmp_path / "never").exists() and not (tmp_path / "never2").exists()
    assert cluster.node_state() == "idle"
