"""Shared test helpers: launching real multi-process megatron runs under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def child_env(**extra: str) -> dict:
    """Environment for a child process: quiet, one thread, and none of the torch.distributed variables an
    in-process runtime of this pytest process may have set (a child would try to reuse its port)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", **extra}


def torchrun(script: str | Path, *args: str, nproc: int, timeout: float = 600, cwd: Path = REPO,
             env: dict | None = None) -> str:
    """Run `script` on nproc processes with torchrun's standalone rendezvous (it picks a free port, so
    parallel launches cannot race for one). Returns the output; on failure or timeout raises with the
    output, which holds every failing rank's traceback (torchrun prefixes them with [rankN])."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), *map(str, args)]
    full_env = child_env(**(env or {}))
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(f"{' '.join(cmd)} timed out after {timeout}s\n{out[-8000:]}\n{err[-8000:]}") from None
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}\n{_ranks_tracebacks(output)}")
    return output


def _ranks_tracebacks(output: str, limit: int = 12000) -> str:
    """The [rankN] traceback lines first (they name the failure), then the tail of everything."""
    rank_lines = [line for line in output.splitlines() if line.startswith("[rank")]
    return "\n".join(rank_lines)[-limit:] + "\n----- tail -----\n" + output[-4000:]


@pytest.fixture(scope="session")
def single_rank_runtime():
    """A world of one process (gloo on CPU) with megatron's parallel state, for in-process tests."""
    from megatron_minitron.runtime import ParallelConfig, initialize, shutdown
    from megatron_minitron.runtime.dist import LaunchEnv, free_port

    env = LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=free_port())
    runtime = initialize(ParallelConfig(), env=env)
    yield runtime
    shutdown()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One cache directory (default tokenizer, tokenized embedded corpus) for the whole session."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, data_cache):
    """A `tiny` teacher trained on the embedded corpus with the default tokenizer (one process, ~30 s;
    validation loss ~6.3 against ln(8192) = 9.0 for a uniform guess)."""
    save = tmp_path_factory.mktemp("tiny-teacher") / "run"
    cmd = [sys.executable, "-m", "megatron_minitron", "pretrain", "--arch", "tiny", "--save", str(save),
           "--cache-dir", str(data_cache), "--train-iters", "150", "--seq-length", "64", "--micro-batch-size", "4",
           "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "5", "--eval-interval", "150",
           "--eval-iters", "4", "--log-interval", "50"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return save


@pytest.fixture(scope="session")
def tiny_scores(tiny_teacher, data_cache, tmp_path_factory):
    """Importance scores of tiny_teacher (one process, 16 samples of 64 tokens)."""
    out = tmp_path_factory.mktemp("tiny-scores") / "scores"
    cmd = [sys.executable, "-m", "megatron_minitron", "importance", "--load", str(tiny_teacher), "--out", str(out),
           "--cache-dir", str(data_cache), "--num-samples", "16", "--seq-length", "64", "--lm-loss-blocks", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out
