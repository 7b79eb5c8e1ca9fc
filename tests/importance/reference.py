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


def forward(weights: dict[str, torch.Tensor], arch, tokens: torch.Tensor) -> dict:
    """Logits [b, s, vocab] and activations per layer, all float64, from tokens [b, s]."""
    w = {k: v.double() for k, v in weights.items()}
    b, s = tokens.shape
    H, G, kv = arch.num_attention_heads, arch.query_groups, arch.head_dim
    per_group = H // G
    x = w["embedding.word_embeddings.weight"][tokens]
    if arch.position_embedding_type == "learned_absolute":
        x = x + w["embedding.position_embeddings.weight"][:s]
    rec = {"attn_out": [], "fc2_in": [], "fc1_out": [], "norms": [], "layer_in": [], "layer_out": []}
    layer_key = "decoder.layers."
    bias = (lambda key, i: w[key][i] if key in w else 0.0)
    for i in range(arch.num_layers):
        rec["layer_in"].append(x)
        n1 = _norm(x, w[layer_key + "self_attention.linear_qkv.layer_norm_weight"][i],
                   w.get(layer_key + "self_attention.linear_qkv.layer_norm_bias", [None] * 99)[i], arch)
        qkv = n1 @ w[layer_key + "self_attention.linear_qkv.weight"][i].T + bias(
            layer_key + "self_attention.linear_qkv.bias", i)
        qkv = qkv.view(b, s, G, per_group + 2, kv)
        q = qkv[:, :, :, :per_group].reshape(b, s, H, kv).transpose(1, 2)
        k = qkv[:, :, :, per_group].repeat_interleave(per_group, dim=2).transpose(1, 2)
        v = qkv[:, :, :, per_group + 1].repeat_interleave(per_group, dim=2).transpose(1, 2)
        if arch.qk_layernorm:  # one norm over each head's channels, shared by all heads (before RoPE)
            qk = {n: (w[f"{layer_key}self_attention.{n}_layernorm.weight"][i],
                      w.get(f"{layer_key}self_attention.{n}_layernorm.bias", [None] * 99)[i]) for n in "qk"}
            q, k = _norm(q, *qk["q"], arch), _norm(k, *qk["k"], arch)
        if arch.position_embedding_type == "rope":
            q, k = _rope(q, arch.rotary_base), _rope(k, arch.rotary_base)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(kv)
        att = att.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        heads = (att @ v).transpose(1, 2).reshape(b, s, H * kv)
        rec["attn_out"].append(heads)
        x = x + heads @ w[layer_key + "self_attention.linear_proj.weight"][i].T + bias(
            layer_key + "self_attention.linear_proj.bias", i)
        n2 = _norm(x, w[layer_key + "mlp.linear_fc1.layer_norm_weight"][i],
                   w.get(layer_key + "mlp.linear_fc1.layer_norm_bias", [None] * 99)[i], arch)
        rec["norms"] += [n1, n2]
        pre = n2 @ w[layer_key + "mlp.linear_fc1.weight"][i].T + bias(layer_key + "mlp.linear_fc1.bias", i)
        rec["fc1_out"].append(pre)
        if arch.activation == "swiglu":
            gate, up = pre.chunk(2, -1)
            act = F.silu(gate) * up
        else:
            act = {"gelu": F.gelu, "relu": F.relu, "squared_relu": lambda t: F.relu(t).square()}[arch.activation](pre)
        rec["fc2_in"].append(act)
        x = x + act @ w[layer_key + "mlp.linear_fc2.weight"][i].T + bias(layer_key + "mlp.linear_fc2.bias", i)
        rec["layer_out"].append(x)
    final = _norm(x, w["decoder.final_layernorm.weight"], w.get("decoder.final_layernorm.bias"), arch)
    rec["norms"].append(final)
    out_w = w["output_layer.weight"] if "output_layer.weight" in w else w["embedding.word_embeddings.weight"]
    rec["logits"] = final @ out_w.T
    return rec
