"""4-process scenarios of the foundation, run once under torchrun by tests/test_foundation_multirank.py.

Each phase re-initialises megatron's parallel state with another layout in the same processes and
writes what it computed (logits, checkpoints, loss sequences) under OUT; the pytest side compares them.

    python -m torch.distributed.run --standalone --nproc-per-node 4 tests/multirank/foundation.py OUT
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

ARCH = preset("tiny")
SEQ, MBS, GBS = 32, 2, 8
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (TP, PP); DP = 4 / (TP x PP)


def batches_for(runtime, start: int = 0, seed: int = 0):
    return synthetic.batches(start, micro_batch_size=MBS, dp_rank=runtime.dp_rank, dp_size=runtime.data_parallel,
                             seq_length=SEQ, vocab=ARCH.vocab_size, seed=seed)


def train_cfg(**overrides) -> TrainConfig:
    base = dict(train_iters=6, micro_batch_size=MBS, global_batch_size=GBS, seq_length=SEQ, lr_warmup_iters=1,
                log_interval=100, eval_interval=0, eval_iters=1, lr=3e-3)
    return TrainConfig(**{**base, **overrides})


def run(trainer, runtime, save: Path, seed: int = 0) -> list[float]:
    records = train(trainer, task=lm_task(runtime.device), train_batches=lambda s: batches_for(runtime, s, seed),
                    valid_batches=None, paths=RunPaths(save=save, metrics=save / "metrics.jsonl"))
    return [r["lm loss"] for r in records]


def phase_reference(out: Path) -> None:
    """A trained checkpoint with optimizer state, saved at TP2 (DP2)."""
    rt = initialize(ParallelConfig(tensor_parallel=2), seed=7)
    run(build_trainer(ARCH, rt, train_cfg(train_iters=3)), rt, out / "reference")


def phase_logits(out: Path) -> None:
    """Logits of one fixed batch from the reference at every layout; resave at TP1xPP2."""
    info = ckpt.resolve(out / "reference")
    tokens = torch.stack([synthetic.sample(10_000 + i, SEQ, ARCH.vocab_size)[:-1] for i in range(2)])
    positions = torch.arange(SEQ).expand(2, SEQ)
    extra = {"tp2_sp": ParallelConfig(tensor_parallel=2, sequence_parallel=True),
             "pp2_uneven": ParallelConfig(pipeline_parallel=2, first_stage_layers=1, last_stage_layers=3)}
    layouts = {f"tp{tp}_pp{pp}": ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp) for tp, pp in LAYOUTS}
    for name, parallel in {**layouts, **extra}.items():
        rt = initialize(parallel)
        model = build_model(info.arch, rt)
        ckpt.load_checkpoint(info, model=model)
        logits = forward_logits(model, tokens, positions, rt)
        if rt.is_logging_rank:
            torch.save(logits, out / f"logits_{name}.pt")
        if name == "tp1_pp2":
            ckpt.save_checkpoint(out / "resaved_tp1pp2", model=model, arch=info.arch, runtime=rt, iteration=None)


def phase_one_step(out: Path) -> None:
    """One optimizer step on the same global batch from the reference weights at every layout."""
    for tp, pp in LAYOUTS:
        rt = initialize(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
        trainer = build_trainer(ARCH, rt, train_cfg(lr_warmup_iters=0, train_iters=2))
        init_from(trainer, out / "reference")
        result = train_step(trainer, lm_task(rt.device), batches_for(rt, seed=3))
        ckpt.save_checkpoint(out / f"step_tp{tp}_pp{pp}", model=trainer.model[0], arch=ARCH, runtime=rt,
                             iteration=1)
        if rt.rank == 0:
            (out / f"step_tp{tp}_pp{pp}.json").write_text(json.dumps(result))


def phase_resume(out: Path) -> None:
    """2N steps straight vs N, stop, resume N: TP2xDP2 with the distributed optimizer, PP2xDP2 without."""
    for name, parallel, distopt in (("do_tp2", ParallelConfig(tensor_parallel=2), True),
                                    ("pp2", ParallelConfig(pipeline_parallel=2), False)):
        losses = {}
        rt = initialize(parallel, seed=11)
        losses["full"] = run(build_trainer(ARCH, rt, train_cfg(use_distributed_optimizer=distopt)), rt,
                             out / f"full_{name}", seed=5)
        rt = initialize(parallel, seed=11)
        first = run(build_trainer(ARCH, rt, train_cfg(use_distributed_optimizer=distopt, exit_interval=3)), rt,
                    out / f"split_{name}", seed=5)
        rt = initialize(parallel, seed=999)  # a different seed: everything must come from the checkpoint
        second = run(build_trainer(ARCH, rt, train_cfg(use_distributed_optimizer=distopt)), rt,
                     out / f"split_{name}", seed=5)
        losses["split"] = first + second
        if rt.rank == 0:
            (out / f"resume_{name}.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    phases = sys.argv[2].split(",") if len(sys.argv) > 2 else ["reference", "logits", "one_step", "resume"]
    for phase in phases:
        globals()[f"phase_{phase}"](out_dir)
        torch.distributed.barrier()
    shutdown()
