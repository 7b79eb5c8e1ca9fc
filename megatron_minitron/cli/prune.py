"""`minitron prune`: rewrite a checkpoint into its pruned version (offline, streaming, N workers).

    minitron prune --load runs/teacher --scores runs/scores --target-ffn-hidden-size 512 \
        --target-num-layers 6 --save runs/pruned --workers 4

Mixture-of-Experts models prune experts and expert widths in the same shot (--target-num-moe-experts,
--target-moe-ffn-hidden-size, --target-moe-shared-expert-intermediate-size; --ep checks the layout).
The target comes from flags, one --export-config JSON, or a ready --plan PLAN.json (then --scores is
needed only for --head-merge). Under torchrun the ranks share the work instead of spawned workers:

    torchrun --nproc-per-node 4 -m megatron_minitron prune --load ... --plan plan.json --save ...
"""

from __future__ import annotations

import argparse

from megatron_minitron.flags import positive


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_minitron.plan.target import add_target_arguments

    parser.add_argument("--load", required=True, help="source checkpoint (ours or Megatron-LM's torch_dist)")
    parser.add_argument("--scores", default=None, help="scores directory of the source (`minitron importance`)")
    parser.add_argument("--plan", default=None, metavar="PLAN.json", help="apply this plan instead of computing one")
    parser.add_argument("--save", required=True, help="output checkpoint directory (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save")
    parser.add_argument("--workers", type=positive(), default=1, help="worker processes (ignored under torchrun: the ranks "
                                                               "share the work)")
    parser.add_argument("--tp", type=positive(), default=None, help="tensor-parallel size the pruned model must load at "
                                                             "(divisibility checks)")
    parser.add_argument("--pp", type=positive(), default=None, help="pipeline-parallel size the pruned model must load at")
    parser.add_argument("--ep", type=positive(), default=None,
                        help="expert-parallel size the pruned model must load at (Mixture-of-Experts models: it "
                             "must divide the kept experts)")
    parser.add_argument("--chunk-mb", type=positive(float), default=64, help="largest source region a worker reads at once")
    parser.add_argument("--allow-foreign-scores", action="store_true",
                        help="use --scores computed on another checkpoint than --load (warns; by default refused)")
    parser.add_argument("--save-plan", default=None, metavar="PLAN.json", help="also write the plan to this file")
    add_target_arguments(parser)


def _plan(args: argparse.Namespace, arch):
    from megatron_minitron.config import ConfigError
    from megatron_minitron.plan import load_plan, make_plan, target_from_args

    target = target_from_args(args)
    if args.plan is not None:
        if not target.is_empty():
            raise ConfigError("--plan and target flags/--export-config both say what to prune; give one of them")
        plan = load_plan(args.plan)
        if args.head_merge and not plan.head_merge:
            import dataclasses

            plan = dataclasses.replace(plan, head_merge=True)
        if args.tp or args.pp or args.ep:
            plan.target.check_parallel(tensor_parallel=args.tp or 1, pipeline_parallel=args.pp or 1,
                                       expert_parallel=args.ep or 1)
        return plan
    if args.scores is None:
        raise ConfigError("--scores DIR is needed to compute a plan from target flags (or give --plan PLAN.json)")
    if target.is_empty():
        raise ConfigError("nothing to prune: give target flags (--target-num-layers, --target-hidden-size, ...), "
                          "--export-config or --plan")
    _scores(args)  # refused here when computed on another checkpoint
    return make_plan(args.scores, target, source=arch, tensor_parallel=args.tp, pipeline_parallel=args.pp,
                     expert_parallel=args.ep)


def _scores(args: argparse.Namespace):
    """--scores, refused when they were computed on another checkpoint than --load."""
    from megatron_minitron.importance.scores import load_scores
    from megatron_minitron.plan.make import check_scores_kind
    from megatron_minitron.prune.rewrite import resolve_source

    scores, info = load_scores(args.scores), resolve_source(args.load)
    check_scores_kind(scores, info.arch)
    scores.check_belongs_to(info.arch, what=f"checkpoint {args.load}")
    scores.check_computed_on(info.path, what=f"--load {args.load}", allow_foreign=args.allow_foreign_scores)
    return scores


def run(args: argparse.Namespace) -> int:
    from megatron_minitron.prune.rewrite import prune_checkpoint, resolve_source
    from megatron_minitron.runtime.dist import host_group

    info = resolve_source(args.load)
    plan = _plan(args, info.arch)
    head_scores = None
    if plan.head_merge:
        from megatron_minitron.prune.slicing import PruneError

        if args.scores is None:
            raise PruneError("--head-merge needs --scores DIR (the head ranking)")
        scores = _scores(args)
        head_scores = scores["heads"]
    with host_group() as group:
        prune_checkpoint(args.load, plan, args.save, workers=args.workers, overwrite=args.overwrite,
                         chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))), head_scores=head_scores, group=group)
        if group is None or group.rank() == 0:
            if args.save_plan:
                plan.save(args.save_plan)
            print(plan.summary())
    return 0
