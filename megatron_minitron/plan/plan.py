"""The pruning plan: which source indices survive on every axis. A small immutable JSON value.

Indices always refer to the SOURCE model and are sorted ascending, so a plan reads the same however
it was computed. Per-layer entries are listed for the kept layers only, in the order of `layers`
(target layer j is source layer layers[j]). Query heads are global source head indices, grouped:
target group j of target layer i holds heads[i][j*n:(j+1)*n] (n = target heads per group), all of
which belong to source group query_groups[i][j]. Nothing here imports megatron.

Mixture-of-Experts plans add, per kept layer, the kept source experts (`experts`, ascending: the
expert order is preserved), each kept expert's own kept neurons (`expert_ffn`: one width for all,
as megatron requires) and the shared expert's kept neurons (`shared_ffn`). A MoE layer has no dense
MLP (its `ffn` row is empty); a dense layer of a mixed model has empty expert rows. Dense plans leave
the three out of their JSON, which therefore reads as before.
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
    experts: tuple[tuple[int, ...], ...] = ()
    """Per kept layer: kept source experts, ascending (() for a dense layer; () as a whole for a dense model)."""
    expert_ffn: tuple[tuple[tuple[int, ...], ...], ...] = ()
    """Per kept layer, per kept expert (in `experts` order): that expert's kept neurons (for GLU experts the
    same indices of its gate and up rows)."""
    shared_ffn: tuple[tuple[int, ...], ...] = ()
    """Per kept layer: kept neurons of the shared expert (() for a dense layer or a model without one)."""
    head_merge: bool = False
    """Fold each pruned head into a kept one as the Minitron paper does (applied by the pruner)."""
    params_before: int = 0
    """Exact parameter count of the source model."""
    params_after: int = 0
    """Exact parameter count of the target model."""
    active_params_before: int = 0
    """Parameters one token passes through in the source (= params_before for a dense model; 0: not recorded)."""
    active_params_after: int = 0
    """Parameters one token passes through in the target (0: not recorded)."""
    scores: dict = dataclasses.field(default_factory=dict)
    """Provenance of the ranking: scores directory, aggregation, which layer metric chose the layers."""
    format: str = FORMAT

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _ints(self.layers))
        object.__setattr__(self, "hidden", _ints(self.hidden))
        for name in ("ffn", "query_groups", "heads", "experts", "shared_ffn"):
            object.__setattr__(self, name, tuple(_ints(row) for row in getattr(self, name)))
        object.__setattr__(self, "expert_ffn", tuple(tuple(_ints(row) for row in layer) for layer in self.expert_ffn))
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

        for name, arch, count, active in (("params_before", src, self.params_before, False),
                                          ("params_after", dst, self.params_after, False),
                                          ("active_params_before", src, self.active_params_before, True),
                                          ("active_params_after", dst, self.active_params_after, True)):
            expected = arch.num_active_parameters() if active else arch.num_parameters()
            if count and count != expected:
                raise PlanError(f"plan {name}={count} does not match its architecture's {expected} "
                                f"parameters; the plan file was edited or is corrupt")
        check("layers", self.layers, dst.num_layers, src.num_layers)
        check("hidden", self.hidden, dst.hidden_size, src.hidden_size)
        for name in ("ffn", "query_groups", "heads"):
            if len(getattr(self, name)) != dst.num_layers:
                raise PlanError(f"plan {name} has {len(getattr(self, name))} rows; one per kept layer "
                                f"({dst.num_layers}) is needed")
        self._validate_moe(check)
        if dst.head_dim != src.head_dim:
            raise PlanError(f"target kv_channels {dst.head_dim} differs from the source's {src.head_dim}; "
                            f"pruning keeps the head width")
        src_per_group = src.num_attention_heads // src.query_groups
        dst_per_group = dst.num_attention_heads // dst.query_groups
        moe = src.moe_layers
        for i, layer in enumerate(self.layers):
            if moe[layer]:
                check(f"ffn[{i}] (source layer {layer}, a MoE layer without a dense MLP)", self.ffn[i], 0, 0)
            else:
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

    def _validate_moe(self, check) -> None:
        """The expert rows against the source's MoE layers and the target's expert sizes."""
        src, dst = self.source, self.target
        if not src.is_moe:
            if self.experts or self.expert_ffn or self.shared_ffn or dst.is_moe:
                raise PlanError("plan keeps experts, but its source model is dense (num_experts is None)")
            return
        for name in ("experts", "expert_ffn", "shared_ffn"):
            if len(getattr(self, name)) != dst.num_layers:
                raise PlanError(f"plan {name} has {len(getattr(self, name))} rows; one per kept layer "
                                f"({dst.num_layers}) is needed (empty for a dense layer)")
        kept_moe = tuple(src.moe_layers[layer] for layer in self.layers)
        if not dst.is_moe or dst.moe_layers != kept_moe:
            raise PlanError(f"plan target's MoE layers {list(map(int, dst.moe_layers)) if dst.is_moe else []} are "
                            f"not the kept source layers' {list(map(int, kept_moe))}")
        for name in ("moe_router_topk", "moe_router_score_function", "moe_router_pre_softmax"):
            if getattr(src, name) != getattr(dst, name):
                raise PlanError(f"plan target {name}={getattr(dst, name)!r} differs from the source's "
                                f"{getattr(src, name)!r}; pruning keeps the routing")
        E, Fe, Fs = src.num_experts, src.expert_ffn_hidden_size, src.moe_shared_expert_ffn_hidden_size or 0
        for i, layer in enumerate(self.layers):
            where = f"[{i}] (source layer {layer})"
            if not kept_moe[i]:
                if self.experts[i] or self.expert_ffn[i] or self.shared_ffn[i]:
                    raise PlanError(f"plan experts{where} is a dense layer: its expert rows must be empty")
                continue
            check(f"experts{where}", self.experts[i], dst.num_experts, E)
            if len(self.expert_ffn[i]) != len(self.experts[i]):
                raise PlanError(f"plan expert_ffn{where} has {len(self.expert_ffn[i])} rows; one per kept expert "
                                f"({len(self.experts[i])}) is needed")
            for e, row in zip(self.experts[i], self.expert_ffn[i]):
                check(f"expert_ffn{where} of expert {e}", row, dst.expert_ffn_hidden_size, Fe)
            check(f"shared_ffn{where}", self.shared_ffn[i], dst.moe_shared_expert_ffn_hidden_size or 0, Fs)

    def summary(self) -> str:
        """A few lines for logs and `minitron inspect`: each axis before -> after, dropped layers, parameters."""
        src, dst = self.source.explicit(), self.target.explicit()
        lines = [f"pruning plan: source {self.source_fingerprint} -> target {dst.fingerprint()}"]
        names = ["num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups"]
        if src.is_moe:
            names += ["num_experts", "moe_ffn_hidden_size"] + (
                ["moe_shared_expert_ffn_hidden_size"] if src.moe_shared_expert_ffn_hidden_size else [])
        width = max(20, *map(len, names))
        for name in names:
            before, after = getattr(src, name), getattr(dst, name)
            if name == "moe_ffn_hidden_size":
                before, after = src.expert_ffn_hidden_size, dst.expert_ffn_hidden_size
            change = "" if before == after else f"  ({after / before:.0%})"
            lines.append(f"  {name:<{width}} {before:>7} -> {after:<7}{change}".rstrip())
        if src.is_moe:
            changed = sum(row != tuple(range(src.num_experts)) for row, moe in zip(self.experts, dst.moe_layers) if moe)
            if changed:
                lines.append(f"  experts pruned in {changed} of {sum(dst.moe_layers)} MoE layers (each keeps its own)")
        dropped = sorted(set(range(src.num_layers)) - set(self.layers))
        if dropped:
            lines.append(f"  dropped layers {dropped} (chosen by {self.scores.get('layer_metric', 'unknown')})")
        if self.head_merge:
            lines.append("  pruned heads are merged into kept ones")
        ratio = self.params_after / self.params_before if self.params_before else float("nan")
        lines.append(f"  parameters {self.params_before:,} -> {self.params_after:,} ({ratio:.1%} of the source)")
        if src.is_moe:
            before, after = src.num_active_parameters(), dst.num_active_parameters()
            lines.append(f"  active parameters {before:,} -> {after:,} ({after / before:.1%} of the source's)")
        return "\n".join(lines)

    def is_identity(self) -> bool:
        return self.source.explicit() == self.target.explicit() and self.layers == tuple(range(self.source.num_layers))

    # ---------------------------------------------------------------------------- serialisation
    def to_json(self) -> dict[str, Any]:
        data = {
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
        if self.source.is_moe:
            data.update(experts=[list(r) for r in self.experts],
                        expert_ffn=[[list(r) for r in layer] for layer in self.expert_ffn],
                        shared_ffn=[list(r) for r in self.shared_ffn],
                        active_params_before=self.active_params_before, active_params_after=self.active_params_after)
        return data

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
    moe = arch.moe_layers
    E, Fe, Fs = arch.num_experts or 0, arch.expert_ffn_hidden_size, arch.moe_shared_expert_ffn_hidden_size or 0
    experts = {} if not arch.is_moe else dict(
        experts=[range(E) if m else () for m in moe], expert_ffn=[[range(Fe)] * E if m else () for m in moe],
        shared_ffn=[range(Fs) if m else () for m in moe], active_params_before=arch.num_active_parameters(),
        active_params_after=arch.num_active_parameters())
    return Plan(source=arch, target=arch, layers=range(L), hidden=range(arch.hidden_size),
                ffn=[() if m else range(arch.ffn_hidden_size) for m in moe],
                query_groups=[range(arch.query_groups)] * L,
                heads=[range(arch.num_attention_heads)] * L, params_before=arch.num_parameters(),
                params_after=arch.num_parameters(), **experts).validate()
