"""Logits of imported Hugging Face models at TP2 (x DP2) and TP2xPP2, and for the Mixture-of-Experts cases at
EP2 (x DP4), TP2+SP (x DP2) and TP2xPP2+SP, in one 4-process torchrun launch (run by
tests/hf/test_hf_multirank.py, which compares them with transformers' logits).

    python -m torch.distributed.run --standalone --nproc-per-node 4 tests/multirank/hf_layouts.py OUT NAME=CKPT ...
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron.model import checkpoint as ckpt  # noqa: E402
from megatron_minitron.model.build import build_model  # noqa: E402
from megatron_minitron.model.forward import forward_logits  # noqa: E402
from megatron_minitron.runtime import ParallelConfig, initialize, shutdown  # noqa: E402
from tests.hf.models import MOE_CASES, TOKENS  # noqa: E402

LAYOUTS = {"tp2": ParallelConfig(tensor_parallel=2), "tp2_pp2": ParallelConfig(tensor_parallel=2, pipeline_parallel=2)}
"""Layouts of the dense cases."""

MOE_LAYOUTS = {"ep2": ParallelConfig(expert_parallel=2),
               "tp2_sp": ParallelConfig(tensor_parallel=2, sequence_parallel=True),
               "tp2_pp2_sp": ParallelConfig(tensor_parallel=2, pipeline_parallel=2, sequence_parallel=True)}
"""Layouts of the MoE cases (megatron-core's MoE layer needs sequence parallelism at TP > 1)."""


def layouts(name: str) -> dict[str, ParallelConfig]:
    return MOE_LAYOUTS if name in MOE_CASES else LAYOUTS


def main(out: Path, checkpoints: dict[str, Path]) -> None:
    positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
    for layout, parallel in {**LAYOUTS, **MOE_LAYOUTS}.items():
        rt = initialize(parallel)
        for name, path in checkpoints.items():
            if layout not in layouts(name):
                continue
            info = ckpt.resolve(path)
            model = build_model(info.arch, rt, use_te=False)
            ckpt.load_checkpoint(info, model=model)
            logits = forward_logits(model, TOKENS, positions, rt)
            if rt.is_logging_rank:
                torch.save(logits[..., :info.arch.vocab_size].cpu(), out / f"{name}_{layout}.pt")
        torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), {arg.split("=", 1)[0]: Path(arg.split("=", 1)[1]) for arg in sys.argv[2:]})
    shutdown()
