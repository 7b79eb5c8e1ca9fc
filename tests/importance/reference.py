"""A plain-torch forward of a GPT checkpoint's global weights that records every activation the
importance scores are defined on. It shares no code with megatron or with importance/hooks.py: it is
the independent second way of computing the scores."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _norm(x, weight, bias, arch):
    gamma = weight + 1 if arch.apply_layernorm_1p else weight
    if arch.normalization == "RMSNorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + arch.norm_epsilon) * gamma
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + arch.norm_epsilon) * gamma + bias


def _rope(t, base):
    """Rotate-half RoPE on t [batch, heads, seq, d]."""
    d, s = t.shape[-1], t.shape[-2]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = torch.outer(torch.arange(s, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], -1)
    half = d // 2
    rotated = torch.cat([-t[..., half:], t[..., :half]], -1)
    return t * angles.cos() + rotated * angles.sin()


class _Layers:
    """Layer i's tensor `name` from stacked checkpoint keys (decoder.layers.NAME [L, ...]) or per-layer
    ones (decoder.layers.i.NAME, megatron's layout for models mixing dense and MoE layers)."""

    def __init__(self, w: dict) -> None:
        self.w = w

    def __contains__(self, key) -> bool:
        name, i = key
        return f"decoder.layers.{name}" in self.w or f"decoder.layers.{i}.{name}" in self.w

    def __getitem__(self, key) -> torch.Tensor:
        name, i = key
        stacked = self.w.get(f"decoder.layers.{name}")
        return stacked[i] if stacked is not None else self.w[f"decoder.layers.{i}.{name}"]


def _activation(arch, pre):
    if arch.activation == "swiglu":
        gate, up = pre.chunk(2, -1)
        return F.silu(gate) * up
    return {"gelu": F.gelu, "relu": F.relu, "squared_relu": lambda t: F.relu(t).square()}[arch.activation](pre)


def _moe(arch, layers: _Layers, i: int, n2, rec) -> torch.Tensor:
    """A MoE layer's MLP on n2 [b, s, h], routing recomputed here: softmax over the top-k logits (or
    top-k of the softmax over all, moe_router_pre_softmax). Records, per expert, its routing
    probability, its activations p * act [b, s, Fe] and output norm p * |out| [b, s] (0 where the
    token is not routed to it), and the shared expert's activations."""
    logits = n2 @ layers["mlp.router.weight", i].T  # [b, s, E]
    if arch.moe_router_pre_softmax:
        probs, top = logits.softmax(-1).topk(arch.moe_router_topk, dim=-1)
    else:
        values, top = logits.topk(arch.moe_router_topk, dim=-1)
        probs = values.softmax(-1)
    routing = torch.zeros_like(logits).scatter(-1, top, probs)  # [b, s, E]
    fc1, fc2 = layers["mlp.experts.experts.linear_fc1.weight", i], layers["mlp.experts.experts.linear_fc2.weight", i]
    out, acts, norms = 0.0, [], []
    for e in range(arch.num_experts):
        p = routing[..., e:e + 1]  # 0 off the top-k, so the expert adds nothing there
        act = p * _activation(arch, n2 @ fc1[e].T)
        y = act @ fc2[e].T
        out = out + y
        acts.append(act)
        norms.append(y.norm(dim=-1))
    rec["router_probs"].append(routing)
    rec["expert_act"].append(torch.stack(acts))  # [E, b, s, Fe]
    rec["expert_out_norm"].append(torch.stack(norms))  # [E, b, s]
    if ("mlp.shared_experts.linear_fc1.weight", i) in layers:
        shared = _activation(arch, n2 @ layers["mlp.shared_experts.linear_fc1.weight", i].T)
        rec["shared_act"].append(shared)
        out = out + shared @ layers["mlp.shared_experts.linear_fc2.weight", i].T
    return out


def forward(weights: dict[str, torch.Tensor], arch, tokens: torch.Tensor, skip: tuple[int, ...] = ()) -> dict:
    """Logits [b, s, vocab] and activations per layer, all float64, from tokens [b, s], the layers in
    `skip` left out (the model built without them). MoE layers
    record None in the dense MLP's lists, and their experts' activations in router_probs, expert_act,
    expert_out_norm, shared_act (one entry per MoE layer)."""
    w = {k: v.double() for k, v in weights.items()}
    b, s = tokens.shape
    H, G, kv = arch.num_attention_heads, arch.query_groups, arch.head_dim
    per_group = H // G
    x = w["embedding.word_embeddings.weight"][tokens]
    if arch.position_embedding_type == "learned_absolute":
        x = x + w["embedding.position_embeddings.weight"][:s]
    rec = {"attn_out": [], "fc2_in": [], "fc1_out": [], "norms": [], "layer_in": [], "layer_out": [],
           "router_probs": [], "expert_act": [], "expert_out_norm": [], "shared_act": []}
    L = _Layers(w)
    bias = (lambda name, i: L[name, i] if (name, i) in L else 0.0)
    norm_bias = (lambda name, i: L[name, i] if (name, i) in L else None)
    moe_layers = arch.moe_layers if arch.is_moe else (False,) * arch.num_layers
    for i in range(arch.num_layers):
        if i in skip:
            continue
        rec["layer_in"].append(x)
        n1 = _norm(x, L["self_attention.linear_qkv.layer_norm_weight", i],
                   norm_bias("self_attention.linear_qkv.layer_norm_bias", i), arch)
        qkv = n1 @ L["self_attention.linear_qkv.weight", i].T + bias("self_attention.linear_qkv.bias", i)
        qkv = qkv.view(b, s, G, per_group + 2, kv)
        q = qkv[:, :, :, :per_group].reshape(b, s, H, kv).transpose(1, 2)
        k = qkv[:, :, :, per_group].repeat_interleave(per_group, dim=2).transpose(1, 2)
        v = qkv[:, :, :, per_group + 1].repeat_interleave(per_group, dim=2).transpose(1, 2)
        if arch.qk_layernorm:  # one norm over each head's channels, shared by all heads (before RoPE)
            qk = {n: (L[f"self_attention.{n}_layernorm.weight", i],
                      norm_bias(f"self_attention.{n}_layernorm.bias", i)) for n in "qk"}
            q, k = _norm(q, *qk["q"], arch), _norm(k, *qk["k"], arch)
        if arch.position_embedding_type == "rope":
            q, k = _rope(q, arch.rotary_base), _rope(k, arch.rotary_base)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(kv)
        att = att.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        heads = (att @ v).transpose(1, 2).reshape(b, s, H * kv)
        rec["attn_out"].append(heads)
        x = x + heads @ L["self_attention.linear_proj.weight", i].T + bias("self_attention.linear_proj.bias", i)
        n2 = _norm(x, L["mlp.linear_fc1.layer_norm_weight", i], norm_bias("mlp.linear_fc1.layer_norm_bias", i), arch)
        rec["norms"] += [n1, n2]
        if moe_layers[i]:
            rec["fc1_out"].append(None)
            rec["fc2_in"].append(None)
            x = x + _moe(arch, L, i, n2, rec)
        else:
            pre = n2 @ L["mlp.linear_fc1.weight", i].T + bias("mlp.linear_fc1.bias", i)
            rec["fc1_out"].append(pre)
            act = _activation(arch, pre)
            rec["fc2_in"].append(act)
            x = x + act @ L["mlp.linear_fc2.weight", i].T + bias("mlp.linear_fc2.bias", i)
        rec["layer_out"].append(x)
    final = _norm(x, w["decoder.final_layernorm.weight"], w.get("decoder.final_layernorm.bias"), arch)
    rec["norms"].append(final)
    out_w = w["output_layer.weight"] if "output_layer.weight" in w else w["embedding.word_embeddings.weight"]
    rec["logits"] = final @ out_w.T
    return rec
