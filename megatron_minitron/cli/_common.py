"""Argument groups shared by several subcommands (parallel layout, data)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from megatron_minitron.flags import FieldDefault, field_argument, non_negative, positive, short_run_warmup
from megatron_minitron.config import ConfigError


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism (data-parallel size = world size / (TP x PP))")
    group.add_argument("--tp", type=positive(), default=1, help="tensor-parallel size")
    group.add_argument("--pp", type=positive(), default=1, help="pipeline-parallel size")
    group.add_argument("--ep", type=positive(), default=1,
                       help="expert-parallel size of Mixture-of-Experts layers (divides the experts and the "
                            "data-parallel size)")
    group.add_argument("--sequence-parallel", action="store_true", help="sequence parallelism (needs --tp > 1)")
    group.add_argument("--first-stage-layers", type=positive(), default=None,
                       help="layers on the first pipeline stage")
    group.add_argument("--last-stage-layers", type=positive(), default=None, help="layers on the last pipeline stage")


def parallel_config(args: argparse.Namespace):
    from megatron_minitron.runtime import ParallelConfig

    return ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, sequence_parallel=args.sequence_parallel,
                          first_stage_layers=args.first_stage_layers, last_stage_layers=args.last_stage_layers,
                          expert_parallel=args.ep)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data (default: the embedded CPython-docs corpus)")
    group.add_argument("--data-path", nargs="+", default=None, metavar="[WEIGHT] PREFIX",
                       help="indexed dataset prefixes (.bin/.idx), optionally each preceded by a weight, as in Megatron-LM")
    group.add_argument("--valid-data-path", nargs="+", default=None, metavar="[WEIGHT] PREFIX",
                       help="separate validation blend (otherwise --split cuts one from --data-path)")
    group.add_argument("--split", default="98,2,0", help="train,valid,test proportions of --data-path")
    group.add_argument("--tokenizer", default=None,
                       help="SentencePiece .model or HF tokenizer.json (default: train/reuse one on the embedded corpus)")
    group.add_argument("--cache-dir", default=".cache/minitron-data",
                       help="tokenizer, tokenized corpus and dataset index caches (shared by all ranks)")


TRAIN = ("megatron_minitron.training.loop", "TrainConfig")
"""Where the training flags' fields are declared."""


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field a user sets (default and help from the field)."""
    t = parser.add_argument_group("training")
    for name, kind in (("train_iters", positive()), ("seq_length", positive()), ("micro_batch_size", positive()),
                       ("global_batch_size", positive()), ("lr", positive(float)), ("min_lr", non_negative(float)),
                       ("lr_warmup_iters", non_negative()), ("lr_decay_style", None),
                       ("weight_decay", non_negative(float)), ("clip_grad", non_negative(float)),
                       ("use_distributed_optimizer", None), ("bf16", None), ("log_interval", positive()),
                       ("eval_interval", non_negative()), ("eval_iters", positive()),
                       ("save_interval", non_negative()), ("exit_interval", positive()), ("seed", non_negative()),
                       ("moe_aux_loss_coeff", non_negative(float))):
        field_argument(t, *TRAIN, name, type=kind,
                       choices=["cosine", "linear", "constant"] if name == "lr_decay_style" else None)


def train_config(args: argparse.Namespace):
    from megatron_minitron.training.loop import TrainConfig

    return TrainConfig(
        train_iters=args.train_iters, micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        seq_length=args.seq_length, lr=args.lr, min_lr=args.min_lr, lr_warmup_iters=warmup_iters(args),
        lr_decay_style=args.lr_decay_style, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
        use_distributed_optimizer=args.use_distributed_optimizer, bf16=args.bf16, log_interval=args.log_interval,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters, save_interval=args.save_interval,
        exit_interval=args.exit_interval, seed=args.seed, moe_aux_loss_coeff=args.moe_aux_loss_coeff)


def warmup_iters(args: argparse.Namespace) -> int:
    """--lr-warmup-iters, its default cut for a run shorter than it (see short_run_warmup); a resumed
    run left at the default keeps the warm-up it started with (its saved schedule is restored)."""
    import json

    saved = Path(getattr(args, "save", None) or "") / "run.json"
    if getattr(args, "resume", False) and isinstance(args.lr_warmup_iters, FieldDefault) and saved.is_file():
        try:
            return int(json.loads(saved.read_text())["train"]["lr_warmup_iters"])
        except (ValueError, KeyError, TypeError):
            pass  # a damaged run.json is reported by the resume check
    return short_run_warmup(args.lr_warmup_iters, args.train_iters, flag="lr_warmup_iters", iters_flag="train_iters")


def check_writable_dir(path: Path, flag: str) -> None:
    """A directory we will write into (it may not exist yet): not a file, and writable (checked on the
    nearest existing directory), so that a run does not train for hours and then fail to save."""
    from megatron_minitron.model.checkpoint import nearest_existing

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a directory; give a directory path")
    existing = nearest_existing(path)
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is a file, not a directory; give a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {existing} is not writable; choose a directory you can write to")


def check_checkpoint_space(save: Path, arch) -> None:
    """Room on --save's filesystem for one checkpoint of `arch` with its Adam state (fp32 weights and two
    moments, 12 bytes a parameter), before step 1 rather than after hours of training."""
    from megatron_minitron.model.checkpoint import nearest_existing

    need = 12 * arch.num_parameters()
    free = shutil.disk_usage(nearest_existing(save)).free
    if free < need:
        raise ConfigError(f"--save {save}: {free / 1e6:,.1f} MB free on its filesystem, less than the "
                          f"{need / 1e6:,.1f} MB one checkpoint of this model and its optimizer state takes; "
                          f"free space or choose another --save")


def check_run_dir(save: Path, *, resume: bool, overwrite: bool) -> None:
    """No silent overwrite: an existing run needs --resume (continue) or --overwrite (start again).
    (Whether --save can be written at all is checked for every subcommand by cli.main.)"""
    from megatron_minitron.model.checkpoint import TRACKER

    if not save.exists() or not any(save.iterdir()):
        if resume:
            raise ConfigError(f"--resume: {save} holds no run to continue")
        return
    is_run = (save / TRACKER).exists() or (save / "run.json").exists()
    if resume and is_run:
        return
    if overwrite and is_run:
        return
    if not is_run:
        raise ConfigError(f"--save {save} exists and is not a megatron-minitron run directory; choose a new path")
    raise ConfigError(f"--save {save} already holds a run; pass --resume to continue it or --overwrite to "
                      f"start it again")


@contextlib.contextmanager
def run_session(parallel, env, *, seed: int, save: Path, overwrite: bool) -> Iterator:
    """The processes of a training run (pretrain, distill): the runtime, and with --overwrite the previous run
    in --save removed by rank 0 before anything is written (every rank waits for it)."""
    from megatron_minitron.runtime import session

    with session(parallel, seed=seed, env=env) as runtime:
        if overwrite and runtime.rank == 0 and save.exists():
            shutil.rmtree(save)
        runtime.barrier()
        yield runtime


def write_run_record(runtime, save: Path, settings: dict, *, check, **fields) -> None:
    """SAVE/run.json (rank 0): the settings a resumed run must share, and what the run started from."""
    from megatron_minitron.training.resume import run_record

    if runtime.rank == 0:
        save.mkdir(parents=True, exist_ok=True)
        record = run_record(settings, save=save, check=check, **fields)
        (save / "run.json").write_text(json.dumps(record, indent=2) + "\n")


def data_config(args: argparse.Namespace, tokenizer):
    """The DataConfig of the data flags (add_data_arguments) with this tokenizer (a TokenizerRef or None)."""
    from megatron_minitron.data.blend import parse_blend
    from megatron_minitron.data.loader import DataConfig

    return DataConfig(blend=parse_blend(args.data_path), valid_blend=parse_blend(args.valid_data_path),
                      split=args.split, seq_length=args.seq_length, seed=args.seed, cache_dir=args.cache_dir,
                      tokenizer=tokenizer)


def check_data_files(data_cfg) -> None:
    """The indexed datasets of --data-path/--valid-data-path exist and are whole, before any process."""
    from megatron_minitron.data.loader import check_blend_paths

    check_blend_paths(data_cfg.blend or ())
    check_blend_paths(data_cfg.valid_blend or ())
