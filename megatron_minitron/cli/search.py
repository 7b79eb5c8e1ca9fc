"""`minitron search`: find the student shape within a parameter budget the Minitron way — prune every
candidate from the same importance scores, distill each briefly, keep the best validation loss.

    torchrun --nproc-per-node 2 -m megatron_minitron search --load runs/teacher --scores runs/scores \
        --budget 5M --tp 2 --train-iters 400 --out runs/search

The space is the paper's style of grid by default (depth 100-75%, hidden and MLP 100-50% in eighths,
heads 100-50%; query groups frozen), or per-axis flags, or --space JSON. OUT receives one directory per
candidate, search.json, search.md, search.png and best_plan.json (ready for `minitron prune --plan`);
--winner-iters N also prunes and distills the winner for N steps into OUT/winner (its result joins
search.json and search.md; its data order is that of a separate `minitron distill` of N steps). A
killed search continues with --resume from its last finished candidate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_minitron.cli._common import (add_data_arguments, add_parallel_arguments, add_training_arguments,
                                           check_data_files, parallel_config, train_config)
from megatron_minitron.flags import non_negative, positive
from megatron_minitron.config import ConfigError
from megatron_minitron.data.blend import parse_blend

AXIS_FLAGS = {"num_layers": "--layers", "hidden_size": "--hidden", "ffn_hidden_size": "--ffn",
              "num_attention_heads": "--heads", "num_query_groups": "--groups"}


def parse_count(text: str) -> int:
    """"5.2M", "4B", "850k" or a plain integer."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}
    text = str(text).strip().lower().replace(",", "").replace("_", "")
    try:
        count = int(float(text[:-1]) * scale[text[-1]]) if text and text[-1] in scale else int(text)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a parameter count (e.g. 4B, 5.2M, 850k)") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be a positive parameter count, got {text}")
    return count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_minitron.cli.distill import add_loss_arguments

    parser.add_argument("--load", required=True, help="the unpruned model (the teacher of every candidate)")
    parser.add_argument("--scores", required=True, help="its scores directory (`minitron importance`)")
    parser.add_argument("--allow-foreign-scores", action="store_true",
                        help="use --scores computed on another checkpoint than --load (warns; by default refused)")
    parser.add_argument("--out", required=True, help="search directory")
    parser.add_argument("--teacher-logits", default=None, metavar="DIR",
                        help="every candidate distills from this cache of --load's top-k logits (`minitron "
                             "cache-logits` with the same data flags) instead of running the teacher")
    parser.add_argument("--resume", action="store_true", help="continue the search in --out")
    parser.add_argument("--overwrite", action="store_true", help="delete a previous search in --out first")
    s = parser.add_argument_group("search space")
    s.add_argument("--budget", type=parse_count, required=True, help="target parameter count (e.g. 4B, 5.2M)")
    s.add_argument("--tolerance", type=non_negative(float), default=0.05, help="keep candidates within ±this fraction (0.05)")
    s.add_argument("--space", default=None, help="JSON file: axis -> list of allowed sizes")
    for axis, flag in AXIS_FLAGS.items():
        s.add_argument(flag, type=positive(), nargs="+", default=None, metavar="N", help=f"allowed {axis} values")
    s.add_argument("--freeze", nargs="+", default=None, choices=list(AXIS_FLAGS.values()),
                   help="axes kept at the source's size in the default grid (default: --groups)")
    s.add_argument("--layer-metric", default=None, choices=["bi", "lm_loss", "block"],
                   help="how layers are dropped for shallower candidates (default bi)")
    s.add_argument("--winner-iters", type=non_negative(), default=0, help="then prune and distill the winner this many steps")
    s.add_argument("--keep-checkpoints", action="store_true", help="keep every candidate's checkpoints")
    add_parallel_arguments(parser)
    add_data_arguments(parser)
    add_training_arguments(parser)
    add_loss_arguments(parser)


def search_space(args, source):
    from megatron_minitron.search.space import SearchSpace, load_space

    flags = {axis: tuple(getattr(args, flag[2:])) for axis, flag in AXIS_FLAGS.items()
             if getattr(args, flag[2:]) is not None}
    if args.space and flags:
        raise ConfigError(f"give the space as --space or as axis flags ({', '.join(AXIS_FLAGS[a] for a in flags)}), "
                          f"not both")
    if args.space:
        return load_space(args.space)
    if flags:
        return SearchSpace(**flags)
    frozen = tuple(axis for axis, flag in AXIS_FLAGS.items() if flag in (args.freeze or ["--groups"]))
    return SearchSpace.default(source, frozen=frozen)


def run(args: argparse.Namespace) -> int:
    from megatron_minitron.cli.distill import distill_config, shared_tokenizer
    from megatron_minitron.data.loader import DataConfig
    from megatron_minitron.importance.scores import load_scores
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.runtime import LaunchEnv, session
    from megatron_minitron.search.run import SearchJob, SearchSetup, check_out, check_winner, search
    from megatron_minitron.search.space import enumerate_candidates, explain_empty

    # ---- every check that needs no process, before any pruning or training
    parallel = parallel_config(args)
    cfg, dcfg = train_config(args), distill_config(args)
    source = ckpt.resolve(args.load)
    scores = load_scores(args.scores)
    scores.check_belongs_to(source.arch, what=f"--load {args.load}")
    scores.check_computed_on(source.path, what=f"--load {args.load}", allow_foreign=args.allow_foreign_scores)
    space = search_space(args, source.arch)
    candidates, removed = enumerate_candidates(source.arch, space, budget=args.budget, tolerance=args.tolerance,
                                               tensor_parallel=parallel.tensor_parallel,
                                               pipeline_parallel=parallel.pipeline_parallel)
    if not candidates:
        raise ConfigError(explain_empty(removed, sum(removed.values())))
    if cfg.seq_length > source.arch.max_position_embeddings:
        raise ConfigError(f"--seq-length {cfg.seq_length} exceeds the model's max_position_embeddings="
                          f"{source.arch.max_position_embeddings}")
    out = Path(args.out)
    check_out(out, resume=args.resume, overwrite=args.overwrite)
    if args.winner_iters < 0:
        raise ConfigError(f"--winner-iters must be >= 0, got {args.winner_iters}")
    check_winner(out, args.winner_iters, overwrite=args.overwrite)
    env = LaunchEnv.from_environ()
    cfg.num_microbatches(parallel.data_parallel(env.world_size))
    tokenizer = shared_tokenizer(args.tokenizer, source, source)
    data_cfg = DataConfig(blend=parse_blend(args.data_path), valid_blend=parse_blend(args.valid_data_path),
                          split=args.split, seq_length=args.seq_length, seed=args.seed, cache_dir=args.cache_dir,
                          tokenizer=tokenizer)
    check_data_files(data_cfg)
    if args.teacher_logits is not None:
        from megatron_minitron.distill.logits_cache import LogitsCache, check_run
        from megatron_minitron.model.integrity import fingerprint

        check_run(LogitsCache(args.teacher_logits), student_arch=source.arch, data_cfg=data_cfg, train_cfg=cfg,
                  distill_cfg=dcfg, teacher_fingerprint=fingerprint(source.path))
    setup = SearchSetup(source=source, scores=scores, out=out, layer_metric=args.layer_metric, seed=cfg.seed,
                        keep_checkpoints=args.keep_checkpoints)
    job = SearchJob(setup=setup, scores_path=str(args.scores), budget=args.budget, tolerance=args.tolerance,
                    space=space, candidates=tuple(candidates), removed=dict(removed), train=cfg, distill=dcfg,
                    data=data_cfg, winner_iters=args.winner_iters, overwrite=args.overwrite,
                    teacher_logits=args.teacher_logits)
    with session(parallel, seed=cfg.seed, env=env) as runtime:
        search(job, runtime)
    return 0
