"""`minitron pretrain`: train a GPT model with megatron-core at any TP/PP/DP.

    torchrun --nproc-per-node 2 -m megatron_minitron pretrain --arch small --tp 2 --save runs/teacher

Without --data-path it trains on the embedded corpus (CPython's documentation) with a SentencePiece
tokenizer trained on it. --save DIR receives checkpoints (Megatron-LM layout), metrics.jsonl and
run.json; an existing run there is continued only with --resume.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_minitron.cli._common import (add_data_arguments, add_parallel_arguments, add_training_arguments,
                                           check_checkpoint_space, check_data_files, check_run_dir, data_config,
                                           parallel_config, run_session, train_config, write_run_record)
from megatron_minitron.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="small", help="architecture preset name or JSON file (default: small)")
    parser.add_argument("--init", default=None, help="start from this checkpoint's weights (architecture from it)")
    parser.add_argument("--save", required=True, help="run directory: checkpoints, metrics.jsonl, run.json")
    parser.add_argument("--resume", action="store_true", help="continue the run already in --save")
    parser.add_argument("--overwrite", action="store_true", help="delete a previous run in --save first")
    add_parallel_arguments(parser)
    add_data_arguments(parser)
    add_training_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from megatron_minitron.config import load_arch
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.runtime import LaunchEnv

    # ---- everything that can be checked before processes and data: fail fast, on every rank alike
    parallel = parallel_config(args)
    cfg = train_config(args)
    save = Path(args.save)
    check_run_dir(save, resume=args.resume, overwrite=args.overwrite)
    init_info = ckpt.resolve(args.init) if args.init else None
    arch = init_info.arch if init_info else load_arch(args.arch)
    parallel.check_arch(arch)
    env = LaunchEnv.from_environ()
    cfg.num_microbatches(parallel.data_parallel(env.world_size))
    if cfg.seq_length > arch.max_position_embeddings:
        raise ConfigError(f"--seq-length {cfg.seq_length} exceeds the model's max_position_embeddings="
                          f"{arch.max_position_embeddings}")
    data_cfg = _data_config(args, init_info)
    check_data_files(data_cfg)
    fixed_vocab = init_info is not None or Path(args.arch).is_file()
    if data_cfg.tokenizer is not None and fixed_vocab:
        from megatron_minitron.data.loader import check_vocab_fits

        check_vocab_fits(data_cfg.tokenizer.load(), arch.vocab_size)  # the vocabulary is fixed by the model
    if fixed_vocab:
        check_checkpoint_space(save, arch)
    else:  # a preset trained from scratch takes the tokenizer's vocabulary (below)
        vocab = data_cfg.tokenizer.load().vocab_size if data_cfg.tokenizer else data_cfg.default_vocab_size
        check_checkpoint_space(save, arch.replace(vocab_size=vocab, padded_vocab_size=None))
    check = None
    if args.resume:
        from megatron_minitron.training.resume import check_resume

        check = check_resume(save, {"train": cfg.to_json(), "data": data_cfg.to_json()}, train_iters=cfg.train_iters,
                             exit_interval=cfg.exit_interval)
        if check.done:
            print(f"the run in {save} is already at iteration {check.iteration} (--train-iters); nothing to do, "
                  f"nothing was changed", flush=True)
            return 0
    return _train(args, parallel, cfg, env, save, arch, init_info, data_cfg, check)


def _data_config(args: argparse.Namespace, init_info):
    from megatron_minitron.data.tokenizer import TokenizerRef, tokenizer_ref_for

    if args.tokenizer:
        tokenizer = tokenizer_ref_for(args.tokenizer)
    elif init_info is not None and init_info.tokenizer is not None:
        tokenizer = TokenizerRef.from_json(init_info.tokenizer)
    else:
        tokenizer = None
    return data_config(args, tokenizer)


def _train(args, parallel, cfg, env, save: Path, arch, init_info, data_cfg, check) -> int:
    from megatron_minitron.data.loader import load_tokenizer, run_batches, tokenizer_json
    from megatron_minitron.model.checkpoint import latest_iteration
    from megatron_minitron.runtime.dist import moe_token_dispatcher
    from megatron_minitron.training.loop import RunPaths, build_trainer, init_from, lm_task, train

    with run_session(parallel, env, seed=cfg.seed, save=save, overwrite=args.overwrite) as runtime:
        tokenizer = load_tokenizer(data_cfg)
        if init_info is None and not Path(args.arch).is_file():
            # A preset trained from scratch takes the tokenizer's vocabulary.
            arch = arch.replace(vocab_size=tokenizer.vocab_size, padded_vocab_size=None)
        batches = run_batches(data_cfg, tokenizer, cfg, runtime, model_vocab_size=arch.vocab_size)
        trainer = build_trainer(arch, runtime, cfg)
        if init_info is not None and latest_iteration(save) is None:
            init_from(trainer, init_info.root)
        write_run_record(runtime, save, {"train": cfg.to_json(), "data": data_cfg.to_json()}, check=check,
                         arch=arch.to_json(), world_size=env.world_size, parallel=vars(parallel))
        if runtime.is_logging_rank:
            print(f"training {arch.num_parameters() / 1e6:.2f}M parameters at TP={parallel.tensor_parallel} "
                  f"PP={parallel.pipeline_parallel} DP={runtime.data_parallel} on {runtime.device.type} "
                  f"({runtime.backend}); vocabulary {tokenizer.vocab_size}", flush=True)
            if arch.is_moe:
                print(f"mixture of experts: {arch.num_experts} experts, top-{arch.moe_router_topk}, "
                      f"{arch.num_active_parameters() / 1e6:.2f}M parameters active per token, EP="
                      f"{parallel.expert_parallel}, token dispatcher {moe_token_dispatcher(runtime.backend)!r} "
                      f"({runtime.backend}), aux-loss coefficient {cfg.moe_aux_loss_coeff}", flush=True)
        train(trainer, task=lm_task(runtime.device), **batches, paths=RunPaths(save=save, metrics=save / "metrics.jsonl"),
              tokenizer=tokenizer_json(data_cfg, tokenizer),
              provenance={"command": "pretrain", "init": str(init_info.root) if init_info else None})
    return 0
