"""Distillation with Mixture-of-Experts models in one 2-process torchrun launch (run by
tests/distill/test_distill_moe_multirank.py, which compares the results).

Random `tiny-moe` and `tiny` teachers and students (the MoE student has narrower experts). Phase
`layouts`: MoE teacher -> MoE student, dense teacher -> MoE student and MoE teacher -> dense student,
3 steps each at EP1 (DP2) and at EP2 (DP2, experts split over the two ranks) from the same weights and
data. Phase `resume`: MoE -> MoE at EP2 with the distributed optimizer, 6 steps straight vs 3, stop,
resume 3 (a different seed for the resumed process); both runs save their final weights.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/multirank/distill_moe.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron.config import preset  # noqa: E402
from megatron_minitron.distill.loop import DistillConfig, build, distill_task  # noqa: E402
from megatron_minitron.model import checkpoint as ckpt  # noqa: E402
from megatron_minitron.model.build import build_model  # noqa: E402
from megatron_minitron.runtime import ParallelConfig, initialize, set_seed, shutdown  # noqa: E402
from megatron_minitron.training.loop import RunPaths, TrainConfig, init_from, train, train_step  # noqa: E402
from tests.multirank import synthetic  # noqa: E402

MODELS = {"moe_teacher": preset("tiny-moe"), "dense_teacher": preset("tiny"),
          "moe_student": preset("tiny-moe", moe_ffn_hidden_size=32), "dense_student": preset("tiny", ffn_hidden_size=96)}
COMBOS = {"moe_moe": ("moe_teacher", "moe_student"), "dense_moe": ("dense_teacher", "moe_student"),
          "moe_dense": ("moe_teacher", "dense_student")}
SEQ, MBS, GBS, STEPS = 32, 2, 8, 3
DCFG = DistillConfig(lm_weight=0.5)
REPORTED = ("loss", "kd loss", "lm loss", "moe aux loss", "moe expert load", "grad_norm")


def train_cfg(**overrides) -> TrainConfig:
    base = dict(train_iters=STEPS, micro_batch_size=MBS, global_batch_size=GBS, seq_length=SEQ, lr_warmup_iters=1,
                log_interval=100, eval_interval=0, eval_iters=1, lr=3e-3, moe_aux_loss_coeff=0.05)
    return TrainConfig(**{**base, **overrides})


def batches_for(rt, start: int = 0):
    return synthetic.batches(start, micro_batch_size=MBS, dp_rank=rt.dp_rank, dp_size=rt.data_parallel,
                             seq_length=SEQ, vocab=1000, seed=4)


def setup(out: Path) -> dict:
    rt = initialize(ParallelConfig(), seed=7)
    for i, (name, arch) in enumerate(MODELS.items()):
        set_seed(7 + i)
        ckpt.save_checkpoint(out / name, model=build_model(arch, rt), arch=arch, runtime=rt, iteration=None)
    return {name: ckpt.resolve(out / name) for name in MODELS}


def phase_layouts(out: Path, infos: dict) -> None:
    results = {}
    for combo, (t, s) in COMBOS.items():
        for ep in (1, 2):
            rt = initialize(ParallelConfig(expert_parallel=ep), seed=5)
            trainer, pairs = build(infos[t], infos[s], rt, train_cfg(), DCFG)
            init_from(trainer, infos[s].root)
            task = distill_task(rt, DCFG, trainer.chunks[0], pairs)
            data = batches_for(rt)
            records = [train_step(trainer, task, data) for _ in range(STEPS)]
            trainer.chunks[0].close()
            results[f"{combo}_ep{ep}"] = [{k: r[k] for k in REPORTED if k in r} for r in records]
    if torch.distributed.get_rank() == 0:
        (out / "layouts.json").write_text(json.dumps(results))


def phase_resume(out: Path, infos: dict) -> None:
    teacher, student = infos["moe_teacher"], infos["moe_student"]
    records: dict[str, list] = {}
    for name, exit_interval, seed in (("full", None, 11), ("split", 3, 11), ("split", None, 999)):
        rt = initialize(ParallelConfig(expert_parallel=2), seed=seed)
        cfg = train_cfg(train_iters=6, exit_interval=exit_interval, use_distributed_optimizer=True)
        trainer, pairs = build(teacher, student, rt, cfg, DCFG)
        save = out / f"resume_{name}"
        if ckpt.latest_iteration(save) is None:
            init_from(trainer, student.root)
        task = distill_task(rt, DCFG, trainer.chunks[0], pairs)
        got = train(trainer, task=task, train_batches=lambda s: batches_for(rt, s), valid_batches=None,
                    paths=RunPaths(save=save, metrics=save / "metrics.jsonl"))
        trainer.chunks[0].close()
        records.setdefault(name, []).extend({k: r[k] for k in REPORTED} for r in got)
    if torch.distributed.get_rank() == 0:
        (out / "resume.json").write_text(json.dumps(records))


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    models = setup(out_dir)
    phase_layouts(out_dir, models)
    phase_resume(out_dir, models)
    torch.distributed.barrier()
    shutdown()
