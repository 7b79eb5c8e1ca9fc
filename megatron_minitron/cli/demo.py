"""`minitron demo`: the whole Minitron method on the embedded corpus, with a report of what it shows.

    minitron demo                      # ~10M teacher at TP=2 on 2 processes, <= 15 min on 2 CPU cores
    minitron demo --moe                # a MoE teacher halved by experts, by expert width, by random experts
    minitron demo --teacher-iters 2000 --retrain-iters 400 --arch my_arch.json --tp 4 --nproc 8

Trains (or reuses from --teacher-cache) a teacher, scores it at TP with real ranks, prunes it to
about half its parameters by width and by depth, and retrains at equal tokens: width-pruned + KD,
depth-pruned + KD, the width architecture from scratch, width-pruned + LM loss only; plus random
ranking and the 3x3 aggregation grid zero-shot. --out receives results.json, report.md and plots/.
With --moe (demo/moe.py), a Mixture-of-Experts teacher is cut to equal total parameters by whole experts
(importance-ranked or random) and by expert width, and each is distilled at equal tokens.
--seeds N repeats the arms and the zero-shot comparisons over N seeds and judges each finding against
the spread.

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

from megatron_minitron.flags import FieldDefault, field_argument, non_negative, positive, short_run_warmup
from megatron_minitron.config import ConfigError
from megatron_minitron.demo.config import MARKER
"""Written first into --out: marks a directory the demo may replace on its next run."""


DEMO = ("megatron_minitron.demo.config", "DemoConfig")
"""Where the demo's flags' fields are declared."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per DemoConfig field (default and help from the field)."""
    field_argument(parser, *DEMO, "out", type=str, note="A previous demo run there is replaced.")
    for name in ("arch", "teacher", "teacher_cache"):
        field_argument(parser, *DEMO, name, type=str)
    field_argument(parser, *DEMO, "moe")
    p = parser.add_argument_group("processes and layout (every stage runs at this TP x PP)")
    field_argument(p, *DEMO, "tensor_parallel", flag="--tp", dest="tensor_parallel", metavar="N", type=positive())
    field_argument(p, *DEMO, "pipeline_parallel", flag="--pp", dest="pipeline_parallel", metavar="N", type=positive())
    p.add_argument("--nproc", type=positive(), default=None,
                   help="processes to launch on this machine (default TP x PP; the rest is data parallel); "
                        "ignored under torchrun/srun")
    t = parser.add_argument_group("steps and sizes")
    for name in ("teacher_iters", "retrain_iters", "seq_length", "micro_batch_size", "global_batch_size",
                 "eval_iters", "calib_samples", "lm_loss_samples", "width_hidden_size", "width_ffn_hidden_size",
                 "width_num_attention_heads", "depth_num_layers"):
        field_argument(t, *DEMO, name, type=positive())
    field_argument(t, *DEMO, "seeds", type=positive())
    for name in ("teacher_lr", "retrain_lr"):
        field_argument(t, *DEMO, name, type=positive(float))
    for name in ("warmup_iters", "retrain_warmup_iters", "eval_interval", "random_seed", "seed", "task_limit"):
        field_argument(t, *DEMO, name, type=non_negative())
    g = parser.add_argument_group("data (default: the embedded CPython-docs corpus)")
    for name in ("data_path", "valid_data_path"):
        field_argument(g, *DEMO, name, type=str, nargs="+", metavar="[WEIGHT] PREFIX")
    for name in ("split", "tokenizer", "cache_dir"):
        field_argument(g, *DEMO, name, type=str)
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")


def config_from_args(args: argparse.Namespace):
    from megatron_minitron.demo.config import DemoConfig

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    for warmup, iters in (("warmup_iters", "teacher_iters"), ("retrain_warmup_iters", "retrain_iters")):
        values[warmup] = short_run_warmup(values[warmup], values[iters], flag=warmup, iters_flag=iters)
    # plain ints: a run in this process (one rank) saves them in its checkpoints, which torch.load refuses
    values = {k: int(v) if isinstance(v, FieldDefault) else v for k, v in values.items()}
    return DemoConfig(**values, started_at=time.time())


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
    if cfg.moe:
        from megatron_minitron.demo.moe import moe_targets

        moe_targets(arch, cfg)  # a dense teacher, or too few experts to halve: refused here
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

    if cfg.moe:  # experts vs expert width vs random experts (demo/moe.py)
        from megatron_minitron.demo.moe import run_moe_demo as run_demo
        from megatron_minitron.demo.moe_report import finish
    else:
        from megatron_minitron.demo.report import finish
        from megatron_minitron.demo.run import run_demo

    # megatron's notes about apex and CUDA-only settings, repeated for every model built, say nothing here
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    raw = run_demo(cfg)
    if raw is None:
        return 0
    finish(raw, plots=plots)
    return 0
