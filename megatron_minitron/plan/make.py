"""Scores + Target -> Plan: validate everything first, then keep the top-ranked indices on every axis.

Ranking rule, the same on every axis: keep the k highest scores, ties going to the lower index, and
list the kept indices ascending. Query heads are ranked within each kept group (GQA structure stays:
every target group keeps the same number of its own heads); whole groups are ranked by the
`query_groups` score. Nothing here imports megatron or needs a process group.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from megatron_minitron.config import ArchConfig, ConfigError
from megatron_minitron.importance.scores import Scores, load_scores
from megatron_minitron.plan.plan import Plan, PlanError
from megatron_minitron.plan.target import MOE_AXES, SIZE_FLAGS, Target

def make_plan(scores: Union[Scores, str, os.PathLike], target: Target, *, source: Optional[ArchConfig] = None,
              tensor_parallel: Optional[int] = None, pipeline_parallel: Optional[int] = None,
              expert_parallel: Optional[int] = None) -> Plan:
    """The plan that prunes `source` (default: the scored model) to `target` by the scores' ranking.

    `scores` is a Scores value or a scores directory (recorded in the plan's provenance). Every check
    runs before any index is chosen; tensor_parallel / pipeline_parallel / expert_parallel name the
    layout the pruned model must load at. Each MoE layer keeps its own best experts by the `experts`
    scores, each kept expert its own best neurons by `expert_ffn`.
    """
    scores_dir = None
    if not isinstance(scores, Scores):
        scores_dir = str(scores)
        scores = load_scores(scores)
    source = (source or scores.arch).explicit()
    check_scores_kind(scores, source)
    scores.check_belongs_to(source, what="the model to prune")
    _check_score_tensors(scores, source)
    sizes = check_target(source, target, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                         expert_parallel=expert_parallel)
    _check_layer_scores(scores, source, target, sizes)

    layers, metric = _choose_layers(scores, source, target, sizes["num_layers"])
    manifest = scores.manifest
    provenance = {"scores_dir": scores_dir, "checkpoint": manifest.checkpoint, "iteration": manifest.iteration,
                  "arch_fingerprint": manifest.arch_fingerprint,
                  "aggregation": {"seq": manifest.seq_aggregation, "batch": manifest.batch_aggregation,
                                  "hidden_final_norm": manifest.hidden_final_norm, "ffn_source": manifest.ffn_source},
                  "layer_metric": metric, "dropped_layers": sorted(set(range(source.num_layers)) - set(layers))}
    return _build(source, sizes, scores.tensors, layers, head_merge=target.head_merge, provenance=provenance)


def random_plan(arch: ArchConfig, target: Target, seed: int, *, tensor_parallel: Optional[int] = None,
                pipeline_parallel: Optional[int] = None, expert_parallel: Optional[int] = None) -> Plan:
    """The paper's random baseline: a random ranking on every axis (experts and their neurons too), the
    same for the same seed.

    Explicit drop_layers are honoured; otherwise the layers are random too (layer_metric is ignored).
    """
    source = arch.explicit()
    sizes = check_target(source, target, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                         expert_parallel=expert_parallel)
    generator = torch.Generator().manual_seed(seed)
    L = source.num_layers
    shapes = {"heads": (L, source.num_attention_heads), "query_groups": (L, source.query_groups),
              "ffn": (L, source.ffn_hidden_size), "hidden": (source.hidden_size,), "layers_bi": (L,)}
    shapes.update(_moe_score_shapes(source))
    tensors = {key: torch.rand(shape, generator=generator, dtype=torch.float64) for key, shape in shapes.items()}
    if target.drop_layers is not None:
        layers, metric = _keep_all_but(L, target.drop_layers), "drop_layers"
    else:
        layers, metric = top_k(tensors["layers_bi"], sizes["num_layers"]), "random"
    provenance = {"random_seed": seed, "layer_metric": metric,
                  "dropped_layers": sorted(set(range(L)) - set(layers))}
    return _build(source, sizes, tensors, layers, head_merge=target.head_merge, provenance=provenance)


def top_k(values: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest values, ties to the lower index, sorted ascending."""
    order = torch.sort(values.to(torch.float64), descending=True, stable=True).indices
    return sorted(order[:k].tolist())


# ------------------------------------------------------------------------------------ validation
def check_target(source: ArchConfig, target: Target, *, tensor_parallel: Optional[int] = None,
                 pipeline_parallel: Optional[int] = None, expert_parallel: Optional[int] = None) -> dict[str, int]:
    """The resolved target sizes, after refusing every target that cannot be pruned to (field + fix named)."""
    _check_drop_layers(source, target)
    sizes = target.resolve(source)
    if source.is_moe:
        _check_experts(source, target, sizes, expert_parallel)
    elif expert_parallel not in (None, 1):
        raise PlanError(f"expert-parallel size {expert_parallel} needs a Mixture-of-Experts model; the source is "
                        f"dense: use --ep 1")
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_query_groups", "num_attention_heads"):
        value = sizes[name]  # groups before heads: given groups alone, the heads derive from them
        have = source.query_groups if name == "num_query_groups" else getattr(source, name)
        if value < 1:
            raise PlanError(f"target {name}={value} ({SIZE_FLAGS[name]}) would prune the whole axis away; "
                            f"keep at least 1 (the source has {have})")
        if value > have:
            raise PlanError(f"target {name}={value} ({SIZE_FLAGS[name]}) is larger than the source's {have}; "
                            f"pruning only removes, so choose at most {have}")
    _check_heads(source, sizes)
    _check_parallel(source, sizes, tensor_parallel, pipeline_parallel)
    return sizes


def _check_experts(source: ArchConfig, target: Target, sizes: dict[str, int], ep: Optional[int]) -> None:
    """Expert counts and widths: within the source, at least top-k experts, EP dividing them."""
    have = {"num_experts": source.num_experts, "moe_ffn_hidden_size": source.expert_ffn_hidden_size,
            "moe_shared_expert_ffn_hidden_size": source.moe_shared_expert_ffn_hidden_size}
    for name in [n for n in MOE_AXES if n in sizes]:
        value = sizes[name]
        if value < 1:
            raise PlanError(f"target {name}={value} ({SIZE_FLAGS[name]}) would prune the whole axis away; keep at "
                            f"least 1 (the source has {have[name]})")
        if value > have[name]:
            raise PlanError(f"target {name}={value} ({SIZE_FLAGS[name]}) is larger than the source's {have[name]}; "
                            f"pruning only removes, so choose at most {have[name]}")
    if all(source.moe_layers) and target.ffn_hidden_size not in (None, source.ffn_hidden_size):
        raise PlanError(f"target ffn_hidden_size ({SIZE_FLAGS['ffn_hidden_size']}) prunes dense MLPs, but every layer "
                        f"of the source is a MoE layer; use {SIZE_FLAGS['moe_ffn_hidden_size']} for the experts' width")
    k = source.moe_router_topk
    if sizes["num_experts"] < k:
        raise PlanError(f"target num_experts={sizes['num_experts']} ({SIZE_FLAGS['num_experts']}) is fewer than the "
                        f"router's top-k ({k} experts per token); keep at least {k} experts")
    if ep is not None and (ep < 1 or sizes["num_experts"] % ep):
        raise PlanError(f"target num_experts={sizes['num_experts']} ({SIZE_FLAGS['num_experts']}) is not divisible "
                        f"by the expert-parallel size {ep}; choose a multiple of {ep} or another --ep")
    kept = [source.moe_layers[layer] for layer in _kept_layers_if_known(source, target, sizes["num_layers"])]
    if kept and not any(kept):
        raise PlanError(f"drop_layers {list(target.drop_layers)} removes every MoE layer; a pruned MoE model keeps "
                        f"at least one (or start from a dense model)")


def _check_drop_layers(source: ArchConfig, target: Target) -> None:
    if target.drop_layers is None:
        return
    L = source.num_layers
    outside = [layer for layer in target.drop_layers if not 0 <= layer < L]
    if outside:
        raise PlanError(f"drop_layers {outside} are not layers of the source, which has layers 0..{L - 1}")
    if target.num_layers is not None and target.num_layers != L - len(target.drop_layers):
        raise PlanError(f"target num_layers={target.num_layers} disagrees with drop_layers, which leave "
                        f"{L - len(target.drop_layers)} of {L} layers; give one of them or make them agree")


def _check_heads(source: ArchConfig, sizes: dict[str, int]) -> None:
    heads, groups = sizes["num_attention_heads"], sizes["num_query_groups"]
    if heads % groups:
        raise PlanError(f"target num_attention_heads={heads} is not a multiple of num_query_groups={groups}: "
                        f"query heads are pruned uniformly within each group, so choose a multiple of {groups}")
    have = source.num_attention_heads // source.query_groups
    if heads // groups > have:
        raise PlanError(f"target num_attention_heads={heads} over num_query_groups={groups} puts {heads // groups} "
                        f"heads in each group, but the source's groups hold {have}; keep num_attention_heads <= "
                        f"{groups * have} or keep more query groups")


def _check_parallel(source: ArchConfig, sizes: dict[str, int], tp: Optional[int], pp: Optional[int]) -> None:
    """TP divisibility as megatron needs it; PP needs a layer per stage (uneven stages are allowed)."""
    if tp is not None:
        try:
            _target_arch(source, sizes).check_parallel(tensor_parallel=tp)
        except ConfigError as error:
            raise PlanError(f"the target cannot load at the named layout: {error}; choose target sizes "
                            f"divisible by {tp} or another tensor-parallel size") from None
    if pp is not None:
        if pp < 1:
            raise PlanError(f"pipeline-parallel size must be >= 1, got {pp}")
        if sizes["num_layers"] < pp:
            raise PlanError(f"target num_layers={sizes['num_layers']} is fewer than the pipeline-parallel size {pp}; "
                            f"every stage needs a layer, so keep at least {pp} layers or use a smaller PP")


def _kept_layers_if_known(source: ArchConfig, target: Target, keep: int) -> list[int]:
    """The kept layers when they do not depend on scores (explicit drop_layers, or no layer dropped)."""
    if target.drop_layers is not None:
        return _keep_all_but(source.num_layers, target.drop_layers)
    return list(range(source.num_layers)) if keep == source.num_layers else []


def check_scores_kind(scores: Scores, source: ArchConfig) -> None:
    """Scores of a dense model for a MoE one (or the reverse): said plainly, before the fingerprint."""
    scored = scores.arch
    if scored.is_moe != source.is_moe:
        kind = {True: "a Mixture-of-Experts model", False: "a dense model"}
        raise PlanError(f"these scores (from {scores.manifest.checkpoint}) were computed on {kind[scored.is_moe]}, but "
                        f"the model to prune is {kind[source.is_moe]}; compute its scores with `minitron importance`")


def _moe_score_shapes(source: ArchConfig) -> dict[str, tuple[int, ...]]:
    if not source.is_moe:
        return {}
    L, E = source.num_layers, source.num_experts
    shapes = {"experts": (L, E), "expert_ffn": (L, E, source.expert_ffn_hidden_size)}
    if source.moe_shared_expert_ffn_hidden_size:
        shapes["shared_ffn"] = (L, source.moe_shared_expert_ffn_hidden_size)
    return shapes


def _check_score_tensors(scores: Scores, source: ArchConfig) -> None:
    """Every score the plan ranks by: present, the source's shape, finite in the layers it ranks (MoE
    scores hold NaN rows for dense layers, and `ffn` for MoE layers, by design)."""
    L = source.num_layers
    moe = torch.tensor(source.moe_layers, dtype=torch.bool)
    expected = {"heads": (L, source.num_attention_heads), "query_groups": (L, source.query_groups),
                "hidden": (source.hidden_size,), "layers_bi": (L,)}
    if not moe.all():
        expected["ffn"] = (L, source.ffn_hidden_size)
    expected.update(_moe_score_shapes(source))
    for key, shape in expected.items():
        if key not in scores:
            raise PlanError(f"the scores lack {key!r}; recompute them with `minitron importance`")
        if tuple(scores[key].shape) != shape:
            raise PlanError(f"scores {key!r} have shape {tuple(scores[key].shape)}, but the source needs {shape}")
        rows = scores[key]
        if key == "ffn":
            rows = rows[~moe]
        elif key in ("experts", "expert_ffn", "shared_ffn"):
            rows = rows[moe]
        if not torch.isfinite(rows).all():
            raise PlanError(f"scores {key!r} hold NaN or infinite values; recompute them")


def _check_layer_scores(scores: Scores, source: ArchConfig, target: Target, sizes: dict[str, int]) -> None:
    removed = source.num_layers - sizes["num_layers"]
    if removed == 0 or target.drop_layers is not None:
        return
    if target.metric == "lm_loss" and "layers_lm_loss" not in scores:
        raise PlanError("layer_metric='lm_loss' needs per-layer LM losses (layers_lm_loss), which these scores "
                        "lack; recompute the scores with them or choose layer_metric='bi'")
    if target.metric == "block":
        block_sizes = list(scores.manifest.block_sizes)
        if "blocks_lm_loss" not in scores or removed not in block_sizes:
            raise PlanError(f"layer_metric='block' removes a block of {removed} layers, but the scores hold block "
                            f"LM losses for block sizes {block_sizes}; recompute the scores with block size "
                            f"{removed} or choose layer_metric='bi' or 'lm_loss'")


# -------------------------------------------------------------------------------------- ranking
def _choose_layers(scores: Scores, source: ArchConfig, target: Target, keep: int) -> tuple[list[int], str]:
    """Kept layers and the name of what chose them."""
    L = source.num_layers
    if target.drop_layers is not None:
        return _keep_all_but(L, target.drop_layers), "drop_layers"
    if keep == L:
        return list(range(L)), "none"
    if target.metric == "bi":
        return top_k(scores["layers_bi"], keep), "bi"
    if target.metric == "lm_loss":
        return top_k(_finite(scores["layers_lm_loss"], "layers_lm_loss"), keep), "lm_loss"
    start = best_block(scores, L - keep)
    return _keep_all_but(L, range(start, start + L - keep)), "block"


def best_block(scores: Scores, size: int) -> int:
    """First layer of the contiguous block of `size` layers whose removal raises the LM loss least
    (ties to the earlier block)."""
    row = scores["blocks_lm_loss"][list(scores.manifest.block_sizes).index(size)]
    losses = _finite(row[: row.shape[0] - size + 1], f"blocks_lm_loss for block size {size}")
    return int(torch.sort(losses.to(torch.float64), stable=True).indices[0])


def _finite(values: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(values).all():
        raise PlanError(f"scores {name} hold NaN or infinite values where a loss is needed; recompute them")
    return values


def _keep_all_but(num_layers: int, dropped) -> list[int]:
    dropped = set(dropped)
    return [layer for layer in range(num_layers) if layer not in dropped]


def _target_arch(source: ArchConfig, sizes: dict[str, int], layers: Optional[list[int]] = None) -> ArchConfig:
    """The pruned architecture: the source with new sizes and the head width written out (it stays); a MoE
    target writes its expert width out too (None would mean ffn_hidden_size, which may change) and keeps
    the MoE pattern of its kept layers (all source layers when `layers` is None)."""
    extra = {}
    if source.is_moe:
        n, moe = sizes["num_layers"], source.moe_layers
        if layers is not None:
            pattern = tuple(int(moe[layer]) for layer in layers)
        elif n == source.num_layers:
            pattern = tuple(map(int, moe))
        else:  # layers not chosen yet (divisibility checks): keep a dense layer if the source has one
            pattern = ((0,) if n > 1 and not all(moe) else (1,)) + (1,) * (n - 1)
        extra["moe_layer_freq"] = pattern
    return source.explicit().replace(**sizes, **extra, kv_channels=source.head_dim)


def _build(source: ArchConfig, sizes: dict[str, int], tensors: dict[str, torch.Tensor], layers: list[int], *,
           head_merge: bool, provenance: dict) -> Plan:
    """Rank every width axis layer by layer and assemble the validated plan."""
    per_source = source.num_attention_heads // source.query_groups
    per_target = sizes["num_attention_heads"] // sizes["num_query_groups"]
    moe = source.moe_layers
    if source.is_moe and not any(moe[layer] for layer in layers):
        raise PlanError(f"the kept layers {list(layers)} hold no MoE layer (the source's are "
                        f"{[i for i, m in enumerate(moe) if m]}); a pruned MoE model keeps at least one: keep more "
                        f"layers or name them with drop_layers")
    ffn, groups, heads = [], [], []
    for layer in layers:
        ffn.append(() if moe[layer] else top_k(tensors["ffn"][layer], sizes["ffn_hidden_size"]))
        groups.append(top_k(tensors["query_groups"][layer], sizes["num_query_groups"]))
        heads.append([g * per_source + h for g in groups[-1]
                      for h in top_k(tensors["heads"][layer, g * per_source:(g + 1) * per_source], per_target)])
    target = _target_arch(source, sizes, layers)
    experts = _rank_experts(source, sizes, tensors, layers) if source.is_moe else {}
    return Plan(source=source, target=target, layers=layers, hidden=top_k(tensors["hidden"], sizes["hidden_size"]),
                ffn=ffn, query_groups=groups, heads=heads, head_merge=head_merge,
                params_before=source.num_parameters(), params_after=target.num_parameters(),
                scores=provenance, **experts).validate()


def _rank_experts(source: ArchConfig, sizes: dict[str, int], tensors: dict[str, torch.Tensor],
                  layers: list[int]) -> dict:
    """Per kept MoE layer: its own best experts, each expert's own best neurons, the shared expert's."""
    experts, expert_ffn, shared_ffn = [], [], []
    for layer in layers:
        if not source.moe_layers[layer]:
            experts.append(())
            expert_ffn.append(())
            shared_ffn.append(())
            continue
        experts.append(top_k(tensors["experts"][layer], sizes["num_experts"]))
        expert_ffn.append([top_k(tensors["expert_ffn"][layer, e], sizes["moe_ffn_hidden_size"]) for e in experts[-1]])
        shared = sizes.get("moe_shared_expert_ffn_hidden_size")
        shared_ffn.append(top_k(tensors["shared_ffn"][layer], shared) if shared else ())
    target = _target_arch(source, sizes, layers)
    return dict(experts=experts, expert_ffn=expert_ffn, shared_ffn=shared_ffn,
                active_params_before=source.num_active_parameters(), active_params_after=target.num_active_parameters())

