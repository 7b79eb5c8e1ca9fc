"""The search space of student shapes and its enumeration within a parameter budget (no megatron).

A space lists the allowed values of each axis (layers, hidden, ffn, query heads, query groups); an
axis left out is frozen at the source's size. Every combination becomes a candidate `Target`; a
candidate survives if its exact parameter count lies within ±tolerance of the budget and if the
plan checks accept it (nothing larger than the source, GQA structure, divisibility for the TP/PP the
student must run at). Enumeration order and names are deterministic, so runs and resumed runs agree.
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

AXES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
SHORT = {"num_layers": "L", "hidden_size": "h", "ffn_hidden_size": "f", "num_attention_heads": "H",
         "num_query_groups": "G"}


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
        """Values larger than the source or below 1 are errors, named (pruning only removes)."""
        for axis in AXES:
            have = source.query_groups if axis == "num_query_groups" else getattr(source, axis)
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
    """The five target sizes (AXES order)."""
    params: int
    """Exact parameter count of the pruned model."""

    @property
    def name(self) -> str:
        return "-".join(f"{SHORT[axis]}{self.sizes[axis]}" for axis in AXES)

    def target(self, layer_metric: Optional[str] = None) -> Target:
        return Target(**{axis: self.sizes[axis] for axis in AXES}, layer_metric=layer_metric)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sizes": dict(self.sizes), "params": self.params}


def enumerate_candidates(source: ArchConfig, space: SearchSpace, *, budget: int, tolerance: float = 0.05,
                         tensor_parallel: Optional[int] = None,
                         pipeline_parallel: Optional[int] = None) -> tuple[list[Candidate], Counter]:
    """Candidates within ±tolerance of the budget and valid for the layout (largest first), and the
    number of combinations each rule removed."""
    from megatron_minitron.plan.make import check_target

    source = source.explicit()
    if budget > source.num_parameters():
        raise ConfigError(f"--budget {budget:,} is larger than the source model ({source.num_parameters():,} "
                          f"parameters); a search prunes, so give a smaller budget")
    if not 0 <= tolerance < 1:
        raise ConfigError(f"--tolerance must be in [0, 1), got {tolerance}")
    space.check_against(source)
    values = [getattr(space, axis) or (source.query_groups if axis == "num_query_groups" else getattr(source, axis),)
              for axis in AXES]
    kept, removed = [], Counter()
    for combo in itertools.product(*values):
        sizes = dict(zip(AXES, combo))
        try:
            sizes = check_target(source, Target(**sizes), tensor_parallel=tensor_parallel,
                                 pipeline_parallel=pipeline_parallel)
        except PlanError as error:
            removed[_rule(str(error))] += 1
            continue
        arch = source.replace(num_layers=sizes["num_layers"], hidden_size=sizes["hidden_size"],
                              ffn_hidden_size=sizes["ffn_hidden_size"],
                              num_attention_heads=sizes["num_attention_heads"],
                              num_query_groups=sizes["num_query_groups"])
        params = arch.num_parameters()
        if abs(params - budget) > tolerance * budget:
            removed[f"parameter count outside {budget:,} ± {tolerance:.0%}"] += 1
            continue
        kept.append(Candidate(sizes=sizes, params=params))
    kept.sort(key=lambda c: (-c.params, c.name))
    return kept, removed


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
