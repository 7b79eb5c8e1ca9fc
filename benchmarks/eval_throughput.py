"""Downstream-evaluation throughput: documents per second of the built-in `minitron_continuation` task (4
choices + 4 unconditional requests per document) with our megatron model vs lm-eval's own Hugging Face backend
on the same model exported with export-hf, same batch size, same machine (target: ratio >= 0.8).

    python benchmarks/eval_throughput.py --out benchmarks/results/eval_tp1.json                         # TP1
    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/eval_throughput.py --tp 2   # TP2

The model is a random Llama of the `small` preset's shape (hidden 256, 8 layers, 8 heads in 4 groups, MLP 768)
with a 512-token byte-level BPE tokenizer (tests/evaluation/models.py), built once in --work. Each side times
lm-eval's simple_evaluate alone (model and data loading excluded), after a warm-up; the repetitions alternate
(hf backend in a fresh interpreter, then ours) and the medians are compared. Under torchrun every process, the
hf backend's too, runs one thread (torchrun's OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
             max_position_embeddings=512)
TASK = "minitron_continuation"

HF_SCRIPT = """
import json, statistics, sys, time
from lm_eval.evaluator import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
model_dir, include, task, limit, batch, reps = sys.argv[1:7]
lm = HFLM(pretrained=model_dir, dtype="float32", device="cpu", add_bos_token=False, batch_size=int(batch))
tm = TaskManager(include_path=include, include_defaults=False)
times = []
for _ in range(int(reps) + 1):
    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[task], limit=int(limit), task_manager=tm, bootstrap_iters=0)
    times.append(time.perf_counter() - t0)
print(json.dumps({"times": times[1:], "acc": out["results"][task]["acc,none"]}))
"""


def _plain_env() -> dict:
    """This environment without torchrun's/our runtime's distributed variables (the hf backend would take
    itself for one rank of a distributed job)."""
    dist = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
            "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_NAME"}
    return {k: v for k, v in os.environ.items() if k not in dist and not k.startswith("TORCHELASTIC")}


def hf_backend(model_dir: Path, include: Path, limit: int, batch: int, reps: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", HF_SCRIPT, str(model_dir), str(include), TASK, str(limit), str(batch),
                           str(reps)], capture_output=True, text=True, env=_plain_env())
    if proc.returncode != 0:
        raise RuntimeError(f"the hf backend run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interleaved(paths: dict, runtime, cache: Path, include: Path, limit: int, batch: int, reps: int):
    """({"times", "acc"} of the hf backend, the same of ours) on rank 0, None elsewhere: one warm-up of ours, then
    per repetition one hf run (its own warm-up first, in a fresh interpreter) and one of ours, so a change of
    load on a shared machine hits both alike."""
    from megatron_minitron.data.tokenizer import TokenizerRef
    from megatron_minitron.evaluation.run import TaskConfig, checked_tasks, load_engine, run_lm_eval
    from megatron_minitron.model import checkpoint as ckpt

    info = ckpt.resolve(paths["ckpt"])
    cfg = TaskConfig(tasks=(TASK,), limit=limit, batch_size=batch, cache_dir=str(cache), bootstrap_iters=0)
    control = torch.distributed.new_group(backend="gloo")
    manager = checked_tasks(cfg, runtime, control)
    engine, tokenizer = load_engine(info, TokenizerRef.from_json(info.tokenizer), runtime, control_group=control,
                                    batch_size=batch)
    if runtime.rank != 0:
        engine.follow()
        return None
    hf, mine = {"times": []}, {"times": []}
    try:
        run_lm_eval(engine, tokenizer, manager, cfg)
        for _ in range(reps):
            one = hf_backend(paths["exported"], include, limit, batch, 1)
            hf["times"] += one["times"]
            hf["acc"] = one["acc"]
            t0 = time.perf_counter()
            out = run_lm_eval(engine, tokenizer, manager, cfg)
            mine["times"].append(time.perf_counter() - t0)
            mine["acc"] = out["results"][TASK]["acc,none"]
    finally:
        engine.stop()
    return hf, mine


def main() -> None:
    from megatron_minitron.evaluation.builtin import builtin_task_dir
    from megatron_minitron.runtime import ParallelConfig, initialize, shutdown
    from tests.evaluation import models

    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--limit", type=int, default=64, help="documents")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--work", default=".cache/eval-benchmark")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(args.work).resolve()
    rank = int(os.environ.get("RANK", "0"))
    paths = {"hf": work / "hf", "ckpt": work / "ckpt", "exported": work / "exported"}
    if rank == 0 and not (paths["exported"] / "config.json").is_file():
        models.build(work, **SHAPE)
    include = builtin_task_dir(work / "cache")
    runtime = initialize(ParallelConfig(tensor_parallel=args.tp))
    try:
        torch.distributed.barrier()
        both = interleaved(paths, runtime, work / "cache", include, args.limit, args.batch_size, args.reps)
    finally:
        shutdown()
    if both is None:
        return
    baseline, mine = both
    hf_docs_s = args.limit / statistics.median(baseline["times"])
    our_docs_s = args.limit / statistics.median(mine["times"])
    result = {"tp": args.tp, "documents": args.limit, "batch_size": args.batch_size, "hf_docs_per_s": hf_docs_s,
              "ours_docs_per_s": our_docs_s, "ratio": our_docs_s / hf_docs_s, "target": 0.8,
              "hf_times_s": baseline["times"], "our_times_s": mine["times"], "hf_acc": baseline["acc"],
              "our_acc": mine["acc"], "threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
