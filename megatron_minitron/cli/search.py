"""`minitron search`: find the student shape within a parameter budget the Minitron way — prune every
candidate from the same importance scores, distill each briefly, keep the best validation loss.

    torchrun --nproc-per-node 2 -m megatron_minitron search --load runs/teacher --scores runs/scores \
        --budget 5M --tp 2 --train-iters 400 --out runs/search

The space is the paper's style of grid by default (depth 100-75%, hidden and MLP 100-50% in eighths,
heads 100-50%; query groups frozen; for a Mixture-of-Experts source also experts 100/75/50% and expert width
100-50%), or per-axis flags, or --space JSON. --budget-kind active counts the parameters one token passes
through (top-k routed experts) instead of all of them. OUT receives one directory per
candidate, search.json, search.md, search.png and best_plan.json (ready for `minitron prune --plan`);
--winner-iters N also prunes and distills the winner for N steps into OUT/winner (its result joins
search.json and search.md; its data order is that of a separate `minitron distill` of N steps). A
killed search continues with --resume from its last finished candidate. --score TASK[:METRIC] ranks the
candidates by an lm-eval task scored after each distillation (validation loss still reported beside it);
--min-score X then stops the search with an error before the winner's distillation when the best score is
below X.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from megatron_minitron.cli._common import (add_data_arguments, add_parallel_arguments, add_training_arguments,
                                           check_data_files, data_config, parallel_config, train_config)
from megatron_minitron.flags import Bounded, non_negative, positive
from megatron_minitron.config import ConfigError

AXIS_FLAGS = {"num_layers": "--layers", "hidden_size": "--hidden", "ffn_hidden_size": "--ffn",
              "num_attention_heads": "--heads", "num_query_groups": "--groups", "num_experts": "--experts",
              "moe_ffn_hidden_size": "--expert-ffn"}


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
    s.add_argument("--budget-kind", choices=["total", "active"], default="total",
                   help="what --budget counts: every parameter (total) or those one token passes through (active: "
                        "a Mixture-of-Experts layer counts its top-k routed experts; equal to total for dense models)")
    s.add_argument("--tolerance", type=non_negative(float), default=0.05, help="keep candidates within ±this fraction (0.05)")
    s.add_argument("--space", default=None, help="JSON file: axis -> list of allowed sizes")
    for axis, flag in AXIS_FLAGS.items():
        moe = " (Mixture-of-Experts sources)" if axis in ("num_experts", "moe_ffn_hidden_size") else ""
        s.add_argument(flag, type=positive(), nargs="+", default=None, metavar="N", help=f"allowed {axis} values{moe}")
    s.add_argument("--freeze", nargs="+", default=None, choices=list(AXIS_FLAGS.values()),
                   help="axes kept at the source's size in the default grid (default: --groups)")
    s.add_argument("--layer-metric", default=None, choices=["bi", "lm_loss", "block"],
                   help="how layers are dropped for shallower candidates (default bi)")
    s.add_argument("--winner-iters", type=non_negative(), default=0, help="then prune and distill the winner this many steps")
    s.add_argument("--keep-checkpoints", action="store_true", help="keep every candidate's checkpoints")
    t = parser.add_argument_group("ranking by a downstream task (lm-evaluation-harness; pip install .[eval])")
    t.add_argument("--score", default=None, metavar="TASK[:METRIC]",
                   help="rank candidates by this lm-eval task's metric after their distillation, e.g. "
                        "minitron_continuation:acc (built in, offline) or hellaswag:acc_norm; default metric: the "
                        "task's first; smaller is better where the task says so (perplexities)")
    t.add_argument("--min-score", type=Bounded(float, -math.inf), default=None,  # any finite number
                   help="fail, before --winner-iters, when the best candidate's score is below this")
    t.add_argument("--score-limit", type=positive(float), default=None, help="documents scored (default: all)")
    t.add_argument("--score-batch-size", type=positive(), default=8, help="sequences per forward pass per replica")
    add_parallel_arguments(parser)
    add_data_arguments(parser)
    add_training_arguments(parser)
    add_loss_arguments(parser)


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def search_space(args, source):
    from megatron_minitron.search.space import SearchSpace, load_space

    flags = {axis: tuple(getattr(args, _dest(flag))) for axis, flag in AXIS_FLAGS.items()
             if getattr(args, _dest(flag)) is not None}
    if args.space and flags:
        raise ConfigError(f"give the space as --space or as axis flags ({', '.join(AXIS_FLAGS[a] for a in flags)}), "
                          f"not both")
    if args.space:
        return load_space(args.space)
    if flags:
        return SearchSpace(**flags)
    frozen = tuple(axis for axis, flag in AXIS_FLAGS.items() if flag in (args.freeze or ["--groups"]))
    return SearchSpace.default(source, frozen=frozen)


def score_config(args: argparse.Namespace):
    """The ScoreConfig of --score (None without it); checked before any process starts."""
    if args.score is None:
        if args.min_score is not None:
            raise ConfigError("--min-score needs --score TASK[:METRIC]: the task whose score it bounds")
        return None
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("--score needs lm-evaluation-harness: pip install 'megatron-minitron[eval]'")
    from megatron_minitron.evaluation.run import TaskConfig
    from megatron_minitron.search.run import ScoreConfig

    task, _, metric = args.score.strip().partition(":")
    if not task or "," in task or (_ and not metric):
        raise ConfigError(f"--score {args.score!r}: give one task and optionally its metric, as TASK or TASK:METRIC "
                          f"(e.g. minitron_continuation:acc)")
    tasks = TaskConfig(tasks=(task,), limit=args.score_limit, batch_size=args.score_batch_size,
                       cache_dir=args.cache_dir, seed=args.seed)
    return ScoreConfig(tasks=tasks, metric=metric or None, min_score=args.min_score)


def run(args: argparse.Namespace) -> int:
    from megatron_minitron.cli.distill import distill_config, shared_tokenizer
    from megatron_minitron.importance.scores import load_scores
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.runtime import LaunchEnv, session
    from megatron_minitron.search.run import SearchJob, SearchSetup, check_out, check_winner, search
    from megatron_minitron.search.space import enumerate_candidates, explain_empty

    # ---- every check that needs no process, before any pruning or training
    parallel = parallel_config(args)
    cfg, dcfg = train_config(args), distill_config(args)
    score = score_config(args)
    source = ckpt.resolve(args.load)
    scores = load_scores(args.scores)
    scores.check_belongs_to(source.arch, what=f"--load {args.load}")
    scores.check_computed_on(source.path, what=f"--load {args.load}", allow_foreign=args.allow_foreign_scores)
    space = search_space(args, source.arch)
    candidates, removed = enumerate_candidates(source.arch, space, budget=args.budget, tolerance=args.tolerance,
                                               tensor_parallel=parallel.tensor_parallel,
                                               pipeline_parallel=parallel.pipeline_parallel,
                                               expert_parallel=parallel.expert_parallel, budget_kind=args.budget_kind)
    if not candidates:
        raise ConfigError(explain_empty(removed, sum(removed.values())))
    for candidate in candidates:  # every candidate can become a pruning target
        candidate.target(args.layer_metric)
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
    data_cfg = data_config(args, tokenizer)
    check_data_files(data_cfg)
    if args.teacher_logits is not None:
        from megatron_minitron.distill.logits_cache import LogitsCache, check_run
        from megatron_minitron.model.integrity import fingerprint

        check_run(LogitsCache(args.teacher_logits), student_arch=source.arch, data_cfg=data_cfg, train_cfg=cfg,
                  distill_cfg=dcfg, teacher_fingerprint=fingerprint(source.path))
    setup = SearchSetup(source=source, scores=scores, out=out, layer_metric=args.layer_metric, seed=cfg.seed,
                        keep_checkpoints=args.keep_checkpoints)
    job = SearchJob(setup=setup, scores_path=str(args.scores), budget=args.budget, budget_kind=args.budget_kind,
                    tolerance=args.tolerance,
                    space=space, candidates=tuple(candidates), removed=dict(removed), train=cfg, distill=dcfg,
                    data=data_cfg, winner_iters=args.winner_iters, overwrite=args.overwrite,
                    score=score, teacher_logits=args.teacher_logits)
    with session(parallel, seed=cfg.seed, env=env) as runtime:
        search(job, runtime)
    return 0
