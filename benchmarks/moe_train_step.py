"""MoE training step of our loop vs a bare megatron forward-backward-optimizer step (target: ratio <= 1.05).

    python benchmarks/moe_train_step.py                                   # one process, EP1
    torchrun --nproc-per-node 2 benchmarks/moe_train_step.py --ep 2       # DP2 x EP2

The same measurement as benchmarks/train_step_overhead.py (whose batches and bare step it uses), on a
Mixture-of-Experts model: both sides run the same model, optimizer and batches, and megatron's router
adds its auxiliary loss on both; ours also counts each expert's tokens and reduces the router statistics
over the ranks (training/moe_stats.py). Its router hooks are detached during the bare steps. Steps
alternate so machine noise hits both alike; the ratio of median step times is reported and written to
--out (default benchmarks/results/moe_train_step.json). On a shared machine that ratio moves by +-10%
from run to run, so the time our router statistics take inside each step (the reduction; the hooks'
counting is inside the forward) is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_step_overhead import bare_step, batches  # noqa: E402
from megatron_minitron.config import preset  # noqa: E402
from megatron_minitron.runtime import ParallelConfig, initialize, shutdown  # noqa: E402
from megatron_minitron.training.loop import TrainConfig, build_trainer, lm_task, train_step  # noqa: E402
from megatron_minitron.training.moe_stats import router_stats  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="small-moe")
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe_train_step.json"))
    args = parser.parse_args()

    runtime = initialize(ParallelConfig(expert_parallel=args.ep))
    arch = preset(args.arch)
    cfg = TrainConfig(train_iters=10 * (args.steps + args.warmup), micro_batch_size=args.micro_batch_size,
                      global_batch_size=args.global_batch_size, seq_length=args.seq_length, lr_warmup_iters=1)
    trainer = build_trainer(arch, runtime, cfg)
    task = lm_task(runtime.device)
    data = batches(args.micro_batch_size, args.seq_length, arch.vocab_size)
    times: dict[str, list[float]] = {"bare": [], "ours": [], "stats": []}

    def timed(stats):
        reduce = stats.reduce

        def timed_reduce(*a, **k):
            start = time.perf_counter()
            try:
                return reduce(*a, **k)
            finally:
                times["stats"].append(time.perf_counter() - start)

        stats.reduce = timed_reduce
        return stats

    for i in range(args.warmup + args.steps):
        for name in ("bare", "ours") if i % 2 == 0 else ("ours", "bare"):
            if name == "bare":
                trainer.moe_stats.remove()
            else:
                trainer.moe_stats = timed(router_stats(trainer.model, arch, runtime, cfg.moe_aux_loss_coeff))
            torch.distributed.barrier()
            start = time.perf_counter()
            if name == "bare":
                bare_step(trainer, task.forward_step, data)
            else:
                train_step(trainer, task, data)
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    times["stats"] = times["stats"][args.warmup:]
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"arch": args.arch, "ep": args.ep, "world_size": runtime.world_size, "device": runtime.device.type,
              "steps": args.steps, "tokens_per_step": args.global_batch_size * args.seq_length,
              "active_parameters": arch.num_active_parameters(), "parameters": arch.num_parameters(),
              "median_step_s": {"bare": medians["bare"], "ours": medians["ours"]},
              "median_router_stats_s": medians["stats"], "router_stats_share": medians["stats"] / medians["ours"],
              "ratio_ours_over_bare": medians["ours"] / medians["bare"], "target": 1.05}
    if runtime.rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    shutdown()


if __name__ == "__main__":
    main()
