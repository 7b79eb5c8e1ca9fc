"""`minitron importance`: activation importance of heads, query groups, MLP neurons, hidden channels
and layers (and of a MoE model's experts, expert neurons and shared expert), at any TP x PP x EP x DP,
written as a layout-independent scores directory.

    torchrun --nproc-per-node 2 -m megatron_minitron importance --load runs/teacher --tp 2 \
        --num-samples 1024 --seq-length 4096 --out runs/teacher-scores

Calibration data: --data-path (indexed dataset), --data-file (.jsonl/.txt) or, by default, the
embedded corpus. Every check that needs no forward pass runs first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_minitron.cli._common import add_parallel_arguments, parallel_config
from megatron_minitron.flags import field_argument, non_negative, positive
from megatron_minitron.config import ConfigError

IMPORTANCE = ("megatron_minitron.importance.run", "ImportanceConfig")
CALIBRATION = ("megatron_minitron.importance.calibration", "CalibrationData")
"""Where the importance flags' fields are declared."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, help="checkpoint to score")
    parser.add_argument("--out", required=True, help="scores directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace scores already in --out")
    add_parallel_arguments(parser)
    parser.add_argument("--transformer-engine", action=argparse.BooleanOptionalAction, default=None,
                        help="Transformer-Engine layer spec (default: when TE and CUDA are present)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 weights (default: on GPU only); statistics are accumulated in fp32/fp64")
    d = parser.add_argument_group("calibration data (default: the embedded corpus)")
    d.add_argument("--data-path", nargs="+", default=None, metavar="[WEIGHT] PREFIX",
                   help="indexed dataset prefix(es), as Megatron-LM's --data-path")
    d.add_argument("--data-file", default=None, help="a .jsonl or .txt file, tokenized into --cache-dir")
    d.add_argument("--tokenizer", default=None, help="SentencePiece .model or tokenizer.json (default: the "
                                                     "checkpoint's)")
    field_argument(d, *CALIBRATION, "cache_dir")
    field_argument(d, *CALIBRATION, "num_samples", type=positive())
    d.add_argument("--cap-samples", action="store_true",
                   help="use all available samples when the data holds fewer than --num-samples")
    d.add_argument("--seq-length", type=positive(), default=None,
                   help="tokens per sample (default: min(4096, max positions))")
    field_argument(d, *IMPORTANCE, "micro_batch_size", type=positive())
    field_argument(d, *CALIBRATION, "seed", type=non_negative())
    s = parser.add_argument_group("scores")
    field_argument(s, *IMPORTANCE, "seq_aggregation", choices=["mean", "l2", "var"])
    field_argument(s, *IMPORTANCE, "batch_aggregation", choices=["mean", "l2", "var"])
    s.add_argument("--ffn-source", default="post", choices=["post", "pre"],
                   help="MLP neurons from the post-activation (input of linear_fc2) or X·W1ᵀ")
    s.add_argument("--hidden-final-norm", action="store_true", help="include the final norm in hidden scores")
    s.add_argument("--lm-loss", action="store_true", help="LM loss with each layer removed (one pass per layer)")
    s.add_argument("--lm-loss-blocks", type=positive(), nargs="+", default=(), metavar="K",
                   help="LM loss with each contiguous block of K layers removed")
    s.add_argument("--lm-loss-samples", type=positive(), default=None, help="samples for the LM-loss passes")
    field_argument(s, *IMPORTANCE, "expert_weighting", choices=["router", "plain"])


def run(args: argparse.Namespace) -> int:
    from megatron_minitron.data.tokenizer import TokenizerRef, tokenizer_ref_for
    from megatron_minitron.importance.calibration import CalibrationData
    from megatron_minitron.importance.run import ImportanceConfig
    from megatron_minitron.importance.scores import check_new_scores_dir
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.runtime import LaunchEnv

    # ---- checks that need neither processes nor data
    parallel = parallel_config(args)
    info = ckpt.resolve(args.load)
    arch = info.arch
    parallel.check_arch(arch)
    check_new_scores_dir(args.out, overwrite=args.overwrite)
    if Path(args.out).resolve().is_relative_to(info.root.resolve()):
        raise ConfigError(f"--out {args.out} is inside the checkpoint {info.root}; write scores elsewhere")
    seq_length = args.seq_length or min(4096, arch.max_position_embeddings)
    if seq_length > arch.max_position_embeddings:
        raise ConfigError(f"--seq-length {seq_length} exceeds the model's max_position_embeddings="
                          f"{arch.max_position_embeddings}")
    if args.data_path:
        from megatron_minitron.data.blend import parse_blend
        from megatron_minitron.data.loader import check_blend_paths

        check_blend_paths(parse_blend(args.data_path))
    calibration = CalibrationData(data_path=tuple(args.data_path) if args.data_path else None,
                                  data_file=args.data_file, num_samples=args.num_samples, seq_length=seq_length,
                                  seed=args.seed, cap=args.cap_samples, cache_dir=args.cache_dir)
    cfg = ImportanceConfig(micro_batch_size=args.micro_batch_size, seq_aggregation=args.seq_aggregation,
                           batch_aggregation=args.batch_aggregation, ffn_source=args.ffn_source,
                           hidden_final_norm=args.hidden_final_norm, lm_loss=args.lm_loss,
                           block_sizes=tuple(args.lm_loss_blocks), lm_loss_samples=args.lm_loss_samples,
                           expert_weighting=args.expert_weighting)
    cfg.validate(arch.num_layers)
    if args.tokenizer:
        tokenizer = tokenizer_ref_for(args.tokenizer)
    elif info.tokenizer is not None:
        tokenizer = TokenizerRef.from_json(info.tokenizer)
    else:
        raise ConfigError(f"checkpoint {info.root} names no tokenizer; pass --tokenizer (the one it was trained "
                          f"with)")
    tokenizer = tokenizer.load()
    from megatron_minitron.data.loader import check_vocab_fits

    check_vocab_fits(tokenizer, arch.vocab_size)
    env = LaunchEnv.from_environ()
    cfg.check_expert_parallel(args.num_samples, data_parallel=parallel.data_parallel(env.world_size),
                              expert_parallel=parallel.expert_parallel)
    from megatron_minitron.model.integrity import check_complete, fingerprint

    check_complete(info.path)
    return _score(args, parallel, env, info, calibration, cfg, tokenizer, fingerprint(info.path))


def _score(args, parallel, env, info, calibration, cfg, tokenizer, checkpoint_fingerprint: str) -> int:
    import dataclasses

    import torch

    from megatron_minitron.importance.calibration import build_calibration_dataset, micro_batches
    from megatron_minitron.importance.run import collect, make_scores
    from megatron_minitron.importance.scores import save_scores
    from megatron_minitron.model.build import build_model, transformer_engine_available
    from megatron_minitron.model.checkpoint import load_checkpoint
    from megatron_minitron.runtime import initialize, shutdown

    runtime = initialize(parallel, seed=calibration.seed, env=env)
    try:
        def log(line: str) -> None:
            if runtime.is_logging_rank:
                print(line, flush=True)

        arch = info.arch
        use_te = transformer_engine_available() if args.transformer_engine is None else args.transformer_engine
        bf16 = runtime.device.type == "cuda" if args.bf16 is None else args.bf16
        dataset, num_samples = build_calibration_dataset(calibration, tokenizer, model_vocab_size=arch.vocab_size)
        # the all-gather token dispatcher on every backend: the expert hooks read its token order
        model = build_model(arch, runtime, dtype=torch.bfloat16 if bf16 else torch.float32, use_te=use_te,
                            moe_dispatcher="allgather")
        load_checkpoint(info, model=model, runtime=runtime)
        log(f"importance of {info.root} ({arch.num_parameters() / 1e6:.2f}M parameters) on {num_samples} samples x "
            f"{calibration.seq_length} tokens at TP={parallel.tensor_parallel} PP={parallel.pipeline_parallel} "
            f"DP={runtime.data_parallel}{' SP' if parallel.sequence_parallel else ''}, "
            f"{'TE' if use_te else 'local'} spec, on {runtime.device.type}")

        def batches():
            return micro_batches(dataset, num_samples, micro_batch_size=cfg.micro_batch_size,
                                 dp_rank=runtime.dp_rank, dp_size=runtime.data_parallel)

        tensors, lm_loss = collect(model, runtime, arch, batches, num_samples, calibration.seq_length, cfg,
                                   use_te=use_te, log=log)
        scores = make_scores(tensors, arch=arch, info=info, calibration=calibration, num_samples=num_samples,
                             cfg=cfg, use_te=use_te, runtime=runtime, lm_loss=lm_loss)
        scores = dataclasses.replace(scores, manifest=dataclasses.replace(
            scores.manifest, checkpoint_fingerprint=checkpoint_fingerprint))
        if runtime.rank == 0:
            out = Path(args.out)
            if out.exists() and args.overwrite:
                import shutil

                shutil.rmtree(out)
            elif out.exists():
                out.rmdir()  # checked empty before the forward passes
            save_scores(scores, out)
        runtime.barrier()
        log(f"calibration LM loss {lm_loss:.4f}\n{scores.summary()}\nscores written to {args.out}")
    finally:
        shutdown()
    return 0
