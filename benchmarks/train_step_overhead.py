"""Training step of our loop vs a bare megatron forward-backward-optimizer step (target: ratio <= 1.05).

    python benchmarks/train_step_overhead.py                                        # one process
    torchrun --nproc-per-node 2 benchmarks/train_step_overhead.py --tp 2
    torchrun --nproc-per-node 2 benchmarks/train_step_overhead.py --arch small-moe --ep 2   # DP2 x EP2

Both sides use the same model object, optimizer and batches; steps alternate (bare, ours, bare, ...)
so machine noise hits both alike, and the ratio of median step times is reported. Writes JSON to
--out (default benchmarks/results/train_step_overhead.json, or moe_train_step.json for a
Mixture-of-Experts model).

On a MoE model megatron's router adds its auxiliary loss on both sides; ours also counts each expert's
tokens and reduces the router statistics over the ranks (training/moe_stats.py). The router hooks are
detached during the bare steps, and the time of that reduction inside our steps is reported beside the
ratio (on a shared machine the ratio itself moves by +-10% from run to run).
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

from megatron_minitron.config import preset  # noqa: E402
from megatron_minitron.runtime import ParallelConfig, initialize, shutdown  # noqa: E402
from megatron_minitron.training.loop import TrainConfig, build_trainer, lm_task, train_step  # noqa: E402
from megatron_minitron.training.moe_stats import router_stats  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def batches(micro_batch_size: int, seq_length: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    while True:
        toks = torch.randint(0, vocab, (micro_batch_size, seq_length + 1), generator=g)
        yield {"tokens": toks[:, :-1], "labels": toks[:, 1:], "loss_mask": torch.ones(micro_batch_size, seq_length),
               "position_ids": torch.arange(seq_length).expand(micro_batch_size, seq_length)}


def bare_step(trainer, forward_step, data) -> None:
    """What any megatron training step must do: zero grads, forward-backward, optimizer step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=data, model=trainer.model,
                                num_microbatches=trainer.cfg.num_microbatches(trainer.runtime.data_parallel),
                                seq_length=trainer.cfg.seq_length, micro_batch_size=trainer.cfg.micro_batch_size)
    trainer.optimizer.step()


class RouterStatsTimer:
    """Attaches our router statistics for our steps only, and times their reduction (MoE models)."""

    def __init__(self, trainer, arch, runtime) -> None:
        self.trainer, self.arch, self.runtime = trainer, arch, runtime
        self.seconds: list[float] = []

    def bare(self) -> None:
        if self.trainer.moe_stats is not None:
            self.trainer.moe_stats.remove()

    def ours(self) -> None:
        stats = router_stats(self.trainer.model, self.arch, self.runtime, self.trainer.cfg.moe_aux_loss_coeff)
        if stats is not None:
            reduce = stats.reduce

            def timed_reduce(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return reduce(*args, **kwargs)
                finally:
                    self.seconds.append(time.perf_counter() - start)

            stats.reduce = timed_reduce
        self.trainer.moe_stats = stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="small")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    arch = preset(args.arch)
    runtime = initialize(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, expert_parallel=args.ep,
                                        sequence_parallel=arch.is_moe and args.tp > 1))  # MoE at TP>1 needs SP
    cfg = TrainConfig(train_iters=10 * (args.steps + args.warmup), micro_batch_size=args.micro_batch_size,
                      global_batch_size=args.global_batch_size, seq_length=args.seq_length, lr_warmup_iters=1)
    trainer = build_trainer(arch, runtime, cfg)
    task = lm_task(runtime.device)
    data = batches(args.micro_batch_size, args.seq_length, arch.vocab_size)
    router = RouterStatsTimer(trainer, arch, runtime)
    times: dict[str, list[float]] = {"bare": [], "ours": []}
    for i in range(args.warmup + args.steps):
        for name in ("bare", "ours") if i % 2 == 0 else ("ours", "bare"):
            getattr(router, name)()
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
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"arch": args.arch, "tp": args.tp, "pp": args.pp, "ep": args.ep, "world_size": runtime.world_size,
              "device": runtime.device.type, "steps": args.steps,
              "tokens_per_step": args.global_batch_size * args.seq_length,
              "parameters": arch.num_parameters(), "active_parameters": arch.num_active_parameters(),
              "median_step_s": medians, "ratio_ours_over_bare": medians["ours"] / medians["bare"], "target": 1.05}
    if arch.is_moe:
        stats = statistics.median(router.seconds[args.warmup:])
        result.update(median_router_stats_s=stats, router_stats_share=stats / medians["ours"])
    if runtime.rank == 0:
        out = Path(args.out or RESULTS / ("moe_train_step.json" if arch.is_moe else "train_step_overhead.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    shutdown()


if __name__ == "__main__":
    main()
