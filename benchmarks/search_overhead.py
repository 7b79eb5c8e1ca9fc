"""`minitron search` wall time vs the same candidates pruned and distilled by separate `minitron prune`
and `minitron distill` runs (target: ratio <= 1.05; loading the teacher and the data once should make
it lower).

    python benchmarks/search_overhead.py [--arch tiny] [--iters 20] [--repeats 2] [--nproc 1]

A teacher of --arch is pretrained on the embedded corpus (or given with --teacher and --scores), then
each repeat runs the separate commands for every candidate of the search space, then the search
itself, with the same training flags; the best wall time of each side is compared. The separate runs
use each candidate's plan.json from the search, so both sides prune and distill exactly the same
students on the same data (the test suite shows the losses agree). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_results  # benchmarks/, the script's directory

REPO = Path(__file__).resolve().parents[1]
SPACES = {"tiny": (["--layers", "4", "2", "--hidden", "56", "--ffn", "192", "96"], "1.0M"),
          "small": (["--layers", "8", "6", "--hidden", "224", "192", "--ffn", "768"], "8M")}


def minitron(args: list, nproc: int) -> float:
    """Wall seconds of one command (torchrun when nproc > 1)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if nproc > 1
                else [sys.executable])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASTER_")}
    start = time.perf_counter()
    proc = subprocess.run([*launcher, "-m", "megatron_minitron", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"minitron {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=sorted(SPACES), default="tiny")
    parser.add_argument("--iters", type=int, default=20, help="distillation steps per candidate")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=1, help="processes per command (data parallel)")
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--scores", default=None)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "search_overhead.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="search-bench-"))
    try:
        cache = work / "cache"
        run = ["--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", str(8 * args.nproc),
               "--lr", "2e-3", "--lr-warmup-iters", "1", "--eval-iters", "4", "--eval-interval", str(args.iters),
               "--log-interval", str(args.iters), "--train-iters", str(args.iters), "--cache-dir", cache]
        teacher, scores = args.teacher, args.scores
        if teacher is None:
            teacher, scores = work / "teacher", work / "scores"
            minitron(["pretrain", "--arch", args.arch, "--save", teacher, "--cache-dir", cache, "--train-iters", 150,
                      "--seq-length", 64, "--micro-batch-size", 4, "--global-batch-size", 8, "--lr", "3e-3",
                      "--lr-warmup-iters", 5, "--eval-iters", 4, "--eval-interval", 150], 1)
            minitron(["importance", "--load", teacher, "--out", scores, "--cache-dir", cache, "--num-samples", 16,
                      "--seq-length", 64], 1)
        space, budget = SPACES[args.arch]
        search_args = ["search", "--load", teacher, "--scores", scores, *space, "--budget", budget, *run]
        minitron([*search_args, "--out", work / "plans"], args.nproc)  # warm-up; also gives every candidate's plan
        plans = sorted((work / "plans" / "candidates").glob("*/plan.json"))
        separate, search = [], []
        for repeat in range(args.repeats):
            seconds = {"prune": 0.0, "distill": 0.0}
            for plan in plans:
                student, save = work / f"student-{repeat}-{plan.parent.name}", work / f"run-{repeat}-{plan.parent.name}"
                seconds["prune"] += minitron(["prune", "--load", teacher, "--plan", plan, "--save", student], 1)
                seconds["distill"] += minitron(["distill", "--teacher", teacher, "--student", student, "--save", save,
                                                *run], args.nproc)
                shutil.rmtree(student)
                shutil.rmtree(save)
            separate.append(seconds)
            search.append(minitron([*search_args, "--out", work / f"search-{repeat}"], args.nproc))
            print(f"repeat {repeat + 1}/{args.repeats}: separate prune {seconds['prune']:.1f} s + distill "
                  f"{seconds['distill']:.1f} s, search {search[-1]:.1f} s", flush=True)
        best_separate = min(s["prune"] + s["distill"] for s in separate)
        best_distill = min(s["distill"] for s in separate)
        result = {"arch": args.arch, "candidates": len(plans), "iters": args.iters, "nproc": args.nproc,
                  "search_s": search, "separate_s": separate,
                  "ratio": min(search) / best_separate, "ratio_vs_distill_only": min(search) / best_distill,
                  "target": "ratio <= 1.05"}
        write_results(result, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
