"""Pruning plans: scores + a target architecture -> kept indices per axis (no megatron processes)."""

from megatron_minitron.plan.make import best_block, check_target, make_plan, random_plan, top_k
from megatron_minitron.plan.plan import FORMAT, Plan, PlanError, identity_plan, load_plan
from megatron_minitron.plan.target import (LAYER_METRICS, Target, add_target_arguments, load_target,
                                           target_from_args)

__all__ = ["FORMAT", "LAYER_METRICS", "Plan", "PlanError", "Target", "add_target_arguments", "best_block",
           "check_target", "identity_plan", "load_plan", "load_target", "make_plan", "random_plan",
           "target_from_args", "top_k"]
