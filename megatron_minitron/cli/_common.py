"""Argument groups shared by several subcommands (parallel layout, data)."""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_minitron.config import ConfigError


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism (data-parallel size = world size / (TP x PP))")
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    group.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    group.add_argument("--ep", type=int, default=1,
                       help="expert-parallel size of Mixture-of-Experts layers (divides the experts and the "
                            "data-parallel size)")
    group.add_argument("--sequence-parallel", action="store_true", help="sequence parallelism (needs --tp > 1)")
    group.add_argument("--first-stage-layers", type=int, default=None, help="layers on the first pipeline stage")
    group.add_argument("--last-stage-layers", type=int, default=None, help="layers on the last pipeline stage")


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


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    t = parser.add_argument_group("training")
    t.add_argument("--train-iters", type=int, default=300)
    t.add_argument("--seq-length", type=int, default=256)
    t.add_argument("--micro-batch-size", type=int, default=4)
    t.add_argument("--global-batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--min-lr", type=float, default=1e-4)
    t.add_argument("--lr-warmup-iters", type=int, default=20)
    t.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant"])
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--clip-grad", type=float, default=1.0)
    t.add_argument("--use-distributed-optimizer", action="store_true")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 weights with fp32 main weights (default: on GPU only)")
    t.add_argument("--log-interval", type=int, default=10)
    t.add_argument("--eval-interval", type=int, default=100)
    t.add_argument("--eval-iters", type=int, default=10)
    t.add_argument("--save-interval", type=int, default=0)
    t.add_argument("--exit-interval", type=int, default=None)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--moe-aux-loss-coeff", type=float, default=0.01,
                   help="weight of the routers' load-balancing loss of a Mixture-of-Experts model (0: off; "
                        "dense models ignore it)")


def train_config(args: argparse.Namespace):
    from megatron_minitron.training.loop import TrainConfig

    return TrainConfig(
        train_iters=args.train_iters, micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        seq_length=args.seq_length, lr=args.lr, min_lr=args.min_lr, lr_warmup_iters=args.lr_warmup_iters,
        lr_decay_style=args.lr_decay_style, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
        use_distributed_optimizer=args.use_distributed_optimizer, bf16=args.bf16, log_interval=args.log_interval,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters, save_interval=args.save_interval,
        exit_interval=args.exit_interval, seed=args.seed, moe_aux_loss_coeff=args.moe_aux_loss_coeff)


def check_run_dir(save: Path, *, resume: bool, overwrite: bool) -> None:
    """No silent overwrite: an existing run needs --resume (continue) or --overwrite (start again)."""
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
