"""How every tensor of a torch_dist checkpoint maps from the source model to the pruned one.

Pure functions of a `Plan`: no files, no processes. For each stored key, `rule_for(key, plan)` says
what the target key is and, per dimension, which source indices survive (`None`: all of them). A
layer-stacked tensor (`decoder.layers.X`, shape [L, ...]) selects the kept layers on axis 0 and
then, per kept layer, its own indices on the other dims (each layer keeps its own heads and
neurons); the per-layer layout of `singleton_local_shards` checkpoints (`decoder.layers.{i}.X`)
uses the same per-layer rules and renumbers i.

What each axis selects (source indices; every list is ascending, so a row range of the target
reads one contiguous row range of the source):

- hidden: every dim of size hidden_size: qkv/fc1 columns, proj/fc2 rows and biases, every norm
  weight/bias, word/position embedding and output-layer columns (vocab rows, padding included,
  are untouched).
- qkv rows (group-major, see DESIGN.md §2): per kept group g, the kept query heads' rows (in head
  order), then g's key rows, then g's value rows, kv_channels rows each. The qkv bias alike.
- linear_proj columns: the kept heads' kv_channels columns, in the same order as the qkv rows.
- fc1 rows: the kept neurons; GLU models hold [gate; up], and the same neurons are kept in both
  halves. singleton layouts store them as `weight_w` (gate) / `weight_v` (up).
- linear_fc2 columns: the kept neurons.
- experts (Mixture-of-Experts layers, DESIGN.md §2c): the router's rows (and its expert bias, if
  any) and the expert axis of the expert tensors ([layer, expert, rows, cols] globally) keep the
  layer's kept experts, in source order. Each kept expert then keeps ITS OWN neurons (`expert_ffn`):
  its fc1 rows ([gate; up] for GLU, as the dense MLP) and its fc2 columns; the index of that dim is
  one row per kept expert ([experts, neurons]), the only per-row index of the pruner. Shared-expert
  fc1 rows / fc2 columns keep `shared_ffn`. The MoE layer's pre-MLP norm is stored as a dense layer's
  fused fc1 norm and prunes with the hidden channels like it. Expert `_extra_state` objects carry
  the expert axis in their names (`shard_{layer}.{expert}_{L}.{E}`) and are renumbered likewise.
  megatron keys a stack that mixes dense and MoE layers per layer and an all-MoE stack stacked: a plan
  that drops every dense layer of a mixed stack writes each per-layer source key as one layer of the
  stacked target key (`restacks`), objects included.
- QK layernorm weights/biases ([kv_channels], shared by every head of a layer): kept whole; a plan never
  changes kv_channels, so only their layer axis is selected (their size is still checked).

Head merge (optional, `plan.head_merge`, needs head scores): the Minitron paper adds residual
information of pruned heads to the kept ones, head_i <- head_i + (head_i - head_{2K-i+1}) when L
heads become K. Here it is applied per source query group, where heads rank by their importance
score: with n heads in the group of which K are kept, the kept head of rank i (1 = most important)
absorbs the head of group rank 2K-i+1 when that rank exists (<= n) and that head is pruned, so the
least important kept head absorbs the most important pruned one. "Head" means the weights that
belong to one query head alone: its kv_channels query rows of linear_qkv (and their bias) and its
kv_channels input columns of linear_proj; keys and values are shared by the group and stay as they
are. W_kept <- 2 W_kept - W_pruned on those rows/columns, before the selection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megatron_minitron.config import ConfigError
from megatron_minitron.model.storage import Scratch, is_training_state, select
from megatron_minitron.plan.plan import Plan

LAYER_PREFIX = "decoder.layers."

_SHARD_SUFFIX = re.compile(r"^(?P<name>.+)/shard_(?P<offsets>[0-9.]+)_(?P<shape>[0-9.]+)$")


class PruneError(ConfigError):
    """A checkpoint, plan or option the pruner cannot apply; the message names the key or file."""


# Per-layer parameters: what each non-layer dim of the tensor indexes (None: not pruned).
LAYER_RULES: dict[str, tuple[Optional[str], ...]] = {
    "self_attention.linear_qkv.layer_norm_weight": ("hidden",),
    "self_attention.linear_qkv.layer_norm_bias": ("hidden",),
    "input_layernorm.weight": ("hidden",),
    "input_layernorm.bias": ("hidden",),
    "self_attention.linear_qkv.weight": ("qkv", "hidden"),
    "self_attention.linear_qkv.bias": ("qkv",),
    "self_attention.linear_proj.weight": ("hidden", "heads"),
    "self_attention.linear_proj.bias": ("hidden",),
    "self_attention.q_layernorm.weight": ("kv_channels",),
    "self_attention.q_layernorm.bias": ("kv_channels",),
    "self_attention.k_layernorm.weight": ("kv_channels",),
    "self_attention.k_layernorm.bias": ("kv_channels",),
    "mlp.linear_fc1.layer_norm_weight": ("hidden",),
    "mlp.linear_fc1.layer_norm_bias": ("hidden",),
    "pre_mlp_layernorm.weight": ("hidden",),
    "pre_mlp_layernorm.bias": ("hidden",),
    "mlp.linear_fc1.weight": ("fc1", "hidden"),
    "mlp.linear_fc1.bias": ("fc1",),
    "mlp.linear_fc1.weight_w": ("ffn", "hidden"),
    "mlp.linear_fc1.weight_v": ("ffn", "hidden"),
    "mlp.linear_fc1.bias_w": ("ffn",),
    "mlp.linear_fc1.bias_v": ("ffn",),
    "mlp.linear_fc2.weight": ("hidden", "ffn"),
    "mlp.linear_fc2.bias": ("hidden",),
    # Mixture-of-Experts layers: router, routed experts (SequentialMLP and the grouped-GEMM experts store
    # the same global keys in megatron-core 0.16.1), shared expert.
    "mlp.router.weight": ("experts", "hidden"),
    "mlp.router.expert_bias": ("experts",),
    "mlp.experts.experts.linear_fc1.weight": ("experts", "expert_fc1", "hidden"),
    "mlp.experts.experts.linear_fc2.weight": ("experts", "hidden", "expert_ffn"),
    "mlp.shared_experts.linear_fc1.weight": ("shared_fc1", "hidden"),
    "mlp.shared_experts.linear_fc2.weight": ("hidden", "shared_ffn"),
}
EXPERT_OBJECT_PREFIXES = ("mlp.experts.",)
"""Per-layer names of stored objects with an expert axis (routed experts' `_extra_state`)."""


# Tensors outside the layers.
GLOBAL_RULES: dict[str, tuple[Optional[str], ...]] = {
    "embedding.word_embeddings.weight": (None, "hidden"),
    "embedding.position_embeddings.weight": (None, "hidden"),
    "output_layer.weight": (None, "hidden"),
    "decoder.final_layernorm.weight": ("hidden",),
    "decoder.final_layernorm.bias": ("hidden",),
}


@dataclass(frozen=True)
class TensorRule:
    """How one stored tensor becomes one target tensor.

    For a layer-stacked tensor (`layered`), target[j] = select(source[source_layer(j)], j); otherwise
    target = select(source, 0). `select` picks `index(j)[d]` on dim d of the per-layer tensor (None:
    every index), after the head merge when `merge(j)` lists pairs.
    """

    source_key: str
    target_key: str
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    layered: bool
    """Stacked layer axis on dim 0 of the stored tensor."""
    axes: tuple[Optional[str], ...]
    """Axis name of each per-layer dim (hidden, qkv, heads, fc1, ffn, kv_channels or None)."""
    source_layer: Callable[[int], int]
    index: Callable[[int], tuple[Optional[torch.Tensor], ...]]
    merge: Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]]
    """Per target layer: (kept rows, pruned rows) pairs of `merge_dim`, each pair kv_channels long."""
    merge_dim: Optional[int] = None
    """Per-layer dim the head merge edits (qkv rows or proj columns), None when it does not apply."""
    stack_at: Optional[int] = None
    """A per-layer source key written as layer `stack_at` of a stacked target key (see `restacks`)."""

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.target_shape[1:] if self.layered or self.stack_at is not None else self.target_shape

    def apply(self, source: torch.Tensor, j: int = 0, rows: Optional[tuple[int, int]] = None,
              rows_selected: bool = False, scratch: Optional[Scratch] = None) -> torch.Tensor:
        """The target layer j (the whole target for an unlayered tensor) from the per-layer source
        tensor; with rows=(a, b), only target rows a:b of the first per-layer dim, given source rows
        `source_rows(j, a, b)` (relative to their start), or, with rows_selected, given exactly the
        source rows `row_index(j, a, b)` selects (the reader picked them). With `scratch`, the
        selections write into its reused buffers: the result is valid until its next use."""
        index = self.index(j)
        pairs = self.merge(j)
        if pairs:
            if rows is not None and self.merge_dim == 0:
                raise PruneError(f"{self.source_key}: the head merge needs whole layers (no row chunks)")
            source = source.clone()
            for kept, pruned in pairs:
                kept_part = source.index_select(self.merge_dim, kept)
                pruned_part = source.index_select(self.merge_dim, pruned)
                source.index_copy_(self.merge_dim, kept, 2 * kept_part - pruned_part)
        out = source
        for dim, idx in enumerate(index):
            if dim == 0 and rows is not None:
                if idx is not None and not rows_selected:
                    a, b = rows
                    start = int(idx[a]) if b > a else 0
                    out = out.index_select(0, idx[a:b] - start)
                continue
            if idx is not None and idx.dim() == 2:  # each expert (dim 0) its own indices
                per_expert = idx if rows is None else idx[rows[0]:rows[1]]
                out = torch.stack([out[e].index_select(dim - 1, per_expert[e]) for e in range(out.shape[0])])
            elif idx is not None:
                out = select(out, dim, idx, scratch, f"dim{dim}")
        return out

    def row_index(self, j: int, a: int, b: int) -> Optional[torch.Tensor]:
        """The source rows of target rows a:b of layer j, relative to `source_rows(j, a, b)`'s start
        (None: all of them)."""
        idx = self.index(j)[0] if self.index(j) else None
        if idx is None or b <= a:
            return None
        return idx[a:b] - int(idx[a])

    def source_rows(self, j: int, a: int, b: int) -> tuple[int, int]:
        """Source row range (first per-layer dim) that target rows a:b of layer j read."""
        idx = self.index(j)[0] if self.index(j) else None
        if idx is None or b <= a:
            return a, b
        return int(idx[a]), int(idx[b - 1]) + 1


def _glu_rows(neurons: Sequence[int], width: int) -> list[int]:
    """fc1 rows of the kept neurons of a GLU MLP: [gate rows; up rows]."""
    return list(neurons) + [width + i for i in neurons]


def _range_or_none(indices: Sequence[int], size: int) -> Optional[torch.Tensor]:
    if len(indices) == size and tuple(indices) == tuple(range(size)):
        return None
    return torch.as_tensor(list(indices), dtype=torch.long)


class AxisIndices:
    """Kept source indices of every axis for every kept layer of a plan (cached tensors)."""

    def __init__(self, plan: Plan, head_scores: Optional[torch.Tensor] = None):
        self.plan = plan
        src = plan.source.explicit()
        self.src = src
        self.kv = src.head_dim
        self.per_group = src.num_attention_heads // src.query_groups
        self.hidden = _range_or_none(plan.hidden, src.hidden_size)
        self._cache: dict[tuple[str, int], Optional[torch.Tensor]] = {}
        if plan.head_merge and head_scores is None:
            raise PruneError("the plan asks for the head merge, which needs the head importance scores "
                             "(scores tensor 'heads' [layers, heads]); pass the scores directory")
        if head_scores is not None and tuple(head_scores.shape) != (src.num_layers, src.num_attention_heads):
            raise PruneError(f"head scores have shape {tuple(head_scores.shape)}; the source model needs "
                             f"{(src.num_layers, src.num_attention_heads)}")
        self.head_scores = head_scores

    def get(self, axis: Optional[str], j: int) -> Optional[torch.Tensor]:
        if axis is None or axis == "kv_channels":  # plans keep kv_channels (plan.py refuses changing it)
            return None
        if axis == "hidden":
            return self.hidden
        key = (axis, j)
        if key not in self._cache:
            self._cache[key] = getattr(self, f"_{axis}")(j)
        return self._cache[key]

    def _experts(self, j: int) -> Optional[torch.Tensor]:
        return _range_or_none(self.plan.experts[j], self.src.num_experts)

    def _expert_ffn(self, j: int) -> Optional[torch.Tensor]:
        return self._per_expert(self.plan.expert_ffn[j], self.src.expert_ffn_hidden_size, gated=False)

    def _expert_fc1(self, j: int) -> Optional[torch.Tensor]:
        return self._per_expert(self.plan.expert_ffn[j], self.src.expert_ffn_hidden_size, gated=self.src.gated)

    def _per_expert(self, rows: tuple, width: int, *, gated: bool) -> Optional[torch.Tensor]:
        """[kept experts, kept rows]: each kept expert's own rows (None when every one keeps every row)."""
        full = [_glu_rows(r, width) if gated else list(r) for r in rows]
        size = width * (2 if gated else 1)
        if all(_range_or_none(r, size) is None for r in full):
            return None
        return torch.as_tensor(full, dtype=torch.long)

    def _shared_ffn(self, j: int) -> Optional[torch.Tensor]:
        return _range_or_none(self.plan.shared_ffn[j], self.src.moe_shared_expert_ffn_hidden_size)

    def _shared_fc1(self, j: int) -> Optional[torch.Tensor]:
        F = self.src.moe_shared_expert_ffn_hidden_size
        rows = self.plan.shared_ffn[j]
        return _range_or_none(_glu_rows(rows, F) if self.src.gated else list(rows), F * (2 if self.src.gated else 1))

    def _ffn(self, j: int) -> Optional[torch.Tensor]:
        return _range_or_none(self.plan.ffn[j], self.src.ffn_hidden_size)

    def _fc1(self, j: int) -> Optional[torch.Tensor]:
        ffn = self.plan.ffn[j]
        F = self.src.ffn_hidden_size
        rows = list(ffn) + [F + i for i in ffn] if self.src.gated else list(ffn)
        return _range_or_none(rows, F * (2 if self.src.gated else 1))

    def _heads(self, j: int) -> Optional[torch.Tensor]:
        kv = self.kv
        cols = [h * kv + c for h in self.plan.heads[j] for c in range(kv)]
        return _range_or_none(cols, self.src.num_attention_heads * kv)

    def qkv_rows_of_head(self, head: int) -> list[int]:
        group, local = divmod(head, self.per_group)
        start = (group * (self.per_group + 2) + local) * self.kv
        return list(range(start, start + self.kv))

    def _qkv(self, j: int) -> Optional[torch.Tensor]:
        kv, n = self.kv, self.per_group
        n_dst = len(self.plan.heads[j]) // len(self.plan.query_groups[j])
        rows: list[int] = []
        for t, group in enumerate(self.plan.query_groups[j]):
            for head in self.plan.heads[j][t * n_dst:(t + 1) * n_dst]:
                rows += self.qkv_rows_of_head(head)
            base = group * (n + 2) * kv
            rows += range(base + n * kv, base + (n + 2) * kv)  # the group's key then value rows
        return _range_or_none(rows, self.src.query_groups * (n + 2) * kv)

    def merge_pairs(self, j: int) -> list[tuple[int, int]]:
        """(kept head, pruned head) pairs of the head merge in target layer j (see the module docstring)."""
        if not self.plan.head_merge:
            return []
        layer = self.plan.layers[j]
        scores = self.head_scores[layer]
        kept = set(self.plan.heads[j])
        n = self.per_group
        pairs = []
        for group in self.plan.query_groups[j]:
            heads = list(range(group * n, (group + 1) * n))
            ranked = sorted(heads, key=lambda h: (-float(scores[h]), h))
            kept_ranked = [h for h in ranked if h in kept]
            K = len(kept_ranked)
            for i, head in enumerate(kept_ranked, start=1):
                other = 2 * K - i + 1
                if other <= n and ranked[other - 1] not in kept:
                    pairs.append((head, ranked[other - 1]))
        return pairs


def restacks(plan: Plan) -> bool:
    """Whether the plan turns megatron's per-layer keys into stacked ones: megatron keys a stack that mixes
    dense and MoE layers per layer (`decoder.layers.{i}.…`) and a homogeneous one stacked
    (`decoder.layers.…` [L, …]), so dropping every dense layer of a mixed stack changes the key layout."""
    src, dst = plan.source, plan.target
    return src.is_moe and not all(src.moe_layers) and all(dst.moe_layers)


def parse_shard_key(key: str) -> Optional[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """`name/shard_{offsets}_{shape}` (a megatron ShardedObject) -> (name, offsets, shape), else None."""
    match = _SHARD_SUFFIX.match(key)
    if match is None:
        return None
    offsets = tuple(int(x) for x in match["offsets"].split("."))
    shape = tuple(int(x) for x in match["shape"].split("."))
    return match["name"], offsets, shape


def _split_layer_key(key: str) -> tuple[Optional[int], str]:
    """decoder.layers.{i}.X -> (i, X); decoder.layers.X -> (None, X)."""
    rest = key[len(LAYER_PREFIX):]
    head, _, tail = rest.partition(".")
    if head.isdigit():
        return int(head), tail
    return None, rest


def is_dropped(key: str) -> bool:
    """Stored keys the pruned checkpoint leaves out: optimizer state (its shapes and the distributed
    optimizer's flat layout belong to the source model; distillation starts a fresh optimizer), a MoE
    model's chained expert optimizer included, and the RNG states of the ranks that saved the source."""
    return is_training_state(key)


def rename_object(key: str, plan: Plan) -> Optional[str]:
    """Target key of a stored object (`_extra_state/shard_...`), or None when its layer is pruned.

    Layer-stacked objects are `decoder.layers.X/shard_{i}_{L}` (layer i of L; megatron prepends
    the layer axis); per-layer ones are `decoder.layers.{i}.X/shard_0_1`. Both get the target layer
    number and count (the loader's planner finds objects by these exact names, see DESIGN.md §2).
    Routed experts' objects also carry the expert axis (`shard_{i}.{e}_{L}.{E}`, or `shard_{e}_{E}` per
    layer): kept experts are renumbered in order, pruned ones dropped.
    """
    parsed = parse_shard_key(key)
    if parsed is None:
        raise PruneError(f"stored object {key!r} is not a megatron ShardedObject (name/shard_<offsets>_<shape>); "
                         f"the pruner does not know how to carry it over")
    name, offsets, shape = parsed
    if not name.startswith(LAYER_PREFIX):
        return key  # e.g. an output layer's extra state: no layer axis, nothing pruned
    new_of = {src: dst for dst, src in enumerate(plan.layers)}
    layer, suffix = _split_layer_key(name)
    per_layer = layer is not None  # singleton/mixed layout: the layer number is in the name
    if per_layer:
        if layer not in new_of:
            return None
        j = new_of[layer]
        name = f"{LAYER_PREFIX}{j}.{suffix}"
        if restacks(plan):  # the stacked name carries the layer axis: shard_0_1 -> shard_j_L, shard_e_E -> j.e
            name = f"{LAYER_PREFIX}{suffix}"
            is_expert = suffix.startswith(EXPERT_OBJECT_PREFIXES)
            offsets = (j,) + (offsets if is_expert else offsets[1:])
            shape = (plan.target.num_layers,) + (shape if is_expert else shape[1:])
            per_layer = False
    else:
        if shape[0] != plan.source.num_layers:
            raise PruneError(f"stored object {key!r} has a layer axis of {shape[0]}, but the source model has "
                             f"{plan.source.num_layers} layers")
        if offsets[0] not in new_of:
            return None
        j = new_of[offsets[0]]
        offsets = (j,) + offsets[1:]
        shape = (plan.target.num_layers,) + shape[1:]
    if suffix.startswith(EXPERT_OBJECT_PREFIXES):  # the expert axis follows the layer axis (if any)
        d = 0 if per_layer else 1
        if len(shape) <= d or shape[d] != plan.source.num_experts:
            raise PruneError(f"stored object {key!r} should have an expert axis of {plan.source.num_experts} "
                             f"after its layer axis; the pruner does not know this layout")
        kept = plan.experts[j]
        if offsets[d] not in kept:
            return None
        offsets = offsets[:d] + (kept.index(offsets[d]),) + offsets[d + 1:]
        shape = shape[:d] + (len(kept),) + shape[d + 1:]
    return f"{name}/shard_{'.'.join(map(str, offsets))}_{'.'.join(map(str, shape))}"


def rule_for(key: str, shape: Sequence[int], plan: Plan, axes_index: AxisIndices) -> Optional[TensorRule]:
    """The rule for one stored tensor; None when the tensor is not carried over (a pruned layer of a
    per-layer checkpoint, or a dropped key). Unknown keys raise PruneError naming them."""
    shape = tuple(int(s) for s in shape)
    stack_at = None
    if is_dropped(key):
        return None
    if key.startswith(LAYER_PREFIX):
        layer, suffix = _split_layer_key(key)
        if suffix not in LAYER_RULES:
            raise PruneError(f"checkpoint tensor {key!r} is not one the pruner knows (per-layer names: "
                             f"{sorted(LAYER_RULES)}); refusing to copy it unchanged")
        axes = LAYER_RULES[suffix]
        if layer is None:
            if len(shape) != len(axes) + 1 or shape[0] != plan.source.num_layers:
                raise PruneError(f"checkpoint tensor {key!r} has shape {shape}; expected a stacked layer axis "
                                 f"of {plan.source.num_layers} followed by {len(axes)} dims")
            target_key, layered, per_layer = key, True, shape[1:]
            source_layer = (lambda j: plan.layers[j])
            j_of = (lambda j: j)
        else:
            if layer not in plan.layers:
                return None
            j_fixed = plan.layers.index(layer)
            target_key, layered, per_layer = f"{LAYER_PREFIX}{j_fixed}.{suffix}", False, shape
            if restacks(plan):
                target_key, stack_at = f"{LAYER_PREFIX}{suffix}", j_fixed
            source_layer = (lambda j: layer)
            j_of = (lambda j, _j=j_fixed: _j)
    elif key in GLOBAL_RULES:
        axes = GLOBAL_RULES[key]
        target_key, layered, per_layer = key, False, shape
        source_layer = (lambda j: 0)
        j_of = (lambda j: 0)
    else:
        raise PruneError(f"checkpoint tensor {key!r} is not one the pruner knows (known: {sorted(GLOBAL_RULES)} "
                         f"and per-layer {sorted(LAYER_RULES)}); refusing to copy it unchanged")

    expected = _expected_sizes(plan)
    if len(per_layer) != len(axes):
        raise PruneError(f"checkpoint tensor {key!r} has shape {shape}; expected {len(axes)} dims per layer")
    for d, axis in enumerate(axes):
        if axis is not None and axis not in expected:
            raise PruneError(f"checkpoint tensor {key!r} belongs to a Mixture-of-Experts layer, but the plan's source "
                             f"model is dense: the plan does not belong to this checkpoint")
        if axis is not None and per_layer[d] != expected[axis]:
            raise PruneError(f"checkpoint tensor {key!r} has size {per_layer[d]} on its {axis} dim, but the plan's "
                             f"source model has {expected[axis]}: the plan does not belong to this checkpoint")

    def index(j: int) -> tuple[Optional[torch.Tensor], ...]:
        return tuple(axes_index.get(axis, j_of(j)) for axis in axes)

    merge_dim = None
    if plan.head_merge and axes and axes[0] == "qkv":
        merge_dim = 0
    elif plan.head_merge and len(axes) > 1 and axes[1] == "heads":
        merge_dim = 1

    def merge(j: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if merge_dim is None:
            return []
        out = []
        for kept, pruned in axes_index.merge_pairs(j_of(j)):
            if axes[merge_dim] == "qkv":
                rows = axes_index.qkv_rows_of_head(kept), axes_index.qkv_rows_of_head(pruned)
            else:
                kv = axes_index.kv
                rows = list(range(kept * kv, (kept + 1) * kv)), list(range(pruned * kv, (pruned + 1) * kv))
            out.append((torch.tensor(rows[0]), torch.tensor(rows[1])))
        return out

    # Every kept layer keeps the same number of indices per axis (the plan validated it): use layer 0's
    # (the last dim of a per-expert index is the count each expert keeps).
    target_layer = tuple(per_layer[d] if idx is None else idx.shape[-1] for d, idx in enumerate(index(0)))
    target_shape = ((plan.target.num_layers,) + target_layer) if layered or stack_at is not None else target_layer
    return TensorRule(source_key=key, target_key=target_key, source_shape=shape, target_shape=target_shape,
                      layered=layered, axes=axes, source_layer=source_layer, index=index, merge=merge,
                      merge_dim=merge_dim, stack_at=stack_at)


def _expected_sizes(plan: Plan) -> dict[str, int]:
    src = plan.source.explicit()
    kv = src.head_dim
    glu = 2 if src.gated else 1
    sizes = {"hidden": src.hidden_size, "ffn": src.ffn_hidden_size, "kv_channels": kv,
             "fc1": src.ffn_hidden_size * glu, "heads": src.num_attention_heads * kv,
             "qkv": (src.num_attention_heads + 2 * src.query_groups) * kv}
    if src.is_moe:
        shared = src.moe_shared_expert_ffn_hidden_size or 0
        sizes.update(experts=src.num_experts, expert_ffn=src.expert_ffn_hidden_size,
                     expert_fc1=src.expert_ffn_hidden_size * glu, shared_ffn=shared, shared_fc1=shared * glu)
    return sizes


def slice_full(tensors: dict[str, torch.Tensor], plan: Plan, head_scores: Optional[torch.Tensor] = None
               ) -> dict[str, torch.Tensor]:
    """Apply the plan to whole in-memory tensors (reference path for tests and small models)."""
    axes = AxisIndices(plan, head_scores)
    out, restacked = {}, {}
    for key, tensor in tensors.items():
        rule = rule_for(key, tensor.shape, plan, axes)
        if rule is None:
            continue
        if rule.layered:
            out[rule.target_key] = torch.stack([rule.apply(tensor[rule.source_layer(j)], j)
                                                for j in range(plan.target.num_layers)])
        elif rule.stack_at is not None:
            restacked.setdefault(rule.target_key, {})[rule.stack_at] = rule.apply(tensor)
        else:
            out[rule.target_key] = rule.apply(tensor)
    for key, layers in restacked.items():
        out[key] = torch.stack([layers[j] for j in range(plan.target.num_layers)])
    return out
