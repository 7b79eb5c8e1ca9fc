"""Argument groups shared by several subcommands (parallel layout, data)."""

from __future__ import annotations

import argparse

from megatron_minitron.config import ConfigError


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism (data-parallel size = world size / (TP x PP))")
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    group.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    group.add_argument("--sequence-parallel", action="store_true", help="sequence parallelism (needs --tp > 1)")
    group.add_argument("--first-stage-layers", type=int, default=None, help="layers on the first pipeline stage")
    group.add_argument("--last-stage-layers", type=int, default=None, help="layers on the last pipeline stage")


def parallel_config(args: argparse.Namespace):
    from megatron_minitron.runtime import ParallelConfig

    return ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, sequence_parallel=args.sequence_parallel,
                          first_stage_layers=args.first_stage_layers, last_stage_layers=args.last_stage_layers)


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


def parse_blend(values):
    """Megatron-LM's --data-path: `P1 P2` (equal weights) or `W1 P1 W2 P2`."""
    if not values:
        return None
    try:
        float(values[0])
    except ValueError:
        return tuple((1.0, prefix) for prefix in values)
    if len(values) % 2:
        raise ConfigError(f"--data-path {' '.join(values)}: expected WEIGHT PREFIX pairs")
    pairs = []
    for weight, prefix in zip(values[::2], values[1::2]):
        try:
            pairs.append((float(weight), prefix))
        except ValueError:
            raise ConfigError(f"--data-path: {weight!r} is not a weight; mix no bare prefixes with weighted ones") from None
    return tuple(pairs)
