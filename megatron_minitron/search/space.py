"""The search space of student shapes and its enumeration within a parameter budget (no megatron).

A space lists the allowed values of each axis (layers, hidden, ffn, query heads, query groups; for a
Mixture-of-Experts source also routed experts and expert width); an axis left out is frozen at the source's
size. Every combination becomes a candidate `Target`; a candidate survives if its exact parameter count
(every parameter, or with budget_kind "active" those one token passes through) lies within ±tolerance of the
budget and if the plan checks accept it (nothing larger than the source, GQA structure, at least top-k
experts, divisibility for the TP/PP/EP the student must run at). Enumeration order and names are
deterministic, so runs and resumed runs agree.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_minitron.config import ArchConfig, ConfigError, unknown_fields
from megatron_minitron.plan.plan import PlanError
from megatron_minitron.plan.target import Target

DENSE_AXES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
MOE_AXES = ("num_experts", "moe_ffn_hidden_size")
"""Axes of Mixture-of-Experts sources only: routed experts per MoE layer and one routed expert's width."""
AXES = DENSE_AXES + MOE_AXES
SHORT = {"num_layers": "L", "hidden_size": "h", "ffn_hidden_size": "f", "num_attention_heads": "H",
         "num_query_groups": "G", "num_experts": "E", "moe_ffn_hidden_size": "e"}
BUDGET_KINDS = ("total", "active")
"""What --budget counts: every parameter, or those one token passes through (MoE: top-k routed experts)."""


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """Allowed values per axis; None freezes the axis at the source's size."""

    num_layers: Optional[tuple[int, ...]] = None
    """Candidate depths."""
    hidden_size: Optional[tuple[int, ...]] = None
    """Candidate hidden (embedding) sizes."""
    ffn_hidden_size: Optional[tuple[int, ...]] = None
    """Candidate MLP sizes."""
    num_attention_heads: Optional[tuple[int, ...]] = None
    """Candidate numbers of query heads (pruned uniformly within the query groups)."""
    num_query_groups: Optional[tuple[int, ...]] = None
    """Candidate numbers of key/value groups."""
    num_experts: Optional[tuple[int, ...]] = None
    """Candidate numbers of routed experts per MoE layer (MoE sources only; at least the router's top-k)."""
    moe_ffn_hidden_size: Optional[tuple[int, ...]] = None
    """Candidate widths of one routed expert's MLP (MoE sources only; one width for every expert)."""

    def __post_init__(self) -> None:
        for axis in AXES:
            values = getattr(self, axis)
            if values is None:
                continue
            values = tuple(sorted({int(v) for v in values}, reverse=True))
            if not values:
                raise ConfigError(f"search space axis {axis} has no values; leave it out to freeze it")
            object.__setattr__(self, axis, values)

    def check_against(self, source: ArchConfig) -> None:
        """Values larger than the source or below 1 are errors, named (pruning only removes); MoE axes need an
        MoE source."""
        for axis in AXES:
            if axis in MOE_AXES and not source.is_moe:
                if getattr(self, axis) is not None:
                    raise ConfigError(f"search space axis {axis} needs a Mixture-of-Experts source; this one is "
                                      f"dense (num_experts is None)")
                continue
            have = source_size(source, axis)
            for value in getattr(self, axis) or ():
                if value < 1 or value > have:
                    raise ConfigError(f"search space {axis} value {value} is outside 1..{have} (the source's size)")

    def to_json(self) -> dict:
        return {axis: list(getattr(self, axis)) for axis in AXES if getattr(self, axis) is not None}

    @classmethod
    def from_json(cls, data: dict, *, where: str = "search space") -> "SearchSpace":
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a JSON object of axis -> list of sizes")
        unknown = unknown_fields(cls, data)
        if unknown:
            raise ConfigError(f"{where} has unknown axes {unknown}; known: {list(AXES)}")
        return cls(**{k: tuple(v) for k, v in data.items()})

    @classmethod
    def default(cls, source: ArchConfig, *, frozen: tuple[str, ...] = ("num_query_groups",)) -> "SearchSpace":
        """The paper's style of grid: depth 100/87.5/75%, hidden and ffn from 100% down to 50% in eighths,
        heads 100/75/50% in whole heads per group; query groups frozen unless asked otherwise."""
        def fractions(size: int, parts: tuple[int, ...], multiple: int = 1) -> tuple[int, ...]:
            values = {max(multiple, size * p // 8 // multiple * multiple) for p in parts}
            return tuple(sorted(values, reverse=True))

        groups = source.query_groups
        per_group = source.num_attention_heads // groups
        heads = tuple(sorted({groups * max(1, per_group * p // 4) for p in (4, 3, 2)}, reverse=True))
        space = {"num_layers": fractions(source.num_layers, (8, 7, 6)),
                 "hidden_size": fractions(source.hidden_size, (8, 7, 6, 5, 4), 8),
                 "ffn_hidden_size": fractions(source.ffn_hidden_size, (8, 7, 6, 5, 4), 8),
                 "num_attention_heads": heads, "num_query_groups": (groups,)}
        if source.is_moe:
            # experts 100/75/50% (never fewer than the top-k), expert width as the MLP; a model whose every layer
            # is MoE has no dense MLP to shrink
            topk = source.moe_router_topk
            space["num_experts"] = tuple(sorted({max(topk, source.num_experts * p // 4) for p in (4, 3, 2)},
                                                reverse=True))
            space["moe_ffn_hidden_size"] = fractions(source.expert_ffn_hidden_size, (8, 7, 6, 5, 4), 8)
            if all(source.moe_layers):
                del space["ffn_hidden_size"]
        return cls(**{axis: values for axis, values in space.items() if axis not in frozen})


def load_space(path: str | os.PathLike) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--space {path} does not exist")
    try:
        return SearchSpace.from_json(json.loads(path.read_text()), where=f"--space {path}")
    except json.JSONDecodeError as error:
        raise ConfigError(f"--space {path} is not valid JSON: {error}") from None


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One student shape: its target sizes and exact parameter count."""

    sizes: dict
    """The target sizes in AXES order: the five dense axes, plus the MoE axes for an MoE source."""
    params: int
    """Exact parameter count of the pruned model."""
    active_params: Optional[int] = None
    """Parameters one token passes through (MoE sources; None for a dense one, where it equals params)."""

    @property
    def name(self) -> str:
        return "-".join(f"{SHORT[axis]}{self.sizes[axis]}" for axis in AXES if axis in self.sizes)

    def target(self, layer_metric: Optional[str] = None) -> Target:
        return candidate_target(self.sizes, layer_metric)

    def to_json(self) -> dict[str, Any]:
        extra = {} if self.active_params is None else {"active_params": self.active_params}
        return {"name": self.name, "sizes": dict(self.sizes), "params": self.params, **extra}


def candidate_target(sizes: dict, layer_metric: Optional[str] = None) -> Target:
    """A candidate's sizes as a pruning Target (the MoE axes are Target fields of the same names)."""
    moe = {axis: sizes[axis] for axis in MOE_AXES if axis in sizes}
    return Target(**{axis: sizes[axis] for axis in DENSE_AXES}, **moe, layer_metric=layer_metric)


def source_size(source: ArchConfig, axis: str) -> int:
    """The source's size along a search axis."""
    if axis == "num_query_groups":
        return source.query_groups
    if axis == "moe_ffn_hidden_size":
        return source.expert_ffn_hidden_size
    return getattr(source, axis)


def count_parameters(arch: ArchConfig, budget_kind: str) -> int:
    """Parameters as --budget-kind counts them."""
    return arch.num_active_parameters() if budget_kind == "active" else arch.num_parameters()


def enumerate_candidates(source: ArchConfig, space: SearchSpace, *, budget: int, tolerance: float = 0.05,
                         tensor_parallel: Optional[int] = None, pipeline_parallel: Optional[int] = None,
                         expert_parallel: Optional[int] = None,
                         budget_kind: str = "total") -> tuple[list[Candidate], Counter]:
    """Candidates within ±tolerance of the budget, counted as `budget_kind` parameters, and valid for the layout
    (largest first), and the number of combinations each rule removed. An MoE source's candidates also vary the
    MoE axes: at least the router's top-k experts, experts divisible by the expert-parallel size, expert
    widths divisible by the tensor-parallel size."""
    from megatron_minitron.plan.make import check_target

    source = source.explicit()
    if budget_kind not in BUDGET_KINDS:
        raise ConfigError(f"--budget-kind {budget_kind!r} is not one of {list(BUDGET_KINDS)}")
    what = "active parameters" if budget_kind == "active" else "parameters"
    if budget > count_parameters(source, budget_kind):
        raise ConfigError(f"--budget {budget:,} is larger than the source model "
                          f"({count_parameters(source, budget_kind):,} {what}); a search prunes, so give a smaller "
                          f"budget")
    if not 0 <= tolerance < 1:
        raise ConfigError(f"--tolerance must be in [0, 1), got {tolerance}")
    space.check_against(source)
    axes = AXES if source.is_moe else DENSE_AXES
    values = [getattr(space, axis) or (source_size(source, axis),) for axis in axes]
    kept, removed = [], Counter()
    for combo in itertools.product(*values):
        sizes = dict(zip(axes, combo))
        try:
            dense = check_target(source, Target(**{axis: sizes[axis] for axis in DENSE_AXES}),
                                 tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel)
        except PlanError as error:
            removed[_rule(str(error))] += 1
            continue
        sizes.update({axis: dense[axis] for axis in DENSE_AXES})  # the MoE axes stay the candidate's
        arch, rule = _candidate_arch(source, sizes, tensor_parallel, expert_parallel)
        if rule is not None:
            removed[rule] += 1
            continue
        params = count_parameters(arch, budget_kind)
        if abs(params - budget) > tolerance * budget:
            removed[f"{'active ' if budget_kind == 'active' else ''}parameter count outside {budget:,} ± "
                    f"{tolerance:.0%}"] += 1
            continue
        kept.append(Candidate(sizes=sizes, params=arch.num_parameters(),
                              active_params=arch.num_active_parameters() if source.is_moe else None))
    kept.sort(key=lambda c: (-count_parameters_of(c, budget_kind), c.name))
    return kept, removed


def count_parameters_of(candidate: Candidate, budget_kind: str) -> int:
    """A candidate's parameters as --budget-kind counts them."""
    if budget_kind == "active" and candidate.active_params is not None:
        return candidate.active_params
    return candidate.params


def _candidate_arch(source: ArchConfig, sizes: dict, tp: Optional[int],
                    ep: Optional[int]) -> tuple[Optional[ArchConfig], Optional[str]]:
    """(the candidate's architecture, None), or (None, the rule that refuses it): the MoE axes' own checks."""
    moe = {axis: sizes[axis] for axis in MOE_AXES if axis in sizes}
    if moe and moe["num_experts"] < source.moe_router_topk:
        return None, "fewer experts than the router's top-k"
    try:
        arch = source.replace(**{axis: sizes[axis] for axis in DENSE_AXES}, **moe)
    except ConfigError as error:
        return None, str(error).split(";")[0]
    if moe and ep is not None and moe["num_experts"] % ep:
        return None, "experts not divisible by the expert-parallel size"
    if moe and tp is not None and moe["moe_ffn_hidden_size"] % tp:
        return None, "not divisible for the tensor-parallel size"
    return arch, None


def _rule(message: str) -> str:
    """A short name for the plan check that refused a combination (for the empty-space message)."""
    for needle, rule in (("tensor-parallel", "not divisible for the tensor-parallel size"),
                         ("pipeline", "too few layers for the pipeline stages"),
                         ("per group", "heads not a multiple of the query groups"),
                         ("multiple", "heads not a multiple of the query groups")):
        if needle in message:
            return rule
    return message.split(";")[0]


def explain_empty(removed: Counter, total: int) -> str:
    """Why no candidate survived: each rule and how many of the combinations it removed."""
    parts = ", ".join(f"{count} by {rule}" for rule, count in removed.most_common())
    return f"no candidate left: of {total} combinations, {parts}; widen the space or the --tolerance"
