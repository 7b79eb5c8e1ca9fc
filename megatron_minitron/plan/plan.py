"""The pruning plan: which source indices survive on every axis. A small immutable JSON value.

Indices always refer to the SOURCE model and are sorted ascending, so a plan reads the same however
it was computed. Per-layer entries are listed for the kept layers only, in the order of `layers`
(target layer j is source layer layers[j]). Query heads are global source head indices, grouped:
target group j of target layer i holds heads[i][j*n:(j+1)*n] (n = target heads per group), all of
which belong to source group query_groups[i][j]. Nothing here imports megatron.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from megatron_minitron.config import ArchConfig, ConfigError, unknown_fields

FORMAT = "megatron-minitron-plan/1"


class PlanError(ConfigError):
    """A plan that is inconsistent with itself, its source, or what it is applied to."""


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """Kept source indices per axis, the source and target architectures, and parameter counts."""

    source: ArchConfig
    """Explicit architecture of the unpruned model."""
    target: ArchConfig
    """Explicit architecture of the pruned model."""
    layers: tuple[int, ...]
    """Kept source layers (sorted); target layer j is source layer layers[j]."""
    hidden: tuple[int, ...]
    """Kept hidden (embedding) channels, the same everywhere in the network."""
    ffn: tuple[tuple[int, ...], ...]
    """Per kept layer: kept MLP neurons (for GLU models the same indices of gate and up rows)."""
    query_groups: tuple[tuple[int, ...], ...]
    """Per kept layer: kept source query groups (key/value heads)."""
    heads: tuple[tuple[int, ...], ...]
    """Per kept layer: kept global source query heads, group-major (see the module docstring)."""
    head_merge: bool = False
    """Fold each pruned head into a kept one as the Minitron paper does (applied by the pruner)."""
    params_before: int = 0
    """Exact parameter count of the source model."""
    params_after: int = 0
    """Exact parameter count of the target model."""
    scores: dict = dataclasses.field(default_factory=dict)
    """Provenance of the ranking: scores directory, aggregation, which layer metric chose the layers."""
    format: str = FORMAT

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _ints(self.layers))
        object.__setattr__(self, "hidden", _ints(self.hidden))
        for name in ("ffn", "query_groups", "heads"):
            object.__setattr__(self, name, tuple(_ints(row) for row in getattr(self, name)))
        if isinstance(self.source, dict):
            object.__setattr__(self, "source", ArchConfig.from_json(self.source))
        if isinstance(self.target, dict):
            object.__setattr__(self, "target", ArchConfig.from_json(self.target))

    @property
    def source_fingerprint(self) -> str:
        return self.source.explicit().fingerprint()

    def validate(self) -> "Plan":
        """Check every index list against the source and target architectures; returns self."""
        src, dst = self.source, self.target
        if self.format != FORMAT:
            raise PlanError(f"plan format {self.format!r} is not {FORMAT!r}")

        def check(name: str, values: tuple[int, ...], count: int, bound: int) -> None:
            if len(values) != count:
                raise PlanError(f"plan {name} keeps {len(values)} indices, but the target needs {count}")
            if list(values) != sorted(set(values)):
                raise PlanError(f"plan {name} indices must be sorted and unique: {list(values)[:16]}")
            if values and not (0 <= values[0] and values[-1] < bound):
                raise PlanError(f"plan {name} indices must lie in [0, {bound}); got {values[0]}..{values[-1]}")

        for name, arch, count in (("params_before", src, self.params_before), ("params_after", dst, self.params_after)):
            if count and count != arch.num_parameters():
                raise PlanError(f"plan {name}={count} does not match its architecture's {arch.num_parameters()} "
                                f"parameters; the plan file was edited or is corrupt")
        check("layers", self.layers, dst.num_layers, src.num_layers)
        check("hidden", self.hidden, dst.hidden_size, src.hidden_size)
        for name in ("ffn", "query_groups", "heads"):
            if len(getattr(self, name)) != dst.num_layers:
                raise PlanError(f"plan {name} has {len(getattr(self, name))} rows; one per kept layer "
                                f"({dst.num_layers}) is needed")
        if dst.head_dim != src.head_dim:
            raise PlanError(f"target kv_channels {dst.head_dim} differs from the source's {src.head_dim}; "
                            f"pruning keeps the head width")
        src_per_group = src.num_attention_heads // src.query_groups
        dst_per_group = dst.num_attention_heads // dst.query_groups
        for i, layer in enumerate(self.layers):
            check(f"ffn[{i}] (source layer {layer})", self.ffn[i], dst.ffn_hidden_size, src.ffn_hidden_size)
            check(f"query_groups[{i}]", self.query_groups[i], dst.query_groups, src.query_groups)
            check(f"heads[{i}]", self.heads[i], dst.num_attention_heads, src.num_attention_heads)
            for j, group in enumerate(self.query_groups[i]):
                block = self.heads[i][j * dst_per_group:(j + 1) * dst_per_group]
                if any(h // src_per_group != group for h in block):
                    raise PlanError(f"heads[{i}] of target group {j} must all belong to source group {group} "
                                    f"(heads {group * src_per_group}..{(group + 1) * src_per_group - 1}); got "
                                    f"{list(block)}")
        return self

    def summary(self) -> str:
        """A few lines for logs and `minitron inspect`: each axis before -> after, dropped layers, parameters."""
        src, dst = self.source.explicit(), self.target.explicit()
        lines = [f"pruning plan: source {self.source_fingerprint} -> target {dst.fingerprint()}"]
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups"):
            before, after = getattr(src, name), getattr(dst, name)
            change = "" if before == after else f"  ({after / before:.0%})"
            lines.append(f"  {name:<20} {before:>7} -> {after:<7}{change}".rstrip())
        dropped = sorted(set(range(src.num_layers)) - set(self.layers))
        if dropped:
            lines.append(f"  dropped layers {dropped} (chosen by {self.scores.get('layer_metric', 'unknown')})")
        if self.head_merge:
            lines.append("  pruned heads are merged into kept ones")
        ratio = self.params_after / self.params_before if self.params_before else float("nan")
        lines.append(f"  parameters {self.params_before:,} -> {self.params_after:,} ({ratio:.1%} of the source)")
        return "\n".join(lines)

    def is_identity(self) -> bool:
        return self.source.explicit() == self.target.explicit() and self.layers == tuple(range(self.source.num_layers))

    # ---------------------------------------------------------------------------- serialisation
    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "source_fingerprint": self.source_fingerprint,
            "source": self.source.explicit().to_json(),
            "target": self.target.explicit().to_json(),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "layers": list(self.layers),
            "hidden": list(self.hidden),
            "ffn": [list(r) for r in self.ffn],
            "query_groups": [list(r) for r in self.query_groups],
            "heads": [list(r) for r in self.heads],
            "head_merge": self.head_merge,
            "scores": self.scores,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        data = dict(data)
        fingerprint = data.pop("source_fingerprint", None)
        unknown = unknown_fields(cls, data)
        if unknown:
            raise PlanError(f"unknown plan keys {unknown}")
        missing = [key for key in ("params_before", "params_after") if not data.get(key)]
        if fingerprint is None or missing:
            raise PlanError(f"plan lacks {(['source_fingerprint'] if fingerprint is None else []) + missing}; "
                            f"every plan file records its source fingerprint and both parameter counts")
        plan = cls(**data)
        if fingerprint != plan.source_fingerprint:
            raise PlanError(f"plan source_fingerprint {fingerprint} does not match its source architecture "
                            f"({plan.source_fingerprint}); the plan file was edited or is corrupt")
        return plan.validate()

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(self.to_json()) + "\n")
        tmp.rename(path)
        return path


def load_plan(path: str | os.PathLike) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PlanError(f"plan file {path} is not valid JSON: {error}") from None
    return Plan.from_json(data)


def identity_plan(arch: ArchConfig) -> Plan:
    """The plan that keeps everything (pruning with it must reproduce the source bit for bit)."""
    arch = arch.explicit()
    L = arch.num_layers
    return Plan(source=arch, target=arch, layers=range(L), hidden=range(arch.hidden_size),
                ffn=[range(arch.ffn_hidden_size)] * L, query_groups=[range(arch.query_groups)] * L,
                heads=[range(arch.num_attention_heads)] * L, params_before=arch.num_parameters(),
                params_after=arch.num_parameters()).validate()
