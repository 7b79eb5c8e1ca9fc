"""Pruning plans: scores + a target architecture -> kept indices per axis (no megatron processes)."""

from megatron_minitron.plan.plan import FORMAT, Plan, PlanError, identity_plan, load_plan

__all__ = ["FORMAT", "Plan", "PlanError", "identity_plan", "load_plan"]
