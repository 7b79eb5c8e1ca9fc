"""Distillation step time vs (student training step + teacher forward-only step) on the same batch
(target: ratio <= 1.10), and peak memory vs the sum of the two separate peaks.

    torchrun --nproc-per-node 2 benchmarks/distill_overhead.py --tp 2                 # time
    torchrun --nproc-per-node 2 benchmarks/distill_overhead.py --tp 2 --memory MODE   # MODE: distill, student, teacher
    torchrun --nproc-per-node 2 benchmarks/distill_overhead.py --moe --ep 2           # MoE teacher and student

Teacher: the `small` preset (10.5M); student: its width-pruned shape (hidden 192, ffn 384), both
random. With --moe: the `small-moe` teacher (8 experts, top-2) and a student with hidden 192 and
experts of width 128; the baseline's student step then carries the same router aux loss and
statistics as the distillation step (sequence parallelism is switched on at TP > 1, as MoE needs).
Time mode runs --steps rounds of one baseline and one distillation step on the same batch, the
order swapped every round (after one warm-up round), and compares the medians; the median of the
rounds' own ratios and every step's seconds are kept too.
Memory mode runs one kind of step in a fresh launch and reports the peak RSS above what the process
held before building models (run it once per MODE). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_minitron.config import preset  # noqa: E402
from megatron_minitron.distill.loop import ADAPTERS, DistillConfig, build, distill_task  # noqa: E402
from megatron_minitron.importance.run import forward_passes  # noqa: E402
from megatron_minitron.model import checkpoint as ckpt  # noqa: E402
from megatron_minitron.model.build import build_model  # noqa: E402
from megatron_minitron.runtime.host_memory import peak_rss_mb  # noqa: E402
from megatron_minitron.runtime import ParallelConfig, initialize, shutdown  # noqa: E402
from megatron_minitron.training.loop import TrainConfig, build_trainer, init_from, lm_task, train_step  # noqa: E402


def batches(mbs: int, seq: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    while True:
        t = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        yield {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(mbs, seq),
               "position_ids": torch.arange(seq).expand(mbs, seq)}


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (with --moe)")
    parser.add_argument("--moe", action="store_true", help="MoE teacher and student (small-moe)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--memory", choices=["distill", "student", "teacher"], default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rt = initialize(ParallelConfig(tensor_parallel=args.tp, expert_parallel=args.ep,
                                   sequence_parallel=args.moe and args.tp > 1))
    teacher_arch = preset("small-moe" if args.moe else "small")
    student_arch = teacher_arch.replace(hidden_size=192, ffn_hidden_size=384, kv_channels=teacher_arch.head_dim,
                                        **({"moe_ffn_hidden_size": 128} if args.moe else {}))
    cfg = TrainConfig(train_iters=100, micro_batch_size=4, global_batch_size=4 * rt.data_parallel, seq_length=256,
                      lr_warmup_iters=1)
    tmp = Path(tempfile.mkdtemp(prefix="distill-bench-")) if rt.rank == 0 else None
    paths = [str(tmp) if tmp else None]
    torch.distributed.broadcast_object_list(paths, src=0)
    root = Path(paths[0])
    for name, arch in (("teacher", teacher_arch), ("student", student_arch)):
        ckpt.save_checkpoint(root / name, model=build_model(arch, rt), arch=arch, runtime=rt, iteration=None)
    teacher, student = ckpt.resolve(root / "teacher"), ckpt.resolve(root / "student")
    data = batches(cfg.micro_batch_size, cfg.seq_length, teacher_arch.vocab_size)
    base_rss = current_rss_mb()

    def distill_setup():
        trainer, pairs = build(teacher, student, rt, cfg, DistillConfig())
        init_from(trainer, student.root, optional_prefixes=(ADAPTERS + ".",))
        return trainer, distill_task(rt, DistillConfig(), trainer.chunks[0], pairs)

    def baseline_setup():
        trainer = build_trainer(student_arch, rt, cfg)
        t_model = build_model(teacher_arch, rt)
        ckpt.load_checkpoint(teacher, model=t_model)
        return trainer, t_model

    def baseline_step(trainer, t_model, batch):
        train_step(trainer, lm_task(rt.device), iter([batch]))
        forward_passes(t_model, rt, [batch], [cfg.micro_batch_size], cfg.seq_length)

    result = {"tp": args.tp, "ep": args.ep, "moe": args.moe, "teacher_params": teacher_arch.num_parameters(),
              "student_params": student_arch.num_parameters()}
    if args.memory:
        if args.memory == "distill":
            trainer, task = distill_setup()
            for _ in range(args.steps):
                train_step(trainer, task, iter([next(data)]))
        elif args.memory == "student":
            trainer = build_trainer(student_arch, rt, cfg)
            for _ in range(args.steps):
                train_step(trainer, lm_task(rt.device), iter([next(data)]))
        else:
            t_model = build_model(teacher_arch, rt)
            ckpt.load_checkpoint(teacher, model=t_model)
            for _ in range(args.steps):
                forward_passes(t_model, rt, [next(data)], [cfg.micro_batch_size], cfg.seq_length)
        result.update(mode=args.memory, peak_rss_above_start_mb=peak_rss_mb() - base_rss)
    else:
        trainer, task = distill_setup()
        b_trainer, t_model = baseline_setup()
        times = {"distill": [], "baseline": []}
        for step in range(args.steps + 1):
            batch = next(data)
            for name in ("baseline", "distill") if step % 2 == 0 else ("distill", "baseline"):
                rt.barrier()
                start = time.perf_counter()
                if name == "distill":
                    train_step(trainer, task, iter([batch]))
                else:
                    baseline_step(b_trainer, t_model, batch)
                rt.barrier()
                if step:  # the first round warms up both
                    times[name].append(time.perf_counter() - start)
        median = {k: statistics.median(v) for k, v in times.items()}
        result.update(distill_step_s=median["distill"], baseline_step_s=median["baseline"],
                      ratio=median["distill"] / median["baseline"], target_ratio=1.10, steps=args.steps,
                      pair_ratio_median=statistics.median(d / b for d, b in zip(times["distill"], times["baseline"])),
                      seconds=times)
    if rt.rank == 0:
        print(json.dumps(result, indent=2))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    shutdown()


if __name__ == "__main__":
    main()
