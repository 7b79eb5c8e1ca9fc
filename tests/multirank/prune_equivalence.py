"""4-process pruning scenarios, run once under torchrun by tests/prune/test_prune_equivalence.py.

Phases (same processes): `sources` trains nothing but saves two perturbed tiny models at TP2xPP2
(SwiGLU+RMSNorm+RoPE+GQA and GELU+LayerNorm+bias+learned positions, tied embeddings); `prune`
rewrites each with every plan of `plans()`, the four ranks sharing the work (torchrun mode of the
pruner); `logits` loads every pruned checkpoint at TP2xPP2 and writes the logits of a fixed batch.

    python -m torch.distributed.run --standalone --nproc-per-node 4 tests/multirank/prune_equivalence.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_minitron.config import ArchConfig, preset  # noqa: E402
from megatron_minitron.plan.plan import Plan, identity_plan  # noqa: E402

ARCHS = {
    "swiglu": preset("tiny", num_attention_heads=8, num_query_groups=4),
    "gelu": preset("tiny", normalization="LayerNorm", activation="gelu", position_embedding_type="learned_absolute",
                   untie_embeddings_and_output_weights=False, add_bias_linear=True, num_query_groups=None),
}
TOKENS = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(3))
PARALLEL = dict(tensor_parallel=2, pipeline_parallel=2)


def _subset(n: int, k: int, seed: int) -> list[int]:
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


def build_plan(src: ArchConfig, *, layers=None, hidden=None, ffn=None, groups=None, heads_per_group=None,
               seed: int = 0) -> Plan:
    """A hand-built plan with random kept indices (per layer for ffn and heads)."""
    src = src.explicit()
    L, G = src.num_layers, src.query_groups
    n = src.num_attention_heads // G
    layers = list(range(L)) if layers is None else layers
    hidden_idx = list(range(src.hidden_size)) if hidden is None else _subset(src.hidden_size, hidden, seed)
    k_groups = G if groups is None else groups
    k_heads = n if heads_per_group is None else heads_per_group
    f = src.ffn_hidden_size if ffn is None else ffn
    ffn_rows, group_rows, head_rows = [], [], []
    for j, layer in enumerate(layers):
        ffn_rows.append(list(range(f)) if ffn is None else _subset(src.ffn_hidden_size, f, seed + 10 + layer))
        kept_groups = list(range(G)) if groups is None else _subset(G, k_groups, seed + 20 + layer)
        group_rows.append(kept_groups)
        heads = []
        for g in kept_groups:
            local = list(range(n)) if heads_per_group is None else _subset(n, k_heads, seed + 30 + layer * 8 + g)
            heads += [g * n + h for h in local]
        head_rows.append(heads)
    target = src.replace(num_layers=len(layers), hidden_size=len(hidden_idx), ffn_hidden_size=f,
                         num_attention_heads=k_groups * k_heads, num_query_groups=k_groups)
    return Plan(source=src, target=target, layers=layers, hidden=hidden_idx, ffn=ffn_rows, query_groups=group_rows,
                heads=head_rows, params_before=src.num_parameters(), params_after=target.num_parameters(),
                scores={"note": "hand-built test plan"}).validate()


def plans(variant: str) -> dict[str, Plan]:
    src = ARCHS[variant]
    out = {"identity": identity_plan(src), "depth": build_plan(src, layers=[0, 3]),
           "hidden": build_plan(src, hidden=40, seed=1), "ffn": build_plan(src, ffn=96, seed=2),
           "groups": build_plan(src, groups=2, seed=3),
           "all": build_plan(src, layers=[1, 2], hidden=48, ffn=64, groups=2, seed=4,
                             heads_per_group=1 if variant == "swiglu" else None)}
    if variant == "swiglu":
        out["heads"] = build_plan(src, heads_per_group=1, seed=5)
    return out


def phase_sources(out: Path) -> None:
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.model.build import build_model
    from megatron_minitron.runtime import ParallelConfig, initialize

    tokenizer = out / "tok.model"
    for variant, arch in ARCHS.items():
        rt = initialize(ParallelConfig(**PARALLEL), seed=5)
        if rt.rank == 0:
            tokenizer.write_bytes(b"a tokenizer file the pruner must copy")
        model = build_model(arch, rt)
        gen = torch.Generator().manual_seed(100 + rt.rank)
        with torch.no_grad():  # norms of ones and zero biases would hide slicing mistakes
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        rt.barrier()
        ckpt.save_checkpoint(out / f"src_{variant}", model=model, arch=arch, runtime=rt, iteration=3,
                             tokenizer={"kind": "sentencepiece", "path": str(tokenizer)})


def phase_prune(out: Path) -> None:
    import torch.distributed as dist

    from megatron_minitron.prune.rewrite import prune_checkpoint

    for variant in ARCHS:
        for name, plan in plans(variant).items():
            prune_checkpoint(out / f"src_{variant}", plan, out / f"pruned_{variant}_{name}", group=dist.group.WORLD,
                             chunk_bytes=4096, print_fn=lambda s: None)


def phase_logits(out: Path) -> None:
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.forward import forward_logits
    from megatron_minitron.runtime import ParallelConfig, initialize

    rt = initialize(ParallelConfig(**PARALLEL))
    positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
    for variant in ARCHS:
        for name in plans(variant):
            info = ckpt.resolve(out / f"pruned_{variant}_{name}")
            model = build_model(info.arch, rt)
            ckpt.load_checkpoint(info, model=model)
            logits = forward_logits(model, TOKENS, positions, rt)
            if rt.is_logging_rank:
                torch.save(logits, out / f"logits_{variant}_{name}.pt")


if __name__ == "__main__":
    import torch.distributed as dist

    from megatron_minitron.runtime import shutdown

    out_dir = Path(sys.argv[1])
    for phase in ("sources", "prune", "logits"):
        globals()[f"phase_{phase}"](out_dir)
        dist.barrier()
    shutdown()
