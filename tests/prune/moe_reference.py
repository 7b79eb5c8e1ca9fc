"""An independent slicing of a MoE checkpoint's global tensors by a plan (for plans that keep every head):
plain indexing per stored key, [gate; up] halves by chunk(2), the expert axis by indexing the kept experts
one by one. Used by test_moe_prune.py and the 4-rank EP2xTP2 check."""

from __future__ import annotations

import torch

PREFIX = "decoder.layers."


def _glu(w: torch.Tensor, rows) -> torch.Tensor:
    gate, up = w.chunk(2)
    return torch.cat([gate[rows], up[rows]])


def _layer(suffix: str, w: torch.Tensor, plan, j: int, hid: torch.Tensor) -> torch.Tensor:
    experts = list(plan.experts[j]) if plan.experts else []
    if suffix.endswith(("layer_norm_weight", "layer_norm_bias")):
        return w[hid]
    if suffix == "self_attention.linear_qkv.weight":
        return w[:, hid]
    if suffix == "self_attention.linear_proj.weight":
        return w[hid]
    if suffix in ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"):
        return w
    if suffix == "mlp.linear_fc1.weight":
        return _glu(w, list(plan.ffn[j]))[:, hid]
    if suffix == "mlp.linear_fc2.weight":
        return w[hid][:, list(plan.ffn[j])]
    if suffix == "mlp.router.weight":
        return w[experts][:, hid]
    if suffix == "mlp.experts.experts.linear_fc1.weight":
        return torch.stack([_glu(w[e], list(n))[:, hid] for e, n in zip(experts, plan.expert_ffn[j])])
    if suffix == "mlp.experts.experts.linear_fc2.weight":
        return torch.stack([w[e][hid][:, list(n)] for e, n in zip(experts, plan.expert_ffn[j])])
    if suffix == "mlp.shared_experts.linear_fc1.weight":
        return _glu(w, list(plan.shared_ffn[j]))[:, hid]
    if suffix == "mlp.shared_experts.linear_fc2.weight":
        return w[hid][:, list(plan.shared_ffn[j])]
    raise AssertionError(f"the reference does not know {suffix}")


def sliced(src: dict[str, torch.Tensor], plan) -> dict[str, torch.Tensor]:
    """Every stored tensor of the pruned checkpoint, from the source's global tensors."""
    s = plan.source
    assert all(h == tuple(range(s.num_attention_heads)) for h in plan.heads), "the reference keeps every head"
    hid = torch.tensor(plan.hidden)
    new_of = {i: j for j, i in enumerate(plan.layers)}
    # megatron keys a stack mixing dense and MoE layers per layer, an all-MoE one stacked
    restack = not all(s.moe_layers) and all(plan.target.moe_layers)
    out, per_layer = {}, {}
    for key, w in src.items():
        if not key.startswith(PREFIX):
            out[key] = w[hid] if key.startswith("decoder.final_layernorm") else w[:, hid]
            continue
        head, _, rest = key[len(PREFIX):].partition(".")
        if head.isdigit():  # per-layer keys
            if int(head) in new_of:
                j = new_of[int(head)]
                per_layer.setdefault(rest, {})[j] = _layer(rest, w, plan, j, hid)
        else:
            suffix = key[len(PREFIX):]
            out[key] = torch.stack([_layer(suffix, w[i], plan, j, hid) for j, i in enumerate(plan.layers)])
    for rest, layers in per_layer.items():
        if restack:
            out[PREFIX + rest] = torch.stack([layers[j] for j in range(len(plan.layers))])
        else:
            out.update({f"{PREFIX}{j}.{rest}": w for j, w in layers.items()})
    return out
