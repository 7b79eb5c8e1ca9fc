"""`minitron cache-logits`: run the teacher once over exactly the samples a `minitron distill` run with the
same data flags sees, in its order, and store per token its top-k token ids, their log-probabilities and
the log of the mass left outside them; students then distill with `--teacher-logits OUT`, no teacher built.

    torchrun --nproc-per-node 2 -m megatron_minitron cache-logits --teacher runs/teacher --tp 2 \
        --train-iters 400 --global-batch-size 16 --seq-length 256 --top-k 64 --out runs/teacher-top64

The size on disk is printed before the first forward pass and refused when the filesystem cannot hold
it. A killed run is completed by the same command (whole shards are kept, the rest redone).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_minitron.cli._common import (TRAIN, add_data_arguments, add_parallel_arguments, data_config,
                                           parallel_config)
from megatron_minitron.config import ConfigError
from megatron_minitron.flags import field_argument, non_negative, positive


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="the teacher's checkpoint")
    parser.add_argument("--out", required=True, help="cache directory: manifest.json and the shards")
    parser.add_argument("--top-k", type=positive(), required=True,
                        help="tokens kept per position (K); the padded vocabulary size keeps the whole distribution")
    parser.add_argument("--kd-temperature", type=positive(float), default=1.0,
                        help="softmax temperature of the cached log-probabilities (distill at the same one)")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache already in --out")
    parser.add_argument("--bf16", action="store_true", help="run the teacher in bf16 (log-probabilities stay fp32)")
    add_parallel_arguments(parser)
    add_data_arguments(parser)
    t = parser.add_argument_group("the distillation run to cache for (its data flags)")
    for name in ("train_iters", "seq_length", "micro_batch_size", "global_batch_size", "eval_iters", "seed"):
        field_argument(t, *TRAIN, name, type=positive() if name != "seed" else non_negative())


def run(args: argparse.Namespace) -> int:
    from megatron_minitron.cli.distill import shared_tokenizer
    from megatron_minitron.cli._common import check_data_files
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.runtime import LaunchEnv
    from megatron_minitron.training.loop import TrainConfig

    parallel = parallel_config(args)
    teacher = ckpt.resolve(args.teacher)
    arch = teacher.arch
    if args.top_k > arch.padded_vocab:
        raise ConfigError(f"--top-k {args.top_k} exceeds the teacher's padded vocabulary ({arch.padded_vocab}); "
                          f"{arch.padded_vocab} keeps the whole distribution")
    if args.seq_length > arch.max_position_embeddings:
        raise ConfigError(f"--seq-length {args.seq_length} exceeds the teacher's max_position_embeddings="
                          f"{arch.max_position_embeddings}")
    out = Path(args.out)
    if out.resolve().is_relative_to(teacher.root.resolve()):
        raise ConfigError(f"--out {out} is inside --teacher {teacher.root}; write the cache elsewhere")
    parallel.check_arch(arch)
    env = LaunchEnv.from_environ()
    cfg = TrainConfig(train_iters=args.train_iters, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
                      global_batch_size=args.global_batch_size, eval_iters=args.eval_iters, seed=args.seed,
                      lr_warmup_iters=0)
    cfg.num_microbatches(parallel.data_parallel(env.world_size))  # the batch divides over the replicas
    data_cfg = data_config(args, shared_tokenizer(args.tokenizer, teacher, teacher))
    check_data_files(data_cfg)
    return _cache(args, parallel, env, cfg, data_cfg, teacher, out)


def _cache(args, parallel, env, cfg, data_cfg, teacher, out: Path) -> int:
    import torch

    from megatron_minitron.data.loader import load_tokenizer
    from megatron_minitron.distill.logits_cache import cache_logits
    from megatron_minitron.runtime import initialize, shutdown

    runtime = initialize(parallel, seed=cfg.seed, env=env)
    try:
        def log(line: str) -> None:
            if runtime.is_logging_rank:
                print(line, flush=True)

        manifest = cache_logits(teacher_info=teacher, runtime=runtime, data_cfg=data_cfg,
                                tokenizer=load_tokenizer(data_cfg), train_iters=cfg.train_iters,
                                global_batch_size=cfg.global_batch_size, micro_batch_size=cfg.micro_batch_size,
                                eval_iters=cfg.eval_iters, top_k=args.top_k, temperature=args.kd_temperature, out=out,
                                overwrite=args.overwrite, dtype=torch.bfloat16 if args.bf16 else None, log=log)
        log(f"wrote {out}: {manifest.samples('train')} training and {manifest.samples('valid')} validation samples "
            f"of the teacher's top-{manifest.top_k}")
    finally:
        shutdown()
    return 0
