"""Pruner throughput vs `cp -r`, and peak RSS per worker for a model and one 4x larger.

    python benchmarks/prune_throughput.py [--workers 2] [--chunk-mb 64] [--out benchmarks/results/prune_throughput.json]
    python benchmarks/prune_throughput.py --moe [--out benchmarks/results/prune_throughput_moe.json]

The source checkpoints (random fp32 weights, SwiGLU/GQA, about 0.75 GB and 3 GB) are written once
into a temporary directory in megatron's TP1 torch_dist layout: one DCP chunk per layer of every
stacked tensor (GLU gate/up halves as separate chunks), whole embeddings as one chunk each, the
`_extra_state` objects, common.pt with Megatron-LM args, minitron.json. They are written with the
pruner's own DCP writer (building a 3 GB megatron model on CPU only to save it would dominate the
run); the tests show that writer's output loads in megatron at TP2xPP2.

Throughput = (bytes read + bytes written) / wall time of `prune_checkpoint`, including starting the
workers, validation and the metadata; `cp -r` of the same source in the same run gives the
reference. Both start after `sync` with the source in the page cache, best of five runs each, taken in
rounds of `cp -r`, the identity plan and the pruned plan, so every side meets the same states of the page
cache (on the 2-core VM the same 1.15 GB copy took 0.33-0.91 s within one run). Neither flushes to disk
(the pruner runs with fsync=False here; by default it fsyncs, as DCP does). The larger model has 4x the
layers and 4x the vocabulary, so its single embedding chunk is 4x larger too: peak RSS must stay flat
because a worker reads row ranges, never whole stored chunks.

--moe: the same with Mixture-of-Experts models (8 experts of width 1024, top-2, every layer MoE; about
0.8 GB and 3.2 GB), stored as megatron stores them: router [L, E, H] one chunk per layer, expert fc1/fc2
[L, E, rows, cols] one chunk per layer and expert (GLU halves separate), expert `_extra_state` objects
per layer and expert. The pruned plan keeps half the experts (each layer its own), 3/4 of each expert's
neurons (each expert its own), 3/4 of the hidden channels and of the layers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_minitron.config import ArchConfig  # noqa: E402
from megatron_minitron.model import checkpoint as ckpt  # noqa: E402
from megatron_minitron.plan.plan import Plan, identity_plan  # noqa: E402
from megatron_minitron.model import storage  # noqa: E402
from megatron_minitron.prune.rewrite import prune_checkpoint  # noqa: E402

BASE = ArchConfig(num_layers=8, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16, num_query_groups=4,
                  vocab_size=32000, padded_vocab_size=32000, max_position_embeddings=4096)
LARGE = BASE.replace(num_layers=32, vocab_size=128000, padded_vocab_size=128000)
BASE_MOE = BASE.replace(num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=1024)
LARGE_MOE = BASE_MOE.replace(num_layers=32, vocab_size=128000, padded_vocab_size=128000)


def _write_layer_mlp(writer, arch: ArchConfig, i: int, gen, extra: bytes) -> None:
    """One layer's MLP: the dense fc1 (gate and up rows stored separately, as megatron does), or the router
    and every expert of a MoE layer (one chunk per expert and GLU half) with their extra states."""
    L, h = arch.num_layers, arch.hidden_size
    if not arch.is_moe:
        f = arch.ffn_hidden_size
        for half in range(2):
            writer.tensor("decoder.layers.mlp.linear_fc1.weight", torch.randn((1, f, h), generator=gen),
                          (i, half * f, 0), (L, 2 * f, h))
        writer.tensor("decoder.layers.mlp.linear_fc2.weight", torch.randn((1, h, f), generator=gen), (i, 0, 0),
                      (L, h, f))
        for module in ("mlp.linear_fc1", "mlp.linear_fc2"):
            writer.object(f"decoder.layers.{module}._extra_state/shard_{i}_{L}", extra)
        return
    E, f = arch.num_experts, arch.expert_ffn_hidden_size
    prefix = "decoder.layers.mlp.experts.experts."
    writer.tensor("decoder.layers.mlp.router.weight", torch.randn((1, E, h), generator=gen), (i, 0, 0), (L, E, h))
    for e in range(E):
        for half in range(2):
            writer.tensor(prefix + "linear_fc1.weight", torch.randn((1, 1, f, h), generator=gen),
                          (i, e, half * f, 0), (L, E, 2 * f, h))
        writer.tensor(prefix + "linear_fc2.weight", torch.randn((1, 1, h, f), generator=gen), (i, e, 0, 0),
                      (L, E, h, f))
        for module in ("linear_fc1", "linear_fc2"):
            writer.object(f"{prefix}{module}._extra_state/shard_{i}.{e}_{L}.{E}", extra)


def write_source(arch: ArchConfig, root: Path) -> int:
    """A random-weight torch_dist checkpoint of `arch` in Megatron-LM layout; returns its bytes."""
    arch = arch.explicit()
    release = root / "release"
    release.mkdir(parents=True)
    writer = storage.ChunkWriter(release, "__0_0.distcp")
    L, h, kv = arch.num_layers, arch.hidden_size, arch.head_dim
    qkv = (arch.num_attention_heads + 2 * arch.query_groups) * kv
    gen = torch.Generator().manual_seed(0)
    for key, shape in (("embedding.word_embeddings.weight", (arch.padded_vocab, h)),
                       ("output_layer.weight", (arch.padded_vocab, h)), ("decoder.final_layernorm.weight", (h,))):
        writer.tensor(key, torch.randn(shape, generator=gen), (0,) * len(shape), shape)
    layered = {"self_attention.linear_qkv.layer_norm_weight": (h,), "self_attention.linear_qkv.weight": (qkv, h),
               "self_attention.linear_proj.weight": (h, arch.num_attention_heads * kv),
               "mlp.linear_fc1.layer_norm_weight": (h,)}
    extra = io.BytesIO()
    torch.save(None, extra)
    for i in range(L):
        for name, shape in layered.items():
            writer.tensor(f"decoder.layers.{name}", torch.randn((1,) + shape, generator=gen), (i,) + (0,) * len(shape),
                          (L,) + shape)
        _write_layer_mlp(writer, arch, i, gen, extra.getvalue())
        for module in ("self_attention.linear_qkv", "self_attention.linear_proj"):
            writer.object(f"decoder.layers.{module}._extra_state/shard_{i}_{L}", extra.getvalue())
    writer.close()
    storage.write_metadata(release, writer.records)
    torch.save({"checkpoint_version": 3.0, "iteration": 0, "args": ckpt.megatron_args_from_arch(arch)},
               release / "common.pt")
    (release / ckpt.META).write_text(json.dumps({"format": ckpt.FORMAT, "architecture": arch.to_json()}))
    (release / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                       "common_backend": "torch", "common_backend_version": 1}))
    (root / ckpt.TRACKER).write_text("release")
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def minitron_plan(arch: ArchConfig) -> Plan:
    """A typical Minitron target: 3/4 of the layers and hidden channels, half the MLP, half the heads per group."""
    arch = arch.explicit()
    g = torch.Generator().manual_seed(1)

    def keep(n: int, k: int) -> list[int]:
        return sorted(torch.randperm(n, generator=g)[:k].tolist())

    layers = keep(arch.num_layers, arch.num_layers * 3 // 4)
    n = arch.num_attention_heads // arch.query_groups
    heads = [[grp * n + h for grp in range(arch.query_groups) for h in keep(n, n // 2)] for _ in layers]
    target = arch.replace(num_layers=len(layers), hidden_size=arch.hidden_size * 3 // 4,
                          ffn_hidden_size=arch.ffn_hidden_size // 2, num_attention_heads=arch.num_attention_heads // 2)
    return Plan(source=arch, target=target, layers=layers, hidden=keep(arch.hidden_size, target.hidden_size),
                ffn=[keep(arch.ffn_hidden_size, target.ffn_hidden_size) for _ in layers],
                query_groups=[list(range(arch.query_groups))] * len(layers), heads=heads,
                params_before=arch.num_parameters(), params_after=target.num_parameters()).validate()


def moe_plan(arch: ArchConfig) -> Plan:
    """Half the experts (each layer its own), 3/4 of each expert's neurons (each expert its own), 3/4 of the
    hidden channels and of the layers: a random ranking of those axes."""
    from megatron_minitron.plan import Target, random_plan

    return random_plan(arch, Target(num_experts=arch.num_experts // 2, moe_ffn_hidden_size=arch.expert_ffn_hidden_size
                                    * 3 // 4, hidden_size=arch.hidden_size * 3 // 4,
                                    num_layers=arch.num_layers * 3 // 4), seed=1)


def time_cp(src: Path, dst: Path) -> float:
    os.sync()  # both sides start with no dirty pages of earlier runs to flush (the disk here is slow)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds


def time_prune(src: Path, plan: Plan, dst: Path, workers: int, chunk_bytes: int, fsync: bool = False) -> dict:
    """The pruner's stats, with `seconds` the wall time of the whole call (validation and planning included;
    the pruner's own `seconds` starts after them and is kept as `window_seconds`)."""
    stats: dict = {}
    os.sync()
    start = time.perf_counter()
    prune_checkpoint(src, plan, dst, workers=workers, chunk_bytes=chunk_bytes, stats=stats, print_fn=lambda s: None,
                     fsync=fsync)
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return {**stats, "window_seconds": stats["seconds"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of cp -r, identity plan, pruned plan")
    parser.add_argument("--moe", action="store_true", help="Mixture-of-Experts models and an expert-pruning plan")
    parser.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/prune_throughput"
                                                    "[_moe].json)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.out is None:
        args.out = str(Path(__file__).parent / "results" / f"prune_throughput{'_moe' if args.moe else ''}.json")
    models = (("base", BASE_MOE), ("4x", LARGE_MOE)) if args.moe else (("base", BASE), ("4x", LARGE))
    pruned_name, pruned_plan = ("moe", moe_plan) if args.moe else ("minitron", minitron_plan)
    chunk = args.chunk_mb << 20
    results: dict = {"workers": args.workers, "chunk_mb": args.chunk_mb, "models": {}}
    with tempfile.TemporaryDirectory(dir=Path(args.out).parent) as tmp:
        tmp = Path(tmp)
        for name, arch in models:
            src = tmp / f"src_{name}"
            t0 = time.perf_counter()
            size = write_source(arch, src)
            print(f"{name}: wrote a {size / 1e9:.2f} GB source in {time.perf_counter() - t0:.1f}s", flush=True)
            plans = (("identity", identity_plan(arch)), (pruned_name, pruned_plan(arch)))
            cp_runs, prune_runs = [], {plan_name: [] for plan_name, _ in plans}
            for _ in range(args.repeats):  # interleaved, so every side meets the same states of the machine
                cp_runs.append(time_cp(src, tmp / "cp"))
                for plan_name, plan in plans:
                    prune_runs[plan_name].append(time_prune(src, plan, tmp / "pruned", args.workers, chunk))
            cp_s = min(cp_runs)
            row = {"parameters": arch.num_parameters(), "checkpoint_bytes": size, "cp_seconds": cp_s,
                   "cp_bytes_per_s": 2 * size / cp_s, "cp_seconds_all": cp_runs}
            for plan_name, _ in plans:
                runs = prune_runs[plan_name]
                best = min(runs, key=lambda s: s["seconds"])
                rate = (best["bytes_read"] + best["bytes_written"]) / best["seconds"]
                row[plan_name] = {"seconds": best["seconds"], "window_seconds": best["window_seconds"],
                                  "bytes_read": best["bytes_read"],
                                  "bytes_written": best["bytes_written"], "bytes_per_s": rate,
                                  "ratio_vs_cp": rate / row["cp_bytes_per_s"],
                                  "peak_rss_mb_per_worker": max(max(r["peak_rss_mb"].values()) for r in runs),
                                  "seconds_all": [r["seconds"] for r in runs]}
                print(f"{name} {plan_name}: {rate / 1e6:.0f} MB/s read+written vs cp -r "
                      f"{row['cp_bytes_per_s'] / 1e6:.0f}"
                      f" MB/s (ratio {row[plan_name]['ratio_vs_cp']:.2f}); peak RSS per worker "
                      f"{row[plan_name]['peak_rss_mb_per_worker']:.0f} MB", flush=True)
            results["models"][name] = row
            shutil.rmtree(src)
    base, large = results["models"]["base"], results["models"]["4x"]
    peak = "peak_rss_mb_per_worker"
    results["rss_growth_4x"] = large[pruned_name][peak] / base[pruned_name][peak]
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"ratio_vs_cp": {m: results["models"][m][pruned_name]["ratio_vs_cp"] for m in results["models"]},
                      "rss_growth_4x": results["rss_growth_4x"]}))


if __name__ == "__main__":
    main()
