"""What top-k costs in quality at demo scale: a pruned student distilled for the same steps online (the
teacher in memory) and from caches of K = 16, 64, 256 (and the whole vocabulary with --full), compared
by validation LM loss and KD loss; also the wall time of each command.

    python benchmarks/cache_quality.py [--iters 50] [--ks 16 64 256] [--out FILE]

A `tiny` teacher is pretrained on the embedded corpus (or given with --teacher), width-pruned with a
random ranking (hidden 64 -> 32, ffn 192 -> 96), then each arm runs `minitron distill` from the same
student checkpoint with the same flags. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_results  # benchmarks/, the script's directory

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def minitron(*args) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "megatron_minitron", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"minitron {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout


def final(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["kind"] == "valid"]
    return {"val lm loss": valid[-1]["val lm loss"], "val kd loss": valid[-1]["val kd loss"],
            "start val lm loss": valid[0]["val lm loss"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cache_quality.json"))
    args = parser.parse_args()
    from megatron_minitron.model.checkpoint import resolve
    from megatron_minitron.plan import Target, random_plan
    from megatron_minitron.prune.rewrite import prune_checkpoint

    work = Path(tempfile.mkdtemp(prefix="cache-quality-"))
    data = ["--cache-dir", work / "data", "--seq-length", "64", "--micro-batch-size", "4", "--global-batch-size", "8",
            "--eval-iters", "4"]
    run = [*data, "--train-iters", args.iters, "--lr", "2e-3", "--lr-warmup-iters", "2", "--eval-interval",
           args.iters, "--log-interval", args.iters]
    try:
        teacher = Path(args.teacher) if args.teacher else work / "teacher"
        if not args.teacher:
            minitron("pretrain", "--arch", "tiny", "--save", teacher, *data, "--train-iters", "150", "--lr", "3e-3",
                     "--lr-warmup-iters", "5", "--eval-interval", "150", "--log-interval", "50")
        plan = random_plan(resolve(teacher).arch.explicit(), Target(hidden_size=32, ffn_hidden_size=96), seed=1)
        prune_checkpoint(teacher, plan, work / "student", print_fn=lambda _: None)
        result = {"iters": args.iters, "tokens_per_step": 8 * 64, "arms": {}}
        seconds, _ = minitron("distill", "--teacher", teacher, "--student", work / "student", "--save",
                              work / "online", *run)
        result["arms"]["online"] = {**final(work / "online"), "distill_s": seconds}
        for k in args.ks:
            cache_s, _ = minitron("cache-logits", "--teacher", teacher, "--out", work / f"k{k}", "--top-k", k, *data,
                                  "--train-iters", args.iters)
            seconds, _ = minitron("distill", "--teacher-logits", work / f"k{k}", "--student", work / "student",
                                  "--save", work / f"run{k}", *run)
            size = sum(p.stat().st_size for p in (work / f"k{k}").glob("*.bin"))
            result["arms"][f"top{k}"] = {**final(work / f"run{k}"), "distill_s": seconds, "cache_s": cache_s,
                                         "cache_mb": size / 1e6}
        write_results(result, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
