"""Distillation at several layouts, in one 4-process torchrun launch (run by
tests/distill/test_distill_multirank.py, which compares the results).

A random `tiny` teacher and its width-pruned student (hidden 64 -> 48, ffn 192 -> 96, so the
intermediate losses need projections); 10 steps of KD + intermediate losses (pairs 1:1 on the first
pipeline stage and 3:3 on the last) at every layout from the same weights and data; then an
interrupted-and-resumed run against an uninterrupted one.

    python -m torch.distributed.run --standalone --nproc-per-node 4 tests/multirank/distill_layouts.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron.config import preset  # noqa: E402
from megatron_minitron.distill.loop import ADAPTERS, DistillConfig, build, distill_task  # noqa: E402
from megatron_minitron.model import checkpoint as ckpt  # noqa: E402
from megatron_minitron.model.build import build_model, unwrap  # noqa: E402
from megatron_minitron.plan import Target, random_plan  # noqa: E402
from megatron_minitron.prune.rewrite import prune_checkpoint  # noqa: E402
from megatron_minitron.runtime import ParallelConfig, initialize, shutdown  # noqa: E402
from megatron_minitron.training.loop import RunPaths, TrainConfig, init_from, train, train_step  # noqa: E402
from tests.multirank import synthetic  # noqa: E402

ARCH = preset("tiny")
SEQ, MBS, GBS, STEPS = 32, 2, 8, 10
DCFG = DistillConfig(intermediate_layers=("1:1", "3:3"), lm_weight=0.5)
LAYOUTS = {
    "dp4": ParallelConfig(),
    "tp2_dp2": ParallelConfig(tensor_parallel=2),
    "pp2_dp2": ParallelConfig(pipeline_parallel=2),
    "tp2_pp2": ParallelConfig(tensor_parallel=2, pipeline_parallel=2),
    "tp2_sp_dp2": ParallelConfig(tensor_parallel=2, sequence_parallel=True),
}
REPORTED = ("loss", "kd loss", "lm loss", "intermediate loss", "grad_norm")


def train_cfg(**overrides) -> TrainConfig:
    base = dict(train_iters=STEPS, micro_batch_size=MBS, global_batch_size=GBS, seq_length=SEQ, lr_warmup_iters=1,
                log_interval=100, eval_interval=0, eval_iters=1, lr=3e-3)
    return TrainConfig(**{**base, **overrides})


def batches_for(rt, start: int = 0):
    return synthetic.batches(start, micro_batch_size=MBS, dp_rank=rt.dp_rank, dp_size=rt.data_parallel,
                             seq_length=SEQ, vocab=ARCH.vocab_size, seed=2)


def setup(out: Path):
    rt = initialize(ParallelConfig(tensor_parallel=2), seed=7)
    ckpt.save_checkpoint(out / "teacher", model=build_model(ARCH, rt), arch=ARCH, runtime=rt, iteration=None)
    if rt.rank == 0:
        plan = random_plan(ARCH.explicit(), Target(hidden_size=48, ffn_hidden_size=96), seed=3)
        prune_checkpoint(out / "teacher", plan, out / "student", print_fn=lambda _: None)
    torch.distributed.barrier()
    return ckpt.resolve(out / "teacher"), ckpt.resolve(out / "student")


def layouts(out: Path, teacher, student) -> None:
    for name, parallel in LAYOUTS.items():
        rt = initialize(parallel, seed=5)
        trainer, pairs = build(teacher, student, rt, train_cfg(), DCFG)
        init_from(trainer, student.root, optional_prefixes=(ADAPTERS + ".",))
        task = distill_task(rt, DCFG, trainer.chunks[0], pairs)
        t_model = trainer.chunks[0].teacher
        before = {k: v.clone() for k, v in t_model.state_dict().items() if torch.is_tensor(v)}
        data = batches_for(rt)
        records = [train_step(trainer, task, data) for _ in range(STEPS)]
        teacher_ids = {id(p) for p in t_model.parameters()}
        optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
        student_gpt = unwrap(trainer.model[0])
        checks = {
            "teacher_unchanged": all(torch.equal(before[k], v) for k, v in t_model.state_dict().items()
                                     if torch.is_tensor(v)),
            "teacher_has_no_grads": all(p.grad is None and not p.requires_grad for p in t_model.parameters()),
            "teacher_not_optimized": not any(id(p) in teacher_ids for p in optimized),
            "optimized_params": len(optimized),
            "student_params": sum(1 for _ in student_gpt.parameters()),
            "adapters_here": sorted(getattr(student_gpt, ADAPTERS, {}).keys()),
        }
        gathered = [None] * rt.world_size
        torch.distributed.all_gather_object(gathered, checks)
        if rt.rank == 0:
            (out / f"distill_{name}.json").write_text(json.dumps(
                {"steps": [{k: r[k] for k in REPORTED} for r in records], "ranks": gathered}))
        torch.distributed.barrier()


def resume(out: Path, teacher, student) -> None:
    """6 steps straight vs 3, stop, resume 3 (TP2 x DP2 with the distributed optimizer; the
    intermediate-loss weights carry over)."""
    losses = {}
    for name, exit_interval, seed in (("full", None, 11), ("split", 3, 11), ("split", None, 999)):
        rt = initialize(ParallelConfig(tensor_parallel=2), seed=seed)
        cfg = train_cfg(train_iters=6, exit_interval=exit_interval, use_distributed_optimizer=True)
        trainer, pairs = build(teacher, student, rt, cfg, DCFG)
        save = out / f"resume_{name}"
        if ckpt.latest_iteration(save) is None:
            init_from(trainer, student.root, optional_prefixes=(ADAPTERS + ".",))
        task = distill_task(rt, DCFG, trainer.chunks[0], pairs)
        records = train(trainer, task=task, train_batches=lambda s: batches_for(rt, s), valid_batches=None,
                        paths=RunPaths(save=save, metrics=save / "metrics.jsonl"))
        losses.setdefault(name, []).extend([r["loss"], r["intermediate loss"]] for r in records)
    if torch.distributed.get_rank() == 0:
        (out / "resume.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    teacher_info, student_info = setup(out_dir)
    layouts(out_dir, teacher_info, student_info)
    resume(out_dir, teacher_info, student_info)
    torch.distributed.barrier()
    shutdown()
