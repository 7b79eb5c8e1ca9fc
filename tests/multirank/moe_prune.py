"""Pruning Mixture-of-Experts checkpoints at EP2 x TP2, run once under torchrun by
tests/prune/test_moe_prune_multirank.py.

4 processes, phases: `sources` saves two perturbed tiny MoE models (every layer MoE, stacked keys; a dense
first layer + shared expert, per-layer keys) at EP2 x TP2 (+SP); `prune` rewrites each with a random plan
of experts, expert widths, shared width, hidden channels and layers, the four ranks sharing the work;
`reload` loads every pruned checkpoint at EP2 x TP2 (+SP), saves it again and writes the logits of one
batch, and loads it at EP2 x PP2 for the same logits.

    python -m torch.distributed.run --standalone --nproc-per-node 4 tests/multirank/moe_prune.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron.config import preset  # noqa: E402
from megatron_minitron.plan import Plan, Target, random_plan  # noqa: E402
from megatron_minitron.runtime import ParallelConfig  # noqa: E402

ARCHS = {"stacked": preset("tiny-moe"),
         "mixed": preset("tiny-moe", moe_layer_freq=(0, 1, 1, 1), moe_shared_expert_ffn_hidden_size=32)}
TARGETS = {"stacked": Target(num_experts=2, moe_ffn_hidden_size=32, hidden_size=48, num_layers=3),
           "mixed": Target(num_experts=2, moe_ffn_hidden_size=32, moe_shared_expert_ffn_hidden_size=16,
                           ffn_hidden_size=96, hidden_size=48, drop_layers=(2,))}
LAYOUTS = {"ep2_tp2": ParallelConfig(tensor_parallel=2, sequence_parallel=True, expert_parallel=2),
           "ep2_pp2": ParallelConfig(pipeline_parallel=2, expert_parallel=2, first_stage_layers=2)}  # 3 layers: 2 + 1
TOKENS = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(3))


def plan_for(name: str) -> Plan:
    return random_plan(ARCHS[name], TARGETS[name], seed=7, tensor_parallel=2, expert_parallel=2)


def phase_sources(out: Path) -> None:
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.model.build import build_model
    from megatron_minitron.runtime import initialize

    for name, arch in ARCHS.items():
        rt = initialize(LAYOUTS["ep2_tp2"], seed=5)
        model = build_model(arch, rt)
        gen = torch.Generator().manual_seed(100 + rt.rank)
        with torch.no_grad():  # norms of ones would hide slicing mistakes
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        ckpt.save_checkpoint(out / f"src_{name}", model=model, arch=arch, runtime=rt, iteration=3)


def phase_prune(out: Path) -> None:
    import torch.distributed as dist

    from megatron_minitron.prune.rewrite import prune_checkpoint

    for name in ARCHS:
        prune_checkpoint(out / f"src_{name}", plan_for(name), out / f"pruned_{name}", group=dist.group.WORLD,
                         chunk_bytes=6000, print_fn=lambda s: None)


def phase_reload(out: Path) -> None:
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.forward import forward_logits
    from megatron_minitron.runtime import initialize

    positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
    for name in ARCHS:
        info = ckpt.resolve(out / f"pruned_{name}")
        for layout, parallel in LAYOUTS.items():
            rt = initialize(parallel)
            model = build_model(info.arch, rt)
            ckpt.load_checkpoint(info, model=model)
            logits = forward_logits(model, TOKENS, positions, rt)
            if rt.is_logging_rank:
                torch.save(logits, out / f"logits_{name}_{layout}.pt")
            if layout == "ep2_tp2":
                ckpt.save_checkpoint(out / f"resaved_{name}", model=model, arch=info.arch, runtime=rt, iteration=None)


if __name__ == "__main__":
    import torch.distributed as dist

    from megatron_minitron.runtime import shutdown

    out_dir = Path(sys.argv[1])
    for phase in ("sources", "prune", "reload"):
        globals()[f"phase_{phase}"](out_dir)
        dist.barrier()
    shutdown()
