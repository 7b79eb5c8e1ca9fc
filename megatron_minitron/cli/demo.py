"""`minitron demo`: the whole Minitron method on the embedded corpus, with a report of what it shows.

    minitron demo                      # ~10M teacher at TP=2 on 2 processes, <= 15 min on 2 CPU cores
    minitron demo --teacher-iters 2000 --retrain-iters 400 --arch my_arch.json --tp 4 --nproc 8

Trains (or reuses from --teacher-cache) a teacher, scores it at TP with real ranks, prunes it to
about half its parameters by width and by depth, and retrains at equal tokens: width-pruned + KD,
depth-pruned + KD, the width architecture from scratch, width-pruned + LM loss only; plus random
ranking and the 3x3 aggregation grid zero-shot. --out receives results.json, report.md and plots/.

Run plainly, it launches itself under torchrun with --nproc processes (default TP x PP); under
torchrun or srun it runs in the launched processes (several nodes too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megatron_minitron.config import ConfigError
from megatron_minitron.demo.config import MARKER
"""Written first into --out: marks a directory the demo may replace on its next run."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_minitron.demo.config import DemoConfig

    d = {f.name: f.default for f in dataclasses.fields(DemoConfig)}
    parser.add_argument("--out", default=d["out"], help="run directory (a previous demo run there is replaced)")
    parser.add_argument("--arch", default=d["arch"], help="teacher architecture: preset or JSON file (default: small)")
    parser.add_argument("--teacher", default=None, help="prune this trained checkpoint instead of training a teacher")
    parser.add_argument("--teacher-cache", default=d["teacher_cache"],
                        help="trained teachers, one per configuration (a second run reuses its teacher)")
    p = parser.add_argument_group("processes and layout (every stage runs at this TP x PP)")
    p.add_argument("--tp", type=int, default=d["tensor_parallel"], help="tensor-parallel size (default 2)")
    p.add_argument("--pp", type=int, default=d["pipeline_parallel"], help="pipeline-parallel size")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes to launch on this machine (default TP x PP; the rest is data parallel); "
                        "ignored under torchrun/srun")
    t = parser.add_argument_group("steps and sizes")
    for name, kind, help_text in (
            ("teacher_iters", int, "teacher training steps"),
            ("retrain_iters", int, "steps of every retraining arm (equal tokens)"),
            ("teacher_lr", float, "teacher peak learning rate"),
            ("retrain_lr", float, "peak learning rate of every arm"),
            ("warmup_iters", int, "linear warm-up steps of the teacher"),
            ("retrain_warmup_iters", int, "linear warm-up steps of every arm"),
            ("seq_length", int, "tokens per sample"),
            ("micro_batch_size", int, "samples per micro-batch"),
            ("global_batch_size", int, "samples per step"),
            ("eval_interval", int, "validate the arms every N steps (their loss-vs-tokens curves)"),
            ("eval_iters", int, "validation batches per evaluation"),
            ("calib_samples", int, "calibration samples for importance"),
            ("lm_loss_samples", int, "samples of each layer/block-removed LM-loss pass"),
            ("width_hidden_size", int, "hidden size of the width-pruned model (default 3/4)"),
            ("width_ffn_hidden_size", int, "MLP size of the width-pruned model (default 1/2)"),
            ("width_num_attention_heads", int, "query heads of the width-pruned model (default 1/2)"),
            ("depth_num_layers", int, "layers of the depth-pruned model (default: equal parameters to width)"),
            ("random_seed", int, "seed of the random-ranking baseline"),
            ("seed", int, "seed of weights and data order")):
        default = d[name]
        t.add_argument("--" + name.replace("_", "-"), type=kind, default=default,
                       help=help_text + (f" (default {default})" if default is not None else ""))
    g = parser.add_argument_group("data (default: the embedded CPython-docs corpus)")
    g.add_argument("--data-path", nargs="+", default=None, metavar="[WEIGHT] PREFIX",
                   help="indexed dataset prefixes, as Megatron-LM's --data-path")
    g.add_argument("--valid-data-path", nargs="+", default=None, metavar="[WEIGHT] PREFIX")
    g.add_argument("--split", default=d["split"])
    g.add_argument("--tokenizer", default=None, help="SentencePiece .model or HF tokenizer.json")
    g.add_argument("--cache-dir", default=d["cache_dir"])
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")


def config_from_args(args: argparse.Namespace):
    from megatron_minitron.demo.config import DemoConfig

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    return DemoConfig(**values, tensor_parallel=args.tp, pipeline_parallel=args.pp, started_at=time.time())


def check_out_dir(out: Path) -> None:
    """--out must be new, empty, or a previous demo run (which is replaced)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise ConfigError(f"--out {out} exists and is not a previous demo run; choose a new directory")


def run(args: argparse.Namespace) -> int:
    from megatron_minitron.config import load_arch
    from megatron_minitron.model.checkpoint import resolve
    from megatron_minitron.runtime import ParallelConfig

    cfg = config_from_args(args)
    check_out_dir(Path(cfg.out))
    arch = resolve(cfg.teacher).arch if cfg.teacher else load_arch(cfg.arch)
    arch.check_parallel(tensor_parallel=cfg.tensor_parallel, pipeline_parallel=cfg.pipeline_parallel)
    parallel = ParallelConfig(tensor_parallel=cfg.tensor_parallel, pipeline_parallel=cfg.pipeline_parallel)
    if _launched():
        return run_ranks(cfg, plots=not args.no_plots)
    nproc = args.nproc or parallel.model_parallel
    parallel.data_parallel(nproc)  # whole model copies, or a clear error now
    if nproc == 1:
        return run_ranks(cfg, plots=not args.no_plots)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megatron_minitron.demo", json.dumps(cfg.to_json())] + (["--no-plots"] if args.no_plots else [])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"minitron demo: launching {nproc} processes (TP={cfg.tensor_parallel} PP={cfg.pipeline_parallel}) "
          f"with torchrun", flush=True)
    return subprocess.run(cmd, env=env).returncode


def _launched() -> bool:
    """Already one of several launched ranks: torchrun's variables, or an srun step of several tasks (a
    plain command inside an sbatch script is not, and launches its own torchrun job)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    return "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


def run_ranks(cfg, *, plots: bool) -> int:
    """In every launched process: the stages, then (rank 0) results.json, plots and report.md."""
    import warnings

    from megatron_minitron.demo.run import run_demo

    # megatron's notes about apex and CUDA-only settings, repeated for every model built, say nothing here
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    raw = run_demo(cfg)
    if raw is None:
        return 0
    from megatron_minitron.demo.report import finish

    finish(raw, plots=plots)
    return 0
