"""What to prune to: a `Target` (any subset of axes plus how to choose layers), from flags or one JSON file.

The JSON export config uses the architecture's own field names (the same keys ModelOpt's pruning
export_config takes), so one file can describe a candidate of an architecture search:

    {"num_layers": 24, "hidden_size": 3072, "ffn_hidden_size": 9216, "layer_metric": "block"}

A `Target` says only what the user asked for; `Target.resolve(source)` fills the untouched axes
from the source model. Nothing here imports megatron.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

from megatron_minitron.config import ArchConfig, unknown_fields
from megatron_minitron.flags import non_negative, positive
from megatron_minitron.plan.plan import PlanError

LAYER_METRICS = ("bi", "lm_loss", "block")
AXES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
MOE_AXES = ("num_experts", "moe_ffn_hidden_size", "moe_shared_expert_ffn_hidden_size")
"""Mixture-of-Experts axes (ArchConfig's field names); a dense source refuses them."""
ALL_AXES = AXES + MOE_AXES


@dataclasses.dataclass(frozen=True, kw_only=True)
class Target:
    """The requested pruned sizes (None = keep the source's) and how layers are chosen."""

    num_layers: Optional[int] = None
    """Layers to keep. When it shrinks, `layer_metric` (or `drop_layers`) says which go."""
    hidden_size: Optional[int] = None
    """Hidden (embedding) channels to keep; one global ranking prunes them everywhere."""
    ffn_hidden_size: Optional[int] = None
    """MLP neurons to keep in every layer (per branch for SwiGLU)."""
    num_attention_heads: Optional[int] = None
    """Query heads to keep. Heads are pruned uniformly within each kept group, so this must be a
    multiple of the target's query groups. Given alone, the groups stay (for a multi-head source,
    where each group holds one head, the groups follow the heads)."""
    num_query_groups: Optional[int] = None
    """Query groups (key/value heads) to keep, whole. Given alone, each kept group keeps all its heads."""
    num_experts: Optional[int] = None
    """Routed experts to keep in every MoE layer (each layer keeps its own best ones, in their source order);
    at least moe_router_topk."""
    moe_ffn_hidden_size: Optional[int] = None
    """Intermediate width of every routed expert (one width for all, as megatron requires; each expert
    keeps its own best neurons)."""
    moe_shared_expert_ffn_hidden_size: Optional[int] = None
    """Intermediate width of the shared expert of every MoE layer (the source must have one)."""
    drop_layers: Optional[tuple[int, ...]] = None
    """Explicit source layers to remove (instead of a ranking); num_layers, if given, must agree."""
    layer_metric: Optional[str] = None
    """How layers are ranked when num_layers shrinks: "bi" (default; drop the lowest Block Importance),
    "lm_loss" (drop the layers whose removal raises the LM loss least) or "block" (drop the contiguous
    block whose removal raises the LM loss least; needs that block size among the scored ones)."""
    head_merge: bool = False
    """Fold pruned heads into kept ones as the Minitron paper does (the pruner applies it)."""

    def __post_init__(self) -> None:
        for name in ALL_AXES:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise PlanError(f"target {name} must be an integer, got {value!r}")
        if self.drop_layers is not None:
            layers = tuple(self.drop_layers)
            if any(not isinstance(v, int) or isinstance(v, bool) for v in layers):
                raise PlanError(f"target drop_layers must be layer numbers, got {list(layers)}")
            if len(set(layers)) != len(layers):
                raise PlanError(f"target drop_layers lists a layer twice: {list(layers)}")
            object.__setattr__(self, "drop_layers", tuple(sorted(layers)))
        if self.layer_metric is not None and self.layer_metric not in LAYER_METRICS:
            raise PlanError(f"target layer_metric={self.layer_metric!r} is not one of {list(LAYER_METRICS)}")
        if self.layer_metric is not None and self.drop_layers is not None:
            raise PlanError("give either drop_layers or layer_metric, not both: explicit layers need no ranking")

    @property
    def metric(self) -> str:
        """The layer metric in effect ("bi" unless another was asked for)."""
        return self.layer_metric or "bi"

    def is_empty(self) -> bool:
        """Nothing requested: the plan keeps everything."""
        return all(getattr(self, name) is None for name in ALL_AXES) and not self.drop_layers

    def resolve(self, source: ArchConfig) -> dict[str, int]:
        """The target sizes, untouched axes filled from the source (not yet validated): the five dense
        axes, and for a MoE source the three expert axes too (a shared-expert width only when the source
        has a shared expert). A dense source given an expert axis is refused."""
        per_group = source.num_attention_heads // source.query_groups
        layers = self.num_layers
        if layers is None:
            layers = source.num_layers - len(self.drop_layers or ())
        groups, heads = self.num_query_groups, self.num_attention_heads
        if groups is None:
            groups = heads if (heads is not None and per_group == 1) else source.query_groups
        if heads is None:
            heads = groups * per_group
        sizes = {"num_layers": layers, "hidden_size": _given(self.hidden_size, source.hidden_size),
                 "ffn_hidden_size": _given(self.ffn_hidden_size, source.ffn_hidden_size),
                 "num_attention_heads": heads, "num_query_groups": groups}
        return {**sizes, **self._resolve_moe(source)}

    def _resolve_moe(self, source: ArchConfig) -> dict[str, int]:
        given = [name for name in MOE_AXES if getattr(self, name) is not None]
        if not source.is_moe:
            if given:
                raise PlanError(f"target {given[0]} ({SIZE_FLAGS[given[0]]}) prunes experts, but the source model "
                                f"is dense (num_experts is None); drop {SIZE_FLAGS[given[0]]}")
            return {}
        sizes = {"num_experts": _given(self.num_experts, source.num_experts),
                 "moe_ffn_hidden_size": _given(self.moe_ffn_hidden_size, source.expert_ffn_hidden_size)}
        shared = source.moe_shared_expert_ffn_hidden_size
        if shared is None and self.moe_shared_expert_ffn_hidden_size is not None:
            flag = SIZE_FLAGS["moe_shared_expert_ffn_hidden_size"]
            raise PlanError(f"target moe_shared_expert_ffn_hidden_size ({flag}) prunes the shared expert, but the "
                            f"source's MoE layers have none; drop {flag}")
        if shared is not None:
            sizes["moe_shared_expert_ffn_hidden_size"] = _given(self.moe_shared_expert_ffn_hidden_size, shared)
        return sizes

    # ---------------------------------------------------------------------------- serialisation
    def to_json(self) -> dict[str, Any]:
        """The export-config form: only the fields that were set."""
        data = {name: getattr(self, name) for name in ALL_AXES + ("layer_metric",) if getattr(self, name) is not None}
        if self.drop_layers is not None:
            data["drop_layers"] = list(self.drop_layers)
        if self.head_merge:
            data["head_merge"] = True
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], *, where: str = "export config") -> "Target":
        """Inverse of to_json; unknown keys are an error naming them (a typo must not prune nothing)."""
        if not isinstance(data, dict):
            raise PlanError(f"{where} must be a JSON object of target sizes, got {type(data).__name__}")
        unknown = unknown_fields(cls, data)
        if unknown:
            raise PlanError(f"{where} has unknown keys {unknown}; known keys: "
                            f"{sorted(f.name for f in dataclasses.fields(cls))}")
        return cls(**data)


def _given(value: Optional[int], default: int) -> int:
    """value unless it was not given (a 0 stays 0, so validation can refuse it by name)."""
    return default if value is None else value


def load_target(path: str | os.PathLike) -> Target:
    """A Target from one JSON export config file."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"export config {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PlanError(f"export config {path} is not valid JSON: {error}") from None
    return Target.from_json(data, where=f"export config {path}")


# ------------------------------------------------------------------------------------- argparse
SIZE_FLAGS = {name: f"--target-{name.replace('_', '-')}" for name in AXES}
# The expert flags use megatron-core's names (num_moe_experts, moe_shared_expert_intermediate_size).
SIZE_FLAGS.update(num_experts="--target-num-moe-experts", moe_ffn_hidden_size="--target-moe-ffn-hidden-size",
                  moe_shared_expert_ffn_hidden_size="--target-moe-shared-expert-intermediate-size")
_FLAGS = {f"target_{name}": flag for name, flag in SIZE_FLAGS.items()}
_FLAGS.update(drop_layers="--drop-layers", layer_metric="--layer-metric")


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """The pruning-target flags: per-axis sizes, layer choice, head merge, or one --export-config."""
    group = parser.add_argument_group("pruning target (sizes to keep; untouched axes keep the source's)")
    for name, flag in SIZE_FLAGS.items():
        group.add_argument(flag, type=positive(), default=None, metavar="N", dest=f"target_{name}",
                           help=f"target {name}" + (" (Mixture-of-Experts models)" if name in MOE_AXES else ""))
    group.add_argument("--drop-layers", type=non_negative(), nargs="+", default=None, metavar="LAYER",
                       help="source layers to remove (0-based), instead of ranking them")
    group.add_argument("--layer-metric", choices=LAYER_METRICS, default=None,
                       help="how layers are ranked when --target-num-layers shrinks (default: bi)")
    group.add_argument("--head-merge", action="store_true",
                       help="fold pruned heads into kept ones (Minitron paper); may be combined with --export-config")
    group.add_argument("--export-config", default=None, metavar="FILE.json",
                       help="all target sizes in one JSON object (num_layers, hidden_size, ffn_hidden_size, "
                            "num_attention_heads, num_query_groups, num_experts, moe_ffn_hidden_size, "
                            "moe_shared_expert_ffn_hidden_size, drop_layers, layer_metric) instead of flags")


def target_from_args(args: argparse.Namespace) -> Target:
    """The Target the flags describe; flags and --export-config together are refused."""
    given = [flag for dest, flag in _FLAGS.items() if getattr(args, dest, None) is not None]
    if args.export_config is not None:
        if given:
            raise PlanError(f"--export-config {args.export_config} and {', '.join(given)} both give a target; "
                            f"put every size in the export config or use flags only")
        target = load_target(args.export_config)
        return dataclasses.replace(target, head_merge=target.head_merge or args.head_merge)
    sizes = {name: getattr(args, f"target_{name}") for name in ALL_AXES}
    drop = tuple(args.drop_layers) if args.drop_layers is not None else None
    return Target(**sizes, drop_layers=drop, layer_metric=args.layer_metric, head_merge=args.head_merge)
