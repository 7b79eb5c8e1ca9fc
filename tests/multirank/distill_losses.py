"""Two ranks hold halves of the vocabulary and compute the distillation losses over a gloo group; run
once by tests/distill/test_losses_multirank.py, which compares with the single-process reference.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/multirank/distill_losses.py OUT

Every rank builds the same full logits from one seed, keeps its slice [rank * V/2, (rank + 1) * V/2),
and saves (per-token losses, gradient of its slice) per case to OUT/rank{r}.pt. No megatron here: the
losses take an explicit group and need nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron.distill.losses import (reported_cross_entropy, top_k_kl, vocab_parallel_kl,  # noqa: E402
                                              vocab_parallel_kl_and_lm)

SHAPE = (6, 3, 40)  # [s, b, V]: padded vocabulary 40, 20 per rank
CASES = {  # name: (function, keyword arguments, dtype)
    "forward": (vocab_parallel_kl, dict(chunk_size=4), torch.float64),
    "forward_t2_scaled": (vocab_parallel_kl, dict(temperature=2.0, scale_by_temperature_squared=True, chunk_size=5),
                          torch.float64),
    "reverse": (vocab_parallel_kl, dict(reverse=True, chunk_size=4), torch.float64),
    "reverse_fp32": (vocab_parallel_kl, dict(reverse=True, temperature=2.0), torch.float32),
    "top_k_5": (top_k_kl, dict(k=5, chunk_size=4), torch.float64),  # k < V_local
    "top_k_30_reverse": (top_k_kl, dict(k=30, reverse=True, temperature=2.0), torch.float64),  # k > V_local
}


def inputs(dtype: torch.dtype):
    """Full student and teacher logits and an upstream gradient, identical on every rank."""
    g = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(*SHAPE, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    return student.to(dtype), teacher.to(dtype), torch.randn(SHAPE[:-1], generator=g, dtype=torch.float64)


def run_case(fn, kwargs: dict, dtype: torch.dtype, rank: int, world: int, group) -> dict:
    student, teacher, upstream = inputs(dtype)
    width = SHAPE[-1] // world
    local = student[..., rank * width:(rank + 1) * width].clone().requires_grad_(True)
    loss = fn(local, teacher[..., rank * width:(rank + 1) * width], group=group, **kwargs)
    (loss * upstream).sum().backward()
    return {"loss": loss.detach(), "grad": local.grad}


def labels() -> torch.Tensor:
    """Labels over the whole vocabulary, identical on every rank (so each rank holds some of them)."""
    return torch.randint(0, SHAPE[-1], SHAPE[:-1], generator=torch.Generator().manual_seed(1))


def run_cross_entropy(rank: int, world: int, group) -> torch.Tensor:
    student, _, _ = inputs(torch.float32)
    width = SHAPE[-1] // world
    return reported_cross_entropy(student[..., rank * width:(rank + 1) * width], labels(), group=group, chunk_size=3)


def run_kl_and_lm(rank: int, world: int, group) -> dict:
    """The student's LM loss that rides on the KL's pass, at τ = 1 and 2 (it is the τ = 1 loss at both)."""
    student, teacher, _ = inputs(torch.float32)
    width = SHAPE[-1] // world
    mine = slice(rank * width, (rank + 1) * width)
    return {temperature: vocab_parallel_kl_and_lm(student[..., mine], teacher[..., mine], labels(), group=group,
                                                  temperature=temperature, chunk_size=4)[1]
            for temperature in (1.0, 2.0)}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        group = dist.new_group(list(range(world)))  # an explicit group, not WORLD, as TP would pass
        results = {name: run_case(fn, kwargs, dtype, rank, world, group) for name, (fn, kwargs, dtype) in CASES.items()}
        results["cross_entropy"] = run_cross_entropy(rank, world, group)
        results["kl_and_lm"] = run_kl_and_lm(rank, world, group)
        torch.save(results, out / f"rank{rank}.pt")
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group()
