"""Peak memory of distillation from a logits cache vs with the teacher in memory, at the same student, samples
and steps, with the student's own training as the baseline; also each kind's step time, in one run.

    python benchmarks/cache_memory.py [--tp 1] [--steps 3] [--k 64] [--out FILE]

Each kind of run (student alone, cached, online) is its own process (torchrun for --tp > 1), since a peak
cannot be taken back within a process: peak resident memory per rank (VmHWM) after its steps, and the
resident memory once the runtime is up and nothing is built, which every kind pays alike (Python, torch,
megatron). A first launch writes the random `small` teacher, its width-pruned student and the K cache
(benchmarks/cache_logits.py's models, samples and writer: micro-batch 4 x 256 tokens, vocabulary 32k).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cache_logits import MBS, SEQ, Samples, models, write_cache  # noqa: E402  (benchmarks/, the script's directory)
from _results import write_results  # noqa: E402

from megatron_minitron.runtime import ParallelConfig, initialize, shutdown  # noqa: E402
from megatron_minitron.runtime.host_memory import peak_rss_mb  # noqa: E402

KINDS = ("student", "cached", "online")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def setup(rt, root: Path, k: int, steps: int) -> None:
    """Teacher and student checkpoints (random weights) and the K cache of `steps` global batches."""
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.model.build import build_model

    teacher_arch, student_arch = models()
    for name, arch in (("teacher", teacher_arch), ("student", student_arch)):
        ckpt.save_checkpoint(root / name, model=build_model(arch, rt), arch=arch, runtime=rt, iteration=None)
    model = build_model(teacher_arch, rt)
    ckpt.load_checkpoint(ckpt.resolve(root / "teacher"), model=model)
    write_cache(rt, model, Samples(steps * MBS * rt.data_parallel, teacher_arch.vocab_size), root / "cache", k, steps,
                MBS * rt.data_parallel, (teacher_arch.vocab_size, teacher_arch.padded_vocab))


def arm(rt, root: Path, kind: str, steps: int) -> dict:
    """One kind of run for `steps` steps (the first untimed); this rank's memory and step times."""
    from megatron_minitron.data.loader import batch_iterator, prefetched
    from megatron_minitron.distill import logits_cache as lc
    from megatron_minitron.distill.cached import cached_task, cached_trainer
    from megatron_minitron.distill.loop import DistillConfig, build, distill_task
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.training.loop import TrainConfig, build_trainer, init_from, lm_task, train_step

    base = rss_mb()
    teacher_arch, student_arch = models()
    gbs = MBS * rt.data_parallel
    cfg = TrainConfig(train_iters=100, micro_batch_size=MBS, global_batch_size=gbs, seq_length=SEQ, lr_warmup_iters=1)
    teacher, student = ckpt.resolve(root / "teacher"), ckpt.resolve(root / "student")
    samples = Samples(steps * gbs, teacher_arch.vocab_size)
    dcfg = DistillConfig()
    if kind == "online":
        trainer, pairs = build(teacher, student, rt, cfg, dcfg)
        task = distill_task(rt, dcfg, trainer.chunks[0], pairs)
    else:
        trainer = (build_trainer if kind == "student" else cached_trainer)(student_arch, rt, cfg)
        task = lm_task(rt.device) if kind == "student" else cached_task(rt, dcfg)
    init_from(trainer, student.root)
    if kind == "cached":
        samples = lc.WithTeacherTargets(samples, lc.LogitsCache(root / "cache"), "train")
    data = batch_iterator(samples, micro_batch_size=MBS, dp_rank=rt.dp_rank, dp_size=rt.data_parallel)
    if kind == "cached":  # read ahead, as distill/cached.py's batches are
        data = prefetched(data)
    times = []
    for _ in range(steps):
        rt.barrier()
        start = time.perf_counter()
        train_step(trainer, task, data)
        rt.barrier()
        times.append(time.perf_counter() - start)
    return {"base_rss_mb": base, "peak_rss_mb": peak_rss_mb(), "step_s": statistics.median(times[1:])}


def worker(args) -> None:
    """Inside one launch: the setup or one kind; rank 0 writes every rank's numbers to --root."""
    root = Path(args.root)
    rt = initialize(ParallelConfig(tensor_parallel=args.tp))
    if args.kind == "setup":
        setup(rt, root, args.k, args.steps)
    else:
        mine = arm(rt, root, args.kind, args.steps)
        ranks = [None] * rt.world_size
        torch.distributed.all_gather_object(ranks, mine)
        if rt.rank == 0:
            (root / f"{args.kind}.json").write_text(json.dumps(ranks))
    shutdown()


def launch(args, kind: str, root: Path) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.tp)]
                if args.tp > 1 else [sys.executable])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASTER_")}
    cmd = [*launcher, str(Path(__file__).resolve()), "--kind", kind, "--root", str(root), "--tp", str(args.tp),
           "--steps", str(args.steps), "--k", str(args.k)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="steps of each kind (the first is not timed)")
    parser.add_argument("--k", type=int, default=64, help="K of the cache the cached run reads")
    parser.add_argument("--out", default=None)
    parser.add_argument("--kind", choices=("setup", *KINDS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kind is not None:
        worker(args)
        return
    root = Path(tempfile.mkdtemp(prefix="cache-memory-"))
    try:
        for kind in ("setup", *KINDS):
            launch(args, kind, root)
        ranks = {kind: json.loads((root / f"{kind}.json").read_text()) for kind in KINDS}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    peak = {kind: max(r["peak_rss_mb"] for r in rows) for kind, rows in ranks.items()}
    base = {kind: max(r["base_rss_mb"] for r in rows) for kind, rows in ranks.items()}
    step = {kind: max(r["step_s"] for r in rows) for kind, rows in ranks.items()}
    above = {kind: peak[kind] - base[kind] for kind in KINDS}  # what the run itself added
    teacher_arch, student_arch = models()
    write_results({
        "tp": args.tp, "steps": args.steps, "k": args.k, "tokens_per_step": MBS * SEQ,
        "teacher_params": teacher_arch.num_parameters(), "student_params": student_arch.num_parameters(),
        "per_rank": ranks, "peak_rss_mb": peak, "base_rss_mb": base, "peak_above_base_mb": above,
        "cached_vs_online_peak": peak["cached"] / peak["online"],
        "cached_vs_online_above_base": above["cached"] / above["online"],
        "cached_vs_student_peak": peak["cached"] / peak["student"],
        "saved_mb_per_rank": peak["online"] - peak["cached"],
        "step_s": step, "cached_vs_online_step": step["cached"] / step["online"],
        "cached_vs_student_step": step["cached"] / step["student"],
    }, args.out)


if __name__ == "__main__":
    main()
