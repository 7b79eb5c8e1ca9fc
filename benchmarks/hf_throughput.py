"""Hugging Face import and export throughput vs safetensors alone, and peak RSS for a model and one 4x larger.

    python benchmarks/hf_throughput.py [--family llama|qwen3_moe] [--out FILE]

The source is a random-weight Llama-style HF directory (fp32, GQA, untied; about 0.75 GB, and 3 GB with
4x the layers and 4x the vocabulary), or with --family qwen3_moe a Qwen3-MoE-shaped one (16 experts per
layer, each its own gate/up/down tensors; 0.93 GB and 3.7 GB), written as transformers does: shards of at
most 500 MB with an index. Three operations run, each in a fresh interpreter so its peak RSS (VmHWM) is its own:

- reference: for every shard, `safetensors.torch.load_file` + `save_file` to another directory, i.e.
  reading and writing the same bytes with safetensors alone (one shard in memory at a time);
- import: `import_hf` of the directory (streaming, tensor by tensor, writes the torch_dist checkpoint);
- export: `export_hf` of a checkpoint imported once before the rounds back to a new HF directory
  (500 MB shards).

Throughput = (bytes read + bytes written) / wall time of the call (validation, metadata and index
included; the interpreter start and module imports are not). Nothing is flushed to disk (fsync off in all
three); the source is in the page cache (three rounds of the three operations, each output deleted once
measured, the best of each is kept). Ratio = throughput /
reference throughput, both measured in the same run; the issue asks for >= 0.5, and a flat peak RSS
when the model grows 4x (the largest single tensor, the embedding, grows 4x too: import holds one
tensor at a time, so its peak follows that tensor, not the model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARD = 500 * 1000 ** 2
BASE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=32000)
LARGE = {**BASE, "num_hidden_layers": 32, "vocab_size": 128000}
# Qwen3-MoE-shaped (--family qwen3_moe): per-expert gate/up/down tensors, a router, QK norms, explicit head_dim;
# 16 experts of width 512, top-4 (about 0.93 GB, and 3.7 GB with 4x the layers and 4x the vocabulary).
MOE_BASE = dict(hidden_size=1024, intermediate_size=3072, moe_intermediate_size=512, num_experts=16,
                num_experts_per_tok=4, norm_topk_prob=True, num_hidden_layers=6, num_attention_heads=16,
                num_key_value_heads=4, head_dim=64, vocab_size=32000)
MOE_LARGE = {**MOE_BASE, "num_hidden_layers": 24, "vocab_size": 128000}
CONFIGS = {"llama": (BASE, LARGE), "qwen3_moe": (MOE_BASE, MOE_LARGE)}


def layer_shapes(config: dict, i: int) -> dict:
    """HF tensor name -> shape of layer i (Llama, or Qwen3-MoE when the config has experts)."""
    h, L = config["hidden_size"], f"model.layers.{i}."
    d = config.get("head_dim", h // config["num_attention_heads"])
    q, kv = d * config["num_attention_heads"], d * config["num_key_value_heads"]
    shapes = {L + "input_layernorm.weight": (h,), L + "self_attn.q_proj.weight": (q, h),
              L + "self_attn.k_proj.weight": (kv, h), L + "self_attn.v_proj.weight": (kv, h),
              L + "self_attn.o_proj.weight": (h, q), L + "post_attention_layernorm.weight": (h,)}
    if "num_experts" not in config:
        f = config["intermediate_size"]
        return {**shapes, L + "mlp.gate_proj.weight": (f, h), L + "mlp.up_proj.weight": (f, h),
                L + "mlp.down_proj.weight": (h, f)}
    shapes.update({L + "self_attn.q_norm.weight": (d,), L + "self_attn.k_norm.weight": (d,),
                   L + "mlp.gate.weight": (config["num_experts"], h)})
    f = config["moe_intermediate_size"]
    for e in range(config["num_experts"]):
        x = f"{L}mlp.experts.{e}."
        shapes.update({x + "gate_proj.weight": (f, h), x + "up_proj.weight": (f, h), x + "down_proj.weight": (h, f)})
    return shapes


def write_hf(config: dict, directory: Path) -> int:
    """A random-weight Llama or Qwen3-MoE directory (config.json, shards, index); returns the weight bytes."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    h, L = config["hidden_size"], config["num_hidden_layers"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h)}
    for i in range(L):
        shapes.update(layer_shapes(config, i))
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (config["vocab_size"], h)})
    gen = torch.Generator().manual_seed(0)
    shards: list[dict] = [{}]
    size = 0
    for name, shape in shapes.items():
        nbytes = 4 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > SHARD:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in shard.items()}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({name: file for name in shard})
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                          "weight_map": weight_map}))
    family = ({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]} if "num_experts" in config
              else {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    (directory / "config.json").write_text(json.dumps({
        **family, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "hidden_act": "silu", **config}))
    return total


# ----------------------------------------------------------------------------- one measured operation
def worker(op: str, src: str, dst: str) -> dict:
    """Runs in a fresh interpreter: one operation, its bytes, seconds and peak RSS."""
    # module imports (~3 s here, with the ones the operations import lazily) are start-up, not throughput
    import torch.distributed.checkpoint  # noqa: F401

    import megatron_minitron.data.tokenizer  # noqa: F401
    import megatron_minitron.model.storage  # noqa: F401
    from megatron_minitron.hf.exporter import export_hf
    from megatron_minitron.hf.importer import import_hf
    from megatron_minitron.runtime.host_memory import peak_rss_mb

    start = time.monotonic()
    if op == "reference":
        from safetensors.torch import load_file, save_file

        Path(dst).mkdir()
        read = written = 0
        for path in sorted(Path(src).glob("*.safetensors")):
            tensors = load_file(str(path))
            save_file(tensors, str(Path(dst) / path.name), metadata={"format": "pt"})
            read += path.stat().st_size
            written += (Path(dst) / path.name).stat().st_size
            del tensors
        stats = {"bytes_read": read, "bytes_written": written}
    elif op == "import":
        stats = {}
        import_hf(src, dst, stats=stats, fsync=False, print_fn=lambda _: None)
    else:
        stats = {}
        export_hf(src, dst, stats=stats, fsync=False, max_shard_bytes=SHARD, print_fn=lambda _: None)
    seconds = time.monotonic() - start
    return {"seconds": seconds, "bytes_read": stats["bytes_read"], "bytes_written": stats["bytes_written"],
            "bytes_per_s": (stats["bytes_read"] + stats["bytes_written"]) / seconds, "peak_rss_mb": peak_rss_mb()}


def measure_once(op: str, src: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    proc = subprocess.run([sys.executable, __file__, "--worker", op, str(src), str(dst)], cwd=REPO,
                          capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                               "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"{op} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(root: Path, src: Path, repeats: int) -> dict:
    """Best of `repeats` rounds of reference, import, export, in that order within each round: this
    machine's page-cache writes stall for seconds at a time, so the three take turns rather than run
    in blocks that one stall could fall on.

    Every operation's output is deleted as soon as it is measured, so the next one starts with no
    write-back of it pending: the `sync` before each run then has nothing large to flush, and the
    disk is as idle for one operation as for the next. (Export reads a checkpoint imported once,
    before the rounds. When import's output was kept for export, export always ran right after 3 GB
    had been flushed and measured 0.26-0.35 of the reference on the 3 GB model, the reference, after
    a deletion, never paying that.)"""
    source_ckpt = root / "source-ckpt"
    measure_once("import", src, source_ckpt)  # export's input; not a measurement
    ops = {"reference": (src, root / "ref"), "import": (src, root / "ckpt"), "export": (source_ckpt, root / "out")}
    best: dict = {}
    for _ in range(repeats):
        for op, (a, b) in ops.items():
            result = measure_once(op, a, b)
            shutil.rmtree(b, ignore_errors=True)
            if op not in best or result["seconds"] < best[op]["seconds"]:
                best[op] = result
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(CONFIGS), default="llama",
                        help="llama (dense) or qwen3_moe (per-expert tensors)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/hf_throughput[_FAMILY].json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=3, metavar=("OP", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    out = args.out or str(REPO / "benchmarks/results" / ("hf_throughput.json" if args.family == "llama"
                                                          else f"hf_throughput_{args.family}.json"))
    results = {"family": args.family, "shard_bytes": SHARD, "repeats": args.repeats, "torch": torch.__version__,
               "models": {}}
    with tempfile.TemporaryDirectory(prefix="hf-bench-") as tmp:
        tmp = Path(tmp)
        for name, config in zip(("base", "4x"), CONFIGS[args.family]):
            src = tmp / name / "hf"
            weight_bytes = write_hf(config, src)
            row = {"config": config, "weight_bytes": weight_bytes}
            row.update(measure(tmp / name, src, args.repeats))
            for op in ("import", "export"):
                row[op]["ratio_vs_safetensors"] = row[op]["bytes_per_s"] / row["reference"]["bytes_per_s"]
            results["models"][name] = row
            print(f"{name}: {weight_bytes / 1e9:.2f} GB; " + "; ".join(
                f"{op} {row[op]['bytes_per_s'] / 1e9:.2f} GB/s, peak {row[op]['peak_rss_mb']:.0f} MB"
                + (f", ratio {row[op]['ratio_vs_safetensors']:.2f}" if op != "reference" else "")
                for op in ("reference", "import", "export")), flush=True)
            shutil.rmtree(tmp / name)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
