"""How Hugging Face tensors fuse into one megatron-core checkpoint tensor, and back.

A rule maps the HF tensors of one layer (q, k, v; gate, up; or just one) to the megatron tensor of
that layer and inverts it exactly: every rule is a permutation, concatenation or transpose, so an
import followed by an export gives back bit-identical tensors. Shapes go the same way: from the
megatron shape an architecture implies, `hf_shapes` gives the shapes the HF files must hold, which
is how an import checks every tensor before writing anything.

Megatron facts used (DESIGN.md §2, §2b): `linear_qkv` rows are group-major — per query group its
heads' query rows, then its key rows, then its value rows (HF query head h belongs to kv head
h // (heads/groups), the same order); GLU `linear_fc1` is [all gate rows; all up rows]; GPT-2's
Conv1D stores [in, out] and its `c_attn` is [q | k | v] over all heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_minitron.config import ArchConfig

Shape = tuple[int, ...]


class Rule:
    """One megatron tensor (one layer of it) <-> a fixed number of HF tensors."""

    parts = 1

    def hf_shapes(self, shape: Shape, arch: ArchConfig) -> list[Shape]:
        """Shapes of the HF tensors that make a megatron tensor of this shape."""
        raise NotImplementedError

    def to_megatron(self, parts: list[torch.Tensor], arch: ArchConfig) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor, arch: ArchConfig) -> list[torch.Tensor]:
        raise NotImplementedError

    def row_blocks(self, parts: list[torch.Tensor], arch: ArchConfig) -> list[tuple[int, torch.Tensor]]:
        """The megatron tensor as (first row, block) pieces; the importer writes each as its own chunk,
        which saves a copy where the HF tensors already are whole row ranges of it."""
        return [(0, self.to_megatron(parts, arch))]

    def hf_row_ranges(self, rows: int) -> Optional[list[tuple[int, int]]]:
        """When each HF tensor is one row range of the megatron tensor (of `rows` rows), those ranges
        in to_hf's order: the exporter then reads each range on its own instead of the whole tensor."""
        return None


class Copy(Rule):
    """The same tensor under another name."""

    def hf_shapes(self, shape, arch):
        return [shape]

    def to_megatron(self, parts, arch):
        return parts[0]

    def to_hf(self, tensor, arch):
        return [tensor]

    def hf_row_ranges(self, rows):
        return [(0, rows)]


class Vocab(Copy):
    """Embedding or output rows: megatron pads the vocabulary (to a multiple of 128 x TP); HF holds
    exactly vocab_size rows. The importer writes the padding as a separate zero chunk and the exporter
    reads only the first vocab_size rows, so the rule itself is a copy of the real rows."""

    def hf_shapes(self, shape, arch):
        return [(arch.vocab_size,) + tuple(shape[1:])]


@dataclass(frozen=True)
class Transposed(Rule):
    """An inner rule whose HF tensors are stored transposed (GPT-2's Conv1D: [in, out])."""

    inner: Rule

    @property
    def parts(self):  # type: ignore[override]
        return self.inner.parts

    def hf_shapes(self, shape, arch):
        return [tuple(reversed(s)) for s in self.inner.hf_shapes(shape, arch)]

    def to_megatron(self, parts, arch):
        return self.inner.to_megatron([p.t() for p in parts], arch)

    def to_hf(self, tensor, arch):
        return [p.t().contiguous() for p in self.inner.to_hf(tensor, arch)]


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ArchConfig) -> torch.Tensor:
    g, kv = arch.query_groups, arch.head_dim
    n = arch.num_attention_heads // g
    rest = tuple(q.shape[1:])
    rows = torch.cat([q.reshape(g, n, kv, *rest), k.reshape(g, 1, kv, *rest), v.reshape(g, 1, kv, *rest)], dim=1)
    return rows.reshape(g * (n + 2) * kv, *rest)


def _ungrouped(t: torch.Tensor, arch: ArchConfig) -> list[torch.Tensor]:
    g, kv = arch.query_groups, arch.head_dim
    n = arch.num_attention_heads // g
    rest = tuple(t.shape[1:])
    t = t.reshape(g, n + 2, kv, *rest)
    return [t[:, :n].reshape(g * n * kv, *rest).contiguous(), t[:, n].reshape(g * kv, *rest).contiguous(),
            t[:, n + 1].reshape(g * kv, *rest).contiguous()]


class QKV(Rule):
    """Separate q, k, v projections (weights [rows, hidden] or biases [rows]) <-> group-major rows."""

    parts = 3

    def hf_shapes(self, shape, arch):
        rest = tuple(shape[1:])
        q_rows = arch.num_attention_heads * arch.head_dim
        kv_rows = arch.query_groups * arch.head_dim
        return [(q_rows,) + rest, (kv_rows,) + rest, (kv_rows,) + rest]

    def to_megatron(self, parts, arch):
        return _grouped(*parts, arch)

    def to_hf(self, tensor, arch):
        return _ungrouped(tensor, arch)


class FusedQKV(Rule):
    """One [q | k | v] tensor over all heads (GPT-2's c_attn, after the Conv1D transpose) <-> group-major."""

    def hf_shapes(self, shape, arch):
        return [tuple(shape)]

    def to_megatron(self, parts, arch):
        q_rows = arch.num_attention_heads * arch.head_dim
        kv_rows = arch.query_groups * arch.head_dim
        q, k, v = parts[0].split([q_rows, kv_rows, kv_rows])
        return _grouped(q, k, v, arch)

    def to_hf(self, tensor, arch):
        return [torch.cat(_ungrouped(tensor, arch))]


class GateUp(Rule):
    """SwiGLU's gate and up projections <-> megatron's fc1 = [gate; up]."""

    parts = 2

    def hf_shapes(self, shape, arch):
        half = (shape[0] // 2,) + tuple(shape[1:])
        return [half, half]

    def to_megatron(self, parts, arch):
        return torch.cat(parts)

    def to_hf(self, tensor, arch):
        return [half.contiguous() for half in tensor.chunk(2)]

    def row_blocks(self, parts, arch):
        return [(0, parts[0]), (parts[0].shape[0], parts[1])]  # megatron stores GLU fc1 halves this way too

    def hf_row_ranges(self, rows):
        return [(0, rows // 2), (rows // 2, rows)]


COPY, VOCAB, QKV_SPLIT, QKV_FUSED, GATE_UP = Copy(), Vocab(), QKV(), FusedQKV(), GateUp()


def megatron_shape(key: str, arch: ArchConfig) -> Shape:
    """Global shape of one checkpoint tensor (of one layer, for `decoder.layers.*` keys)."""
    h, kv = arch.hidden_size, arch.head_dim
    qkv_rows = (arch.num_attention_heads + 2 * arch.query_groups) * kv
    fc1_rows = arch.ffn_hidden_size * (2 if arch.gated else 1)
    shapes = {
        "embedding.word_embeddings.weight": (arch.padded_vocab, h),
        "embedding.position_embeddings.weight": (arch.max_position_embeddings, h),
        "output_layer.weight": (arch.padded_vocab, h),
        "decoder.final_layernorm.weight": (h,),
        "decoder.final_layernorm.bias": (h,),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (h,),
        "decoder.layers.self_attention.linear_qkv.layer_norm_bias": (h,),
        "decoder.layers.self_attention.linear_qkv.weight": (qkv_rows, h),
        "decoder.layers.self_attention.linear_qkv.bias": (qkv_rows,),
        "decoder.layers.self_attention.q_layernorm.weight": (kv,),
        "decoder.layers.self_attention.k_layernorm.weight": (kv,),
        "decoder.layers.self_attention.linear_proj.weight": (h, arch.num_attention_heads * kv),
        "decoder.layers.self_attention.linear_proj.bias": (h,),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (h,),
        "decoder.layers.mlp.linear_fc1.layer_norm_bias": (h,),
        "decoder.layers.mlp.linear_fc1.weight": (fc1_rows, h),
        "decoder.layers.mlp.linear_fc1.bias": (fc1_rows,),
        "decoder.layers.mlp.linear_fc2.weight": (h, arch.ffn_hidden_size),
        "decoder.layers.mlp.linear_fc2.bias": (h,),
    }
    if arch.is_moe:  # experts: [experts, rows, cols] per layer (DESIGN §2c)
        e, f = arch.num_experts, arch.expert_ffn_hidden_size
        shapes["decoder.layers.mlp.router.weight"] = (e, h)
        shapes["decoder.layers.mlp.experts.experts.linear_fc1.weight"] = (e, f * (2 if arch.gated else 1), h)
        shapes["decoder.layers.mlp.experts.experts.linear_fc2.weight"] = (e, h, f)
    return shapes[key]


EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
"""Layer modules whose `_extra_state` object every dense checkpoint holds (one per layer; None for the local
spec, Transformer Engine's FP8 metadata on GPU)."""

EXPERT_EXTRA_STATE_MODULES = ("mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2")
"""The same for the routed experts of an all-MoE stack: one object per layer and expert."""


def extra_state_keys(arch: ArchConfig) -> list[str]:
    """Keys of every `_extra_state` object megatron-core 0.16.1 saves for a (local-spec) model of this
    architecture: `shard_{layer}_{layers}`, and `shard_{layer}.{expert}_{layers}.{experts}` for experts."""
    layers = arch.num_layers
    if not arch.is_moe:
        return [f"decoder.layers.{m}._extra_state/shard_{i}_{layers}" for m in EXTRA_STATE_MODULES
                for i in range(layers)]
    keys = [f"decoder.layers.{m}._extra_state/shard_{i}_{layers}" for m in EXTRA_STATE_MODULES[:2]
            for i in range(layers)]
    return keys + [f"decoder.layers.{m}._extra_state/shard_{i}.{e}_{layers}.{arch.num_experts}"
                   for m in EXPERT_EXTRA_STATE_MODULES for i in range(layers) for e in range(arch.num_experts)]
