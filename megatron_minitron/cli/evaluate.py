"""`minitron evaluate`: a checkpoint as it is (zero-shot), at any TP/PP/DP: its validation LM loss, or with
--tasks its scores on lm-evaluation-harness tasks.

    torchrun --nproc-per-node 2 -m megatron_minitron evaluate --load runs/demo/pruned/width --tp 2
    minitron evaluate --load runs/demo/pruned/width --tasks minitron_continuation --out runs/eval

Without --tasks, the samples, schedule and token-weighted reduction are the training loop's validation, so
the number equals what `pretrain`/`distill` log as `val lm loss` for the same weights and data flags. With
--tasks (needs `pip install .[eval]`), the work is in megatron_minitron/evaluation/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_minitron.cli._common import (TRAIN, add_data_arguments, add_parallel_arguments, check_data_files,
                                           data_config, parallel_config)
from megatron_minitron.flags import field_argument, non_negative, positive


OUTPUT_DIRS = ()
"""No generic directory check of --out (see cli.main): it names a JSON file without --tasks, a directory with."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, help="checkpoint to evaluate")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="without --tasks: a JSON file for the losses; with --tasks: a directory for lm-eval's "
                             "results.json (and samples_TASK.jsonl with --log-samples)")
    add_parallel_arguments(parser)
    add_data_arguments(parser)
    e = parser.add_argument_group("evaluation")
    for name in ("seq_length", "micro_batch_size", "global_batch_size", "eval_iters"):
        field_argument(e, *TRAIN, name, type=positive())
    field_argument(e, *TRAIN, "seed", type=non_negative(), note="The seed of the data shuffle, as in training.")
    t = parser.add_argument_group("downstream tasks (lm-evaluation-harness; pip install .[eval])")
    t.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="lm-eval task names instead of the validation loss, e.g. minitron_continuation (built in, "
                        "offline), mmlu, hellaswag")
    t.add_argument("--num-fewshot", type=non_negative(), default=None, help="few-shot examples (default: each task's own)")
    t.add_argument("--limit", type=positive(float), default=None,
                   help="documents per task: a count, or a fraction below 1 (default: all)")
    t.add_argument("--batch-size", type=positive(), default=8, help="sequences per forward pass on each replica")
    t.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a directory of task YAMLs of your own (repeatable)")
    t.add_argument("--log-samples", action="store_true", help="also write per-document records")
    t.add_argument("--add-bos-token", action="store_true", help="start every sequence with the BOS token")


def run(args: argparse.Namespace) -> int:
    from megatron_minitron.config import ConfigError
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.runtime import LaunchEnv
    from megatron_minitron.training.loop import TrainConfig

    # ---- checks that need no process
    parallel = parallel_config(args)
    info = ckpt.resolve(args.load)
    parallel.check_arch(info.arch)
    tokenizer = _tokenizer(args, info)
    if args.tasks is not None:
        return _evaluate_tasks(args, parallel, info, tokenizer)
    if args.seq_length > info.arch.max_position_embeddings:
        raise ConfigError(f"--seq-length {args.seq_length} exceeds the model's max_position_embeddings="
                          f"{info.arch.max_position_embeddings}")
    cfg = TrainConfig(train_iters=2, lr_warmup_iters=0, micro_batch_size=args.micro_batch_size,
                      global_batch_size=args.global_batch_size, seq_length=args.seq_length, eval_iters=args.eval_iters,
                      seed=args.seed)
    env = LaunchEnv.from_environ()
    cfg.num_microbatches(parallel.data_parallel(env.world_size))
    data_cfg = data_config(args, tokenizer)
    check_data_files(data_cfg)
    return _evaluate(args, parallel, env, info, cfg, data_cfg)


def _tokenizer(args, info):
    from megatron_minitron.config import ConfigError
    from megatron_minitron.data.tokenizer import TokenizerRef, tokenizer_ref_for

    if args.tokenizer:
        return tokenizer_ref_for(args.tokenizer)
    if info.tokenizer is not None:
        return TokenizerRef.from_json(info.tokenizer)
    raise ConfigError(f"checkpoint {info.root} names no tokenizer; pass --tokenizer (the one it was trained with)")


def _evaluate_tasks(args, parallel, info, tokenizer) -> int:
    import importlib.util

    from megatron_minitron.config import ConfigError

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("--tasks needs lm-evaluation-harness: pip install 'megatron-minitron[eval]' (or lm-eval)")
    from megatron_minitron.evaluation.run import TaskConfig, evaluate_tasks, summary_lines, write_results
    from megatron_minitron.runtime import initialize, shutdown

    cfg = TaskConfig(tasks=tuple(t.strip() for t in args.tasks.split(",")), num_fewshot=args.num_fewshot,
                     limit=args.limit, batch_size=args.batch_size, include_paths=tuple(args.include_path),
                     cache_dir=args.cache_dir, log_samples=args.log_samples, add_bos_token=args.add_bos_token,
                     seed=args.seed)
    if args.out and Path(args.out).is_file():
        raise ConfigError(f"--out {args.out} is a file; with --tasks it names a directory for results.json")
    runtime = initialize(parallel, seed=args.seed)
    try:
        results = evaluate_tasks(info, tokenizer, runtime, cfg)
        if results is not None:
            for line in summary_lines(results):
                print(f"{info.root}: {line}", flush=True)
            if args.out:
                for path in write_results(results, Path(args.out)):
                    print(f"wrote {path}", flush=True)
    finally:
        shutdown()
    return 0


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
