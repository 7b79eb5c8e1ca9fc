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
from megatron_minitron.plan.target import SIZE_FLAGS, Target

def make_plan(scores: Union[Scores, str, os.PathLike], target: Target, *, source: Optional[ArchConfig] = None,
              tensor_parallel: Optional[int] = None, pipeline_parallel: Optional[int] = None) -> Plan:
    """The plan that prunes `source` (default: the scored model) to `target` by the scores' ranking.

    `scores` is a Scores value or a scores directory (recorded in the plan's provenance). Every check
    runs before any index is chosen; tensor_parallel / pipeline_parallel name the layout the pruned
    model must load at.
    """
    scores_dir = None
    if not isinstance(scores, Scores):
        scores_dir = str(scores)
        scores = load_scores(scores)
    source = (source or scores.arch).explicit()
    scores.check_belongs_to(source, what="the model to prune")
    _check_score_tensors(scores, source)
    sizes = check_target(source, target, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel)
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
                pipeline_parallel: Optional[int] = None) -> Plan:
    """The paper's random baseline: a random ranking on every axis, the same for the same seed.

    Explicit drop_layers are honoured; otherwise the layers are random too (layer_metric is ignored).
    """
    source = arch.explicit()
    sizes = check_target(source, target, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel)
    generator = torch.Generator().manual_seed(seed)
    L = source.num_layers
    shapes = {"heads": (L, source.num_attention_heads), "query_groups": (L, source.query_groups),
              "ffn": (L, source.ffn_hidden_size), "hidden": (source.hidden_size,), "layers_bi": (L,)}
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
                 pipeline_parallel: Optional[int] = None) -> dict[str, int]:
    """The resolved target sizes, after refusing every target that cannot be pruned to (field + fix named)."""
    _check_drop_layers(source, target)
    sizes = target.resolve(source)
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


def _check_score_tensors(scores: Scores, source: ArchConfig) -> None:
    L = source.num_layers
    expected = {"heads": (L, source.num_attention_heads), "query_groups": (L, source.query_groups),
                "ffn": (L, source.ffn_hidden_size), "hidden": (source.hidden_size,), "layers_bi": (L,)}
    for key, shape in expected.items():
        if key not in scores:
            raise PlanError(f"the scores lack {key!r}; recompute them with `minitron importance`")
        if tuple(scores[key].shape) != shape:
            raise PlanError(f"scores {key!r} have shape {tuple(scores[key].shape)}, but the source needs {shape}")
        if not torch.isfinite(scores[key]).all():
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


def _target_arch(source: ArchConfig, sizes: dict[str, int]) -> ArchConfig:
    """The pruned architecture: the source with new sizes and the head width written out (it stays)."""
    return source.explicit().replace(**sizes, kv_channels=source.head_dim)


def _build(source: ArchConfig, sizes: dict[str, int], tensors: dict[str, torch.Tensor], layers: list[int], *,
           head_merge: bool, provenance: dict) -> Plan:
    """Rank every width axis layer by layer and assemble the validated plan."""
    per_source = source.num_attention_heads // source.query_groups
    per_target = sizes["num_attention_heads"] // sizes["num_query_groups"]
    ffn, groups, heads = [], [], []
    for layer in layers:
        ffn.append(top_k(tensors["ffn"][layer], sizes["ffn_hidden_size"]))
        groups.append(top_k(tensors["query_groups"][layer], sizes["num_query_groups"]))
        heads.append([g * per_source + h for g in groups[-1]
                      for h in top_k(tensors["heads"][layer, g * per_source:(g + 1) * per_source], per_target)])
    target = _target_arch(source, sizes)
    return Plan(source=source, target=target, layers=layers, hidden=top_k(tensors["hidden"], sizes["hidden_size"]),
                ffn=ffn, query_groups=groups, heads=heads, head_merge=head_merge,
                params_before=source.num_parameters(), params_after=target.num_parameters(),
                scores=provenance).validate()

