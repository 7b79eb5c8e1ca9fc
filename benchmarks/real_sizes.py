"""The offline tools at a real size on one CPU node, and the distributed stages at the Llama-3.2-1B shape.

    python benchmarks/real_sizes.py --root /scratch/minitron-real [--out benchmarks/results/real_sizes.json]
    python benchmarks/real_sizes.py --root DIR --stages offline        # or: distributed
    python benchmarks/real_sizes.py --root DIR --small                 # the same pipeline on small shapes (minutes)

Offline (one fresh interpreter per stage, so each peak RSS is its own):
1. a random Hugging Face directory of the exact Llama-3.1-8B shape in bf16 (16 GB; config.json as on the Hub,
   5 GB shards written one at a time, never the whole model in memory);
2. before each stage below, `cp -r` of that stage's input: its copy limit (bytes read + written per second);
3. `import-hf` of it (the checkpoint keeps bf16);
4. `prune` to `examples/llama3.1-8b-to-4b-width.json` (a random ranking: the rewrite's cost does not depend on
   which rows are kept) with 1, 2 and 4 workers;
5. `export-hf` of the pruned checkpoint;
6. transformers loads the export (config and weights, no custom code) and runs a forward pass of 8 tokens.

Distributed (torchrun, TP=2 on this node's CPUs, gloo): a random Llama-3.2-1B-shaped directory (fp32) imported,
then `minitron importance` on a few samples and `minitron distill` of a width-pruned student for a few steps,
with seconds per token and every rank's peak RSS, so users can extrapolate to their GPUs.

Throughput is (bytes read + bytes written) / wall seconds, like the copy's. Memory is VmHWM of the process that
did the work (for prune: the largest worker's). Every output is deleted as soon as it is no longer needed, so the
whole run needs about 48 GB of disk at its peak (source 16 + checkpoint 16 + its copy 16).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARD = 5 * 1000 ** 3  # the Hub's default shard size

# meta-llama/Llama-3.1-8B config.json (rope_scaling and ids as published); 8,030,261,248 parameters.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}
# meta-llama/Llama-3.2-1B config.json: tied embeddings, rope scaling factor 32; 1,235,814,400 parameters.
LLAMA32_1B = {**LLAMA31_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "head_dim": 64,
              "tie_word_embeddings": True, "rope_scaling": {**LLAMA31_8B["rope_scaling"], "factor": 32.0}}
SMALL = {**LLAMA31_8B, "hidden_size": 512, "intermediate_size": 1792, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 32000}
SMALL_1B = {**SMALL, "tie_word_embeddings": True}


# ------------------------------------------------------------------------------------------ sources
def hf_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, f, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    d = config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q, h),
                       p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                       p + "self_attn.o_proj.weight": (h, q), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    shapes["model.norm.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    return shapes


def write_hf(config: dict, directory: Path, dtype: str) -> dict:
    """A random-weight directory as transformers writes it: shards of at most SHARD bytes, filled and written
    one at a time (memory: one shard), and the index. Returns the parameter count and bytes."""
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    directory.mkdir(parents=True)
    shapes = hf_shapes(config)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > SHARD:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    # values come from one random pool (std 0.02), copied at shifting offsets: drawing 8B normal numbers here
    # would take far longer than every stage measured, and the values do not change what the stages cost
    pool = torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(torch_dtype)
    offset = 0
    weight_map, total = {}, 0
    for n, names in enumerate(shards):
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch_dtype)
            else:
                flat = torch.empty(torch.Size(shapes[name]).numel(), dtype=torch_dtype)
                for a in range(0, flat.numel(), pool.numel()):
                    n = min(pool.numel(), flat.numel() - a)
                    start = (offset + 7919 * a) % (pool.numel() - n + 1)
                    flat[a:a + n] = pool[start:start + n]
                offset += 104729
                tensors[name] = flat.view(shapes[name])
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        total += sum(t.numel() * itemsize for t in tensors.values())
        weight_map.update({name: file for name in names})
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2))
    params = sum(torch.Size(s).numel() for s in shapes.values())
    return {"parameters": params, "bytes": total}


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- one measured operation
def worker(op: str, args: list[str]) -> dict:
    """Runs in a fresh interpreter: one offline operation, its bytes, seconds and peak RSS."""
    from megatron_minitron.runtime.host_memory import peak_rss_mb

    stats: dict = {}
    start = time.monotonic()
    if op == "import":
        from megatron_minitron.hf.importer import import_hf

        import_hf(args[0], args[1], stats=stats, print_fn=lambda _: None)
    elif op == "export":
        from megatron_minitron.hf.exporter import export_hf

        export_hf(args[0], args[1], stats=stats, print_fn=lambda _: None)
    elif op == "prune":
        from megatron_minitron.model.checkpoint import resolve
        from megatron_minitron.plan import random_plan
        from megatron_minitron.plan.target import load_target
        from megatron_minitron.prune.rewrite import prune_checkpoint

        source = resolve(args[0])
        plan = random_plan(source.arch, load_target(args[2]), seed=0)
        prune_checkpoint(args[0], plan, args[1], workers=int(args[3]), stats=stats, print_fn=lambda _: None)
        stats["peak_rss_mb"] = max(stats["peak_rss_mb"].values())
    elif op == "forward":
        import torch
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(args[0], dtype=torch.bfloat16)
        tokens = torch.arange(8).unsqueeze(0) + 1000
        with torch.no_grad():
            logits = model(tokens).logits
        stats = {"bytes_read": tree_bytes(Path(args[0])), "bytes_written": 0, "logits_shape": list(logits.shape),
                 "finite": bool(torch.isfinite(logits).all()),
                 "parameters": sum(p.numel() for p in model.parameters())}
    seconds = time.monotonic() - start
    stats.setdefault("peak_rss_mb", peak_rss_mb())
    return {"seconds": seconds, **{k: v for k, v in stats.items() if k != "seconds"},
            "bytes_per_s": (stats["bytes_read"] + stats["bytes_written"]) / seconds}


def measure(op: str, *args) -> dict:
    subprocess.run(["sync"], check=False)
    proc = subprocess.run([sys.executable, __file__, "--worker", op, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{op} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {op} {' '.join(map(str, args[2:]))}: {result['seconds']:.1f} s, "
          f"{result['bytes_per_s'] / 1e9:.2f} GB/s, peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return result


def copy_limit(src: Path, dst: Path) -> dict:
    subprocess.run(["sync"], check=False)
    start = time.monotonic()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    seconds = time.monotonic() - start
    nbytes = tree_bytes(src)
    shutil.rmtree(dst)
    print(f"  cp -r: {seconds:.1f} s, {2 * nbytes / seconds / 1e9:.2f} GB/s", flush=True)
    return {"seconds": seconds, "bytes_per_s": 2 * nbytes / seconds}


def offline(root: Path, config: dict, target: Path) -> dict:
    """Each stage right after a `cp -r` of its own input, so both meet the disk in the same state (on this VM a
    16 GB write runs anywhere from 0.3 to 3 GB/s depending on what was flushed before it)."""
    hf, ckpt, pruned, export, copy = (root / n for n in ("hf", "ckpt", "pruned", "export", "copy"))
    start = time.monotonic()
    print(f"writing {hf} ...", flush=True)
    source = write_hf(config, hf, "bfloat16")
    source["seconds"] = time.monotonic() - start
    print(f"  {source['parameters']:,} parameters, {source['bytes'] / 1e9:.1f} GB in {source['seconds']:.0f} s")
    out = {"source": source}

    def stage(name: str, src: Path, *args) -> dict:
        limit = copy_limit(src, copy)
        result = measure(name, src, *args)
        result["copy_bytes_per_s"] = limit["bytes_per_s"]
        result["ratio_to_copy"] = result["bytes_per_s"] / limit["bytes_per_s"]
        return result

    out["import"] = stage("import", hf, ckpt)
    shutil.rmtree(hf)  # the forward pass below reads the export, not the source
    out["prune"] = {}
    for workers in (1, 2, 4):
        shutil.rmtree(pruned, ignore_errors=True)
        out["prune"][workers] = stage("prune", ckpt, pruned, target, workers)
    shutil.rmtree(ckpt)
    out["export"] = stage("export", pruned, export)
    shutil.rmtree(pruned)
    out["forward"] = measure("forward", export)
    shutil.rmtree(export)
    return out


# -------------------------------------------------------------------------------------- distributed
def torchrun(*args: str, nproc: int = 2) -> dict:
    """A torchrun job; seconds and each worker's peak RSS (VmHWM, sampled every 0.2 s)."""
    import psutil

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megatron_minitron", *args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    peaks: dict[int, float] = {}
    parent = psutil.Process(proc.pid)
    while proc.poll() is None:
        for child in parent.children(recursive=True):
            try:
                for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peaks[child.pid] = max(peaks.get(child.pid, 0.0), int(line.split()[1]) / 1024)
            except OSError:
                pass
        time.sleep(0.2)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-4000:]}")
    ranks = sorted(peaks.values(), reverse=True)[:nproc]  # the workers, not torchrun's own small processes
    return {"seconds": time.monotonic() - start, "peak_rss_mb_per_rank": ranks, "log_tail": output[-1500:]}


def distributed(root: Path, config: dict, student: dict, samples: int, seq: int, steps: int) -> dict:
    hf, teacher, pruned, scores, run = (root / n for n in ("hf1b", "teacher1b", "student1b", "scores1b", "distill1b"))
    write_hf(config, hf, "float32")
    # the embedded corpus's SentencePiece tokenizer (8,192 ids, within the model's vocabulary) travels with the
    # model, so importance and distillation read the corpus with it
    from megatron_minitron.data.tokenizer import default_tokenizer

    shutil.copyfile(default_tokenizer(str(root / "data-cache")).path, hf / "tokenizer.model")
    measure("import", hf, teacher)
    shutil.rmtree(hf)
    out = {}
    imp = torchrun("importance", "--load", str(teacher), "--tp", "2", "--num-samples", str(samples),
                   "--seq-length", str(seq), "--out", str(scores), "--cache-dir", str(root / "data-cache"))
    imp["tokens"] = samples * seq
    imp["seconds_per_token"] = imp["seconds"] / imp["tokens"]
    out["importance"] = imp
    target = root / "student.json"
    target.write_text(json.dumps(student))
    proc = subprocess.run([sys.executable, "-m", "megatron_minitron", "prune", "--load", str(teacher), "--scores",
                           str(scores), "--export-config", str(target), "--tp", "2", "--save", str(pruned)],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    dis = torchrun("distill", "--teacher", str(teacher), "--student", str(pruned), "--tp", "2", "--seq-length",
                   str(seq), "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", str(steps),
                   "--lr-warmup-iters", "1", "--eval-interval", str(steps), "--eval-iters", "1", "--log-interval", "1",
                   "--skip-teacher-check", "--save", str(run), "--cache-dir", str(root / "data-cache"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    steady = train[1:] or train  # the first step includes one-off set-up
    dis["step_time_s"] = [r["step_time_s"] for r in train]
    dis["seconds_per_token"] = sum(r["step_time_s"] for r in steady) / (len(steady) * 2 * seq)
    out["distill"] = dis
    for path in (teacher, pruned, scores, run):
        shutil.rmtree(path, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="scratch directory (about 48 GB free for the full run)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "real_sizes.json"))
    parser.add_argument("--stages", default="offline,distributed")
    parser.add_argument("--small", action="store_true", help="small shapes: checks the pipeline in minutes")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1:])))
        return
    if not args.root:
        parser.error("--root DIR is required")
    root = Path(args.root)
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"--root {root} is not empty; give a new or empty scratch directory")
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    need = 2 * 1e9 if args.small else 48e9
    if "offline" in args.stages and free < need:
        raise SystemExit(f"--root {root}: {free / 1e9:.0f} GB free, the offline stages need about {need / 1e9:.0f} GB")
    results = {"small": args.small, "machine": {"cpus": os.cpu_count(),
                                                "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9}}
    if "offline" in args.stages:
        target = REPO / "examples" / "llama3.1-8b-to-4b-width.json"
        if args.small:
            target = root / "small-target.json"
            target.write_text(json.dumps({"hidden_size": 384, "ffn_hidden_size": 1024}))
        print("offline stages (Llama-3.1-8B shape, bf16)" if not args.small else "offline stages (small)")
        results["offline"] = offline(root, SMALL if args.small else LLAMA31_8B, target)
    if "distributed" in args.stages:
        print("distributed stages at TP=2 (Llama-3.2-1B shape, fp32)" if not args.small else "distributed (small)")
        # hidden 1024 / MLP 4096 (0.42B with the tied 128k embedding): with the fp32 teacher beside it and Adam's
        # state, a 0.63B student (hidden 1536) needed more than this 24 GB node holds (stopped at 22.8 GB used)
        student = ({"hidden_size": 384, "ffn_hidden_size": 1024} if args.small else
                   {"hidden_size": 1024, "ffn_hidden_size": 4096})
        results["distributed"] = distributed(root, SMALL_1B if args.small else LLAMA32_1B, student,
                                             samples=4, seq=256 if args.small else 512, steps=3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
