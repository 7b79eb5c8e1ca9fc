"""Mixture-of-Experts models across parallel layouts, run under torchrun by tests/test_moe_multirank.py.

4 processes (phases reference, logits): two tiny MoE models (every layer MoE, stacked checkpoint keys;
and a dense first layer + shared expert, per-layer keys) are trained 3 steps at EP2 (DP4) and saved;
then each is loaded at EP1, EP2, EP4, TP2+SP, TP2+SP x EP2, PP2 and EP2 x PP2 and gives the logits of one
batch; at EP1 x TP2 (+SP) each is saved again.

2 processes (phases step, resume): one training step at DP2 x EP2 from the 4-process reference (the
pytest side takes the same step at DP1 x EP1 in-process), and 6 steps straight vs 3, stop, resume 3
at EP2 with the distributed optimizer.

    python -m torch.distributed.run --standalone --nproc-per-node 4 tests/multirank/moe_layouts.py OUT reference,logits
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/multirank/moe_layouts.py OUT step,resume
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron.config import preset  # noqa: E402
from megatron_minitron.model import checkpoint as ckpt  # noqa: E402
from megatron_minitron.model.build import build_model  # noqa: E402
from megatron_minitron.model.forward import forward_logits  # noqa: E402
from megatron_minitron.runtime import ParallelConfig, initialize, shutdown  # noqa: E402
from megatron_minitron.training.loop import (RunPaths, TrainConfig, build_trainer, init_from, lm_task,  # noqa: E402
                                             train, train_step)
from tests.multirank import synthetic  # noqa: E402

ARCHS = {"stacked": preset("tiny-moe"),
         "mixed": preset("tiny-moe", moe_layer_freq=(0, 1, 1, 1), moe_shared_expert_ffn_hidden_size=32)}
SEQ, MBS, GBS = 32, 2, 8
LOGIT_LAYOUTS = {
    "ep1": ParallelConfig(),
    "ep2": ParallelConfig(expert_parallel=2),
    "ep4": ParallelConfig(expert_parallel=4),
    "tp2_sp": ParallelConfig(tensor_parallel=2, sequence_parallel=True),
    "tp2_sp_ep2": ParallelConfig(tensor_parallel=2, sequence_parallel=True, expert_parallel=2),
    "pp2": ParallelConfig(pipeline_parallel=2),
    "ep2_pp2": ParallelConfig(pipeline_parallel=2, expert_parallel=2),
}


def batches_for(runtime, arch, start: int = 0, seed: int = 0):
    return synthetic.batches(start, micro_batch_size=MBS, dp_rank=runtime.dp_rank, dp_size=runtime.data_parallel,
                             seq_length=SEQ, vocab=arch.vocab_size, seed=seed)


def train_cfg(**overrides) -> TrainConfig:
    base = dict(train_iters=6, micro_batch_size=MBS, global_batch_size=GBS, seq_length=SEQ, lr_warmup_iters=1,
                log_interval=100, eval_interval=0, eval_iters=1, lr=3e-3, moe_aux_loss_coeff=0.01)
    return TrainConfig(**{**base, **overrides})


def run(trainer, runtime, arch, save: Path, seed: int = 0) -> list[dict]:
    return train(trainer, task=lm_task(runtime.device), train_batches=lambda s: batches_for(runtime, arch, s, seed),
                 valid_batches=None, paths=RunPaths(save=save, metrics=save / "metrics.jsonl"))


def phase_reference(out: Path) -> None:
    for name, arch in ARCHS.items():
        rt = initialize(ParallelConfig(expert_parallel=2), seed=7)
        run(build_trainer(arch, rt, train_cfg(train_iters=3)), rt, arch, out / f"reference_{name}")


def phase_logits(out: Path) -> None:
    tokens = torch.stack([synthetic.sample(10_000 + i, SEQ, 1000)[:-1] for i in range(2)])
    positions = torch.arange(SEQ).expand(2, SEQ)
    for name in ARCHS:
        info = ckpt.resolve(out / f"reference_{name}")
        for layout, parallel in LOGIT_LAYOUTS.items():
            rt = initialize(parallel)
            model = build_model(info.arch, rt)
            ckpt.load_checkpoint(info, model=model)
            logits = forward_logits(model, tokens, positions, rt)
            if rt.is_logging_rank:
                torch.save(logits, out / f"logits_{name}_{layout}.pt")
            if layout == "tp2_sp":  # EP1 x TP2
                ckpt.save_checkpoint(out / f"resaved_{name}_tp2", model=model, arch=info.arch, runtime=rt,
                                     iteration=None)


def phase_step(out: Path) -> None:
    """One step at DP2 x EP2 from the reference (the global batch of seed 3)."""
    rt = initialize(ParallelConfig(expert_parallel=2))
    arch = ARCHS["mixed"]
    trainer = build_trainer(arch, rt, train_cfg(lr_warmup_iters=0, train_iters=2))
    init_from(trainer, out / "reference_mixed")
    result = train_step(trainer, lm_task(rt.device), batches_for(rt, arch, seed=3))
    ckpt.save_checkpoint(out / "step_dp2_ep2", model=trainer.model[0], arch=arch, runtime=rt, iteration=1)
    if rt.rank == 0:
        (out / "step_dp2_ep2.json").write_text(json.dumps(result))


def phase_resume(out: Path) -> None:
    arch, parallel = ARCHS["mixed"], ParallelConfig(expert_parallel=2)
    records = {}
    rt = initialize(parallel, seed=11)
    records["full"] = run(build_trainer(arch, rt, train_cfg(use_distributed_optimizer=True)), rt, arch,
                          out / "full_ep2", seed=5)
    rt = initialize(parallel, seed=11)
    first = run(build_trainer(arch, rt, train_cfg(use_distributed_optimizer=True, exit_interval=3)), rt, arch,
                out / "split_ep2", seed=5)
    rt = initialize(parallel, seed=999)  # a different seed: everything must come from the checkpoint
    second = run(build_trainer(arch, rt, train_cfg(use_distributed_optimizer=True)), rt, arch, out / "split_ep2",
                 seed=5)
    records["split"] = first + second
    if rt.rank == 0:
        keep = ("lm loss", "moe aux loss", "moe expert load", "grad_norm")
        (out / "resume_ep2.json").write_text(json.dumps(
            {k: [{n: r[n] for n in keep} for r in v] for k, v in records.items()}))


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    for phase in sys.argv[2].split(","):
        globals()[f"phase_{phase}"](out_dir)
        torch.distributed.barrier()
    shutdown()
