"""`minitron evaluate`: the validation LM loss of a checkpoint as it is (zero-shot), at any TP/PP/DP.

    torchrun --nproc-per-node 2 -m megatron_minitron evaluate --load runs/demo/pruned/width --tp 2

The samples, schedule and token-weighted reduction are the training loop's validation, so the number
equals what `pretrain`/`distill` log as `val lm loss` for the same weights and data flags.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_minitron.cli._common import (TRAIN, add_data_arguments, add_parallel_arguments, check_data_files,
                                           parallel_config)
from megatron_minitron.data.blend import parse_blend
from megatron_minitron.flags import field_argument, non_negative, positive


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, help="checkpoint to evaluate")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="also write the losses to this file")
    add_parallel_arguments(parser)
    add_data_arguments(parser)
    e = parser.add_argument_group("evaluation")
    for name in ("seq_length", "micro_batch_size", "global_batch_size", "eval_iters"):
        field_argument(e, *TRAIN, name, type=positive())
    field_argument(e, *TRAIN, "seed", type=non_negative(), note="The seed of the data shuffle, as in training.")


def run(args: argparse.Namespace) -> int:
    from megatron_minitron.config import ConfigError
    from megatron_minitron.data.loader import DataConfig
    from megatron_minitron.data.tokenizer import TokenizerRef, tokenizer_ref_for
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.runtime import LaunchEnv
    from megatron_minitron.training.loop import TrainConfig

    # ---- checks that need no process
    parallel = parallel_config(args)
    info = ckpt.resolve(args.load)
    parallel.check_arch(info.arch)
    if args.seq_length > info.arch.max_position_embeddings:
        raise ConfigError(f"--seq-length {args.seq_length} exceeds the model's max_position_embeddings="
                          f"{info.arch.max_position_embeddings}")
    cfg = TrainConfig(train_iters=2, lr_warmup_iters=0, micro_batch_size=args.micro_batch_size,
                      global_batch_size=args.global_batch_size, seq_length=args.seq_length, eval_iters=args.eval_iters,
                      seed=args.seed)
    env = LaunchEnv.from_environ()
    cfg.num_microbatches(parallel.data_parallel(env.world_size))
    if args.tokenizer:
        tokenizer = tokenizer_ref_for(args.tokenizer)
    elif info.tokenizer is not None:
        tokenizer = TokenizerRef.from_json(info.tokenizer)
    else:
        raise ConfigError(f"checkpoint {info.root} names no tokenizer; pass --tokenizer (the one it was trained with)")
    data_cfg = DataConfig(blend=parse_blend(args.data_path), valid_blend=parse_blend(args.valid_data_path),
                          split=args.split, seq_length=args.seq_length, seed=args.seed, cache_dir=args.cache_dir,
                          tokenizer=tokenizer)
    check_data_files(data_cfg)
    return _evaluate(args, parallel, env, info, cfg, data_cfg)


def _evaluate(args, parallel, env, info, cfg, data_cfg) -> int:
    import math

    from megatron_minitron.data.loader import batch_iterator, build_datasets, load_tokenizer
    from megatron_minitron.demo.run import evaluate_checkpoint
    from megatron_minitron.runtime import initialize, shutdown

    runtime = initialize(parallel, seed=cfg.seed, env=env)
    try:
        tokenizer = load_tokenizer(data_cfg)
        _, valid_ds, _ = build_datasets(data_cfg, tokenizer, (0, cfg.eval_iters * cfg.global_batch_size, 0),
                                        model_vocab_size=info.arch.vocab_size)
        if valid_ds is None:
            from megatron_minitron.config import ConfigError

            raise ConfigError("the data gives no validation samples; pass --valid-data-path or a --split with a "
                              "validation share")
        out = evaluate_checkpoint(info.root, runtime, cfg, lambda: batch_iterator(
            valid_ds, micro_batch_size=cfg.micro_batch_size, dp_rank=runtime.dp_rank, dp_size=runtime.data_parallel))
        result = {"checkpoint": str(info.root), "iteration": info.iteration, "val lm loss": out["lm loss"],
                  "val ppl": math.exp(min(out["lm loss"], 50.0)), "tokens": out["tokens"]}
        if runtime.is_logging_rank:
            print(f"{info.root}: validation lm loss {result['val lm loss']:.4f} (ppl {result['val ppl']:.2f}) on "
                  f"{int(result['tokens']):,} tokens", flush=True)
        if args.out and runtime.rank == 0:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutdown()
    return 0
