"""Architecture of a GPT-family model: one frozen dataclass, its parameter count and presets.

`ArchConfig` is the single description of a model that every checkpoint written by this project
carries (see `model/checkpoint.py`). It converts to megatron-core's `TransformerConfig` in
`model/build.py`; nothing here imports megatron, so plans and parameter counts run anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu", "squared_relu", "relu")
POSITION_EMBEDDINGS = ("rope", "learned_absolute", "none")
ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")
# Mixture-of-Experts fields: a dense model keeps them at their defaults and leaves them out of its
# fingerprint, so the fingerprints of dense models (stored in scores and plans) did not change when
# they were added.
MOE_FIELDS = ("num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_ffn_hidden_size",
              "moe_router_score_function", "moe_router_pre_softmax", "moe_layer_freq")


LATER_FIELDS = ("qk_layernorm",)
"""ArchConfig fields added after fingerprints were first written to disk (see ArchConfig.fingerprint)."""


class ConfigError(ValueError):
    """An architecture or run option that cannot work, with the field named in the message."""


@dataclass(frozen=True, kw_only=True)
class ArchConfig:
    """A decoder-only GPT-family transformer, exactly as megatron-core builds it."""

    num_layers: int
    """Number of transformer layers."""

    hidden_size: int
    """Width of the residual stream (embedding size)."""

    ffn_hidden_size: int
    """Width of the MLP's intermediate activation (per branch for SwiGLU: fc1 has 2x this many rows)."""

    num_attention_heads: int
    """Number of query heads."""

    num_query_groups: Optional[int] = None
    """Number of key/value heads (GQA groups). None means multi-head attention (= num_attention_heads)."""

    kv_channels: Optional[int] = None
    """Width of one attention head. None means hidden_size // num_attention_heads. Pruned models store
    it explicitly, because pruning heads or hidden channels breaks that identity."""

    vocab_size: int
    """Number of token ids the tokenizer produces."""

    padded_vocab_size: Optional[int] = None
    """Rows of the embedding and output matrices. None means vocab_size rounded up to a multiple of
    make_vocab_size_divisible_by. Must be divisible by the tensor-parallel size used to load the model."""

    make_vocab_size_divisible_by: int = 128
    """Padding granularity of the vocabulary when padded_vocab_size is not given."""

    max_position_embeddings: int = 4096
    """Longest sequence the model accepts (size of the learned position table, or RoPE's limit)."""

    normalization: str = "RMSNorm"
    """Normalization layer: "LayerNorm" or "RMSNorm"."""

    norm_epsilon: float = 1e-5
    """Epsilon of every normalization layer."""

    apply_layernorm_1p: bool = False
    """Zero-centred gamma: the norm multiplies by (1 + weight) and weight starts at zero (Nemotron)."""

    activation: str = "swiglu"
    """MLP activation: "swiglu" (gated SiLU, fc1 holds [gate; up]), "gelu" (exact, erf), "gelu_tanh" (the
    tanh approximation: GPT-2's gelu_new, Megatron-LM's --openai-gelu), "squared_relu" or "relu"."""

    position_embedding_type: str = "rope"
    """"rope", "learned_absolute" or "none"."""

    rotary_base: int = 10000
    """RoPE base (theta)."""

    rotary_percent: float = 1.0
    """Fraction of each head's channels that RoPE rotates (Nemotron-4 uses 0.5)."""

    rope_scaling_factor: Optional[float] = None
    """Llama-3.1-style RoPE frequency scaling factor; None disables scaling. megatron-core hard-codes
    the Llama-3.1 low/high factors (1, 4) and original length (8192) for this scaling, which Llama 3.1 (factor 8)
    and Llama 3.2 (factor 32) both use; other low/high/original values cannot be expressed (import refuses them)."""

    untie_embeddings_and_output_weights: bool = True
    """True: the output layer has its own weights. False: it reuses the word embeddings."""

    add_bias_linear: bool = False
    """Biases on every linear layer (QKV, attention output, fc1, fc2)."""

    add_qkv_bias: bool = False
    """Bias on the QKV projection only (Qwen2 style); implied by add_bias_linear."""

    qk_layernorm: bool = False
    """Normalise every query and key head before RoPE (Qwen3): one norm of the `normalization` kind for
    queries and one for keys, each with weights [kv_channels] (and a bias for LayerNorm) shared by all
    heads of the layer; checkpoint keys `decoder.layers.self_attention.q_layernorm.weight` and
    `k_layernorm.weight`. Pruning heads or groups leaves them as they are."""

    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation of a model trained from scratch."""

    # ---------------------------------------------------------------------- mixture of experts
    num_experts: Optional[int] = None
    """Routed experts in each MoE layer (megatron's num_moe_experts). None: a dense model, and every
    other moe_* field must keep its default."""

    moe_router_topk: int = 2
    """Experts each token is routed to (top-k); at most num_experts."""

    moe_ffn_hidden_size: Optional[int] = None
    """Intermediate width of one routed expert's MLP (per branch for SwiGLU). None means
    ffn_hidden_size. Dense layers of a mixed model keep ffn_hidden_size."""

    moe_shared_expert_ffn_hidden_size: Optional[int] = None
    """Intermediate width of the shared expert that every token passes through besides its routed
    experts (megatron's moe_shared_expert_intermediate_size; DeepSeek, Qwen2-MoE). None: no shared expert."""

    moe_router_score_function: str = "softmax"
    """How router logits become scores: "softmax" (Mixtral, Qwen3-MoE) or "sigmoid" (DeepSeek-V3). With
    sigmoid, megatron-core always renormalises the top-k scores to sum to 1 (when top-k > 1)."""

    moe_router_pre_softmax: bool = False
    """Softmax routing only. False: top-k of the logits, then softmax over those k, so each token's k
    probabilities are renormalised to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob=True). True: softmax
    over all experts, then top-k, not renormalised (Qwen2-MoE's norm_topk_prob=False)."""

    moe_layer_freq: int | tuple[int, ...] = 1
    """Which layers are MoE, as megatron's moe_layer_freq: an integer k makes layer i MoE when i % k == 0
    (1: every layer); a tuple of num_layers 0/1 flags gives the pattern layer by layer (1 = MoE, 0 = dense
    MLP of ffn_hidden_size). JSON lists are read as tuples; a pattern that is every k-th layer is stored
    as k, so one model has one form."""

    def __post_init__(self) -> None:
        if isinstance(self.moe_layer_freq, (list, tuple)):
            pattern = tuple(self.moe_layer_freq)
            if len(pattern) == self.num_layers:  # else validate() names the wrong length
                pattern = _canonical_layer_freq(pattern)
            object.__setattr__(self, "moe_layer_freq", pattern)
        self.validate()

    # ----------------------------------------------------------------------------- derived sizes
    @property
    def query_groups(self) -> int:
        """Number of key/value heads actually used."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and output matrices."""
        if self.padded_vocab_size is not None:
            return self.padded_vocab_size
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m

    @property
    def gated(self) -> bool:
        """Whether fc1 holds two branches (gate and up)."""
        return self.activation == "swiglu"

    @property
    def has_norm_bias(self) -> bool:
        """LayerNorm has a bias; RMSNorm does not."""
        return self.normalization == "LayerNorm"

    @property
    def is_moe(self) -> bool:
        """Whether the model has Mixture-of-Experts layers."""
        return self.num_experts is not None

    @property
    def expert_ffn_hidden_size(self) -> int:
        """Intermediate width of one routed expert."""
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def moe_layers(self) -> tuple[bool, ...]:
        """For each layer, whether it is a MoE layer (all False for a dense model)."""
        if not self.is_moe:
            return (False,) * self.num_layers
        if isinstance(self.moe_layer_freq, int):
            return tuple(i % self.moe_layer_freq == 0 for i in range(self.num_layers))
        return tuple(bool(flag) for flag in self.moe_layer_freq)

    @property
    def moe_topk_renormalized(self) -> bool:
        """Whether each token's top-k routing probabilities sum to 1 (see moe_router_pre_softmax)."""
        if self.moe_router_score_function == "sigmoid":
            return self.moe_router_topk > 1
        return not self.moe_router_pre_softmax

    # ------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot describe a real model."""
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                     "max_position_embeddings", "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_query_groups", "kv_channels", "padded_vocab_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if self.num_attention_heads % self.query_groups:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                              f"num_query_groups={self.query_groups}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                              f"{self.num_attention_heads}; set kv_channels explicitly")
        if self.padded_vocab < self.vocab_size:
            raise ConfigError(f"padded_vocab_size={self.padded_vocab} is smaller than vocab_size={self.vocab_size}")
        _check_choice("normalization", self.normalization, NORMALIZATIONS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDINGS)
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError(f"rotary_percent must be in (0, 1], got {self.rotary_percent}")
        if self.apply_layernorm_1p and self.normalization != "LayerNorm":
            raise ConfigError("apply_layernorm_1p needs normalization='LayerNorm'")
        if self.norm_epsilon <= 0:
            raise ConfigError(f"norm_epsilon must be positive, got {self.norm_epsilon}")
        self._validate_moe()

    def _validate_moe(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in MOE_FIELDS}
        if self.num_experts is None:
            changed = [name for name, default in defaults.items() if getattr(self, name) != default]
            if changed:
                raise ConfigError(f"{changed[0]}={getattr(self, changed[0])!r} is a Mixture-of-Experts field, but "
                                  f"num_experts is None (a dense model); set num_experts or drop {changed[0]}")
            return
        for name in ("num_experts", "moe_router_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_ffn_hidden_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if self.moe_router_topk > self.num_experts:
            raise ConfigError(f"moe_router_topk={self.moe_router_topk} is larger than num_experts={self.num_experts}: "
                              f"a token cannot be routed to more experts than there are")
        _check_choice("moe_router_score_function", self.moe_router_score_function, ROUTER_SCORE_FUNCTIONS)
        if self.moe_router_pre_softmax and self.moe_router_score_function != "softmax":
            raise ConfigError("moe_router_pre_softmax=True applies to moe_router_score_function='softmax' only")
        if self.moe_router_topk == 1 and self.moe_router_score_function == "softmax" and not self.moe_router_pre_softmax:
            raise ConfigError("moe_router_topk=1 with softmax routing needs moe_router_pre_softmax=True (a softmax "
                              "over the single chosen logit is 1 and gives the router no gradient)")
        freq = self.moe_layer_freq
        if isinstance(freq, tuple):
            if len(freq) != self.num_layers or any(flag not in (0, 1) or isinstance(flag, bool) for flag in freq):
                raise ConfigError(f"moe_layer_freq={list(freq)} must hold num_layers={self.num_layers} flags, each "
                                  f"0 (dense) or 1 (MoE)")
            if not any(freq):
                raise ConfigError("moe_layer_freq has no MoE layer (no 1); a dense model has num_experts=None")
        elif not isinstance(freq, int) or isinstance(freq, bool) or freq <= 0:
            raise ConfigError(f"moe_layer_freq must be a positive integer or a list of 0/1 per layer, got {freq!r}")
        if self.add_bias_linear:
            raise ConfigError("add_bias_linear=True with num_experts: megatron-core's experts carry no biases "
                              "(grouped GEMM); use add_bias_linear=False for a MoE model")

    def check_parallel(self, *, tensor_parallel: int = 1, pipeline_parallel: int = 1, expert_parallel: int = 1,
                       first_stage_layers: Optional[int] = None, last_stage_layers: Optional[int] = None) -> None:
        """Raise ConfigError if this model cannot be split over the given tensor/pipeline/expert sizes.
        Experts are split over tensor-parallel ranks too (megatron's expert TP = TP)."""
        tp, pp, ep = tensor_parallel, pipeline_parallel, expert_parallel
        if tp < 1 or pp < 1 or ep < 1:
            raise ConfigError(f"tensor/pipeline/expert parallel sizes must be >= 1, got TP={tp}, PP={pp}, EP={ep}")
        sizes = [("num_attention_heads", self.num_attention_heads), ("num_query_groups", self.query_groups),
                 ("padded_vocab_size", self.padded_vocab)]
        if not all(self.moe_layers):
            sizes.append(("ffn_hidden_size", self.ffn_hidden_size))
        if self.is_moe:
            sizes.append(("moe_ffn_hidden_size", self.expert_ffn_hidden_size))
            if self.moe_shared_expert_ffn_hidden_size is not None:
                sizes.append(("moe_shared_expert_ffn_hidden_size", self.moe_shared_expert_ffn_hidden_size))
        for name, value in sizes:
            if value % tp:
                raise ConfigError(f"tensor-parallel size {tp} does not divide {name}={value}")
        if ep > 1 and not self.is_moe:
            raise ConfigError(f"expert-parallel size {ep} needs a Mixture-of-Experts model; this one is dense "
                              f"(num_experts is None): use --ep 1")
        if self.is_moe and self.num_experts % ep:
            raise ConfigError(f"expert-parallel size {ep} does not divide num_experts={self.num_experts}")
        stage_layers(self.num_layers, pp, first_stage_layers, last_stage_layers)

    # ---------------------------------------------------------------------------- parameter count
    def num_parameters(self, *, include_embeddings: bool = True) -> int:
        """Exact number of parameters of the model megatron-core builds (padded vocabulary included)."""
        return self._count(include_embeddings=include_embeddings, active=False)

    def num_active_parameters(self, *, include_embeddings: bool = True) -> int:
        """Parameters one token passes through: as num_parameters, but each MoE layer counts only
        moe_router_topk of its routed experts (plus its router and shared expert). Equal to
        num_parameters for a dense model."""
        return self._count(include_embeddings=include_embeddings, active=True)

    def _mlp_parameters(self, width: int) -> int:
        fc1_rows = width * (2 if self.gated else 1)
        return self.hidden_size * fc1_rows + width * self.hidden_size + (
            (fc1_rows + self.hidden_size) if self.add_bias_linear else 0)

    def _moe_parameters(self, *, active: bool) -> int:
        experts = self.moe_router_topk if active else self.num_experts
        shared = self.moe_shared_expert_ffn_hidden_size
        return (self.num_experts * self.hidden_size  # router
                + experts * self._mlp_parameters(self.expert_ffn_hidden_size)
                + (self._mlp_parameters(shared) if shared else 0))

    def _count(self, *, include_embeddings: bool, active: bool) -> int:
        h, kv = self.hidden_size, self.head_dim
        norm = h * (2 if self.has_norm_bias else 1)
        qk_norms = 2 * kv * (2 if self.has_norm_bias else 1) if self.qk_layernorm else 0
        qkv_rows = kv * (self.num_attention_heads + 2 * self.query_groups)
        attn = h * qkv_rows + self.num_attention_heads * kv * h + qk_norms
        if self.add_bias_linear or self.add_qkv_bias:
            attn += qkv_rows
        if self.add_bias_linear:
            attn += h
        moe_layers = sum(self.moe_layers)
        mlps = (self.num_layers - moe_layers) * self._mlp_parameters(self.ffn_hidden_size)
        if moe_layers:
            mlps += moe_layers * self._moe_parameters(active=active)
        total = self.num_layers * (2 * norm + attn) + mlps + norm  # + final norm
        if include_embeddings:
            total += self.padded_vocab * h
            if self.position_embedding_type == "learned_absolute":
                total += self.max_position_embeddings * h
            if self.untie_embeddings_and_output_weights:
                total += self.padded_vocab * h
        return total

    # ------------------------------------------------------------------------------ serialisation
    def to_json(self) -> dict[str, Any]:
        """Plain dict with every field (round-trips through from_json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ArchConfig":
        """Inverse of to_json; unknown keys are an error naming them."""
        unknown = unknown_fields(cls, data)
        if unknown:
            known = sorted(f.name for f in dataclasses.fields(cls))
            raise ConfigError(f"unknown architecture fields {unknown}; known fields: {known}")
        return cls(**data)

    def fingerprint(self) -> str:
        """Short stable hash of the architecture (identifies which model scores and plans belong to).
        Fields added after the first release are left out while at their default (the MoE fields for every
        dense model), so scores and plans written before they existed keep matching their checkpoints."""
        later = LATER_FIELDS + (() if self.is_moe else MOE_FIELDS)
        data = {k: v for k, v in self.to_json().items()
                if not (k in later and v == self.__dataclass_fields__[k].default)}
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def explicit(self) -> "ArchConfig":
        """The same model with every derived size written out (query groups, head width, padded
        vocabulary), as checkpoints store it: a pruned model breaks the identities the defaults assume."""
        return self.replace(num_query_groups=self.query_groups, kv_channels=self.head_dim,
                            padded_vocab_size=self.padded_vocab)

    def replace(self, **changes: Any) -> "ArchConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)


def unknown_fields(cls: type, data: dict[str, Any]) -> list[str]:
    """Keys of data that are not fields of the dataclass cls (sorted), for from_json errors."""
    return sorted(set(data) - {f.name for f in dataclasses.fields(cls)})


def _canonical_layer_freq(pattern: tuple) -> int | tuple:
    """A per-layer 0/1 pattern that is "every k-th layer" as the integer k (one model, one form)."""
    for k in range(1, len(pattern) + 1):
        if pattern == tuple(int(i % k == 0) for i in range(len(pattern))):
            return k
    return pattern


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {list(choices)}")


def stage_layers(num_layers: int, pipeline_parallel: int, first: Optional[int] = None,
                 last: Optional[int] = None) -> list[int]:
    """Layers per pipeline stage; uneven first/last stages as megatron-core lays them out.

    Without first/last, layers must divide evenly. With them, the remaining layers are split evenly
    over the middle stages.
    """
    pp = pipeline_parallel
    if pp == 1:
        if first is not None or last is not None:
            raise ConfigError("first/last stage layer counts need pipeline-parallel size > 1")
        return [num_layers]
    if first is None and last is None:
        if num_layers % pp:
            raise ConfigError(f"pipeline-parallel size {pp} does not divide num_layers={num_layers}; give "
                              f"explicit first/last stage layer counts for an uneven layout")
        return [num_layers // pp] * pp
    rest = num_layers - (first or 0) - (last or 0)
    middle = pp - (first is not None) - (last is not None)
    if rest < 0 or (middle == 0 and rest != 0) or (middle and rest % middle):
        raise ConfigError(f"cannot lay out num_layers={num_layers} over {pp} pipeline stages with first stage "
                          f"{first} and last stage {last} layers: the middle stages must split the rest evenly")
    per = rest // middle if middle else 0
    layout = [per] * pp
    if first is not None:
        layout[0] = first
    if last is not None:
        layout[-1] = last
    if min(layout) < 1:
        raise ConfigError(f"pipeline layout {layout} leaves a stage without layers")
    return layout


# ---------------------------------------------------------------------------------------- presets
# Facts from each model's public config.json / paper; parameter counts are checked in tests.
PRESETS: dict[str, ArchConfig] = {
    # meta-llama/Llama-3.1-8B config.json: 8.03B parameters.
    "llama3.1-8b": ArchConfig(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
        kv_channels=128, vocab_size=128256, padded_vocab_size=128256, max_position_embeddings=131072,
        normalization="RMSNorm", norm_epsilon=1e-5, activation="swiglu", position_embedding_type="rope",
        rotary_base=500000, rope_scaling_factor=8.0, untie_embeddings_and_output_weights=True),
    # mistralai/Mistral-Nemo-Base-2407 config.json: head_dim 128 != 5120/32; 12.2B parameters.
    "mistral-nemo-12b": ArchConfig(
        num_layers=40, hidden_size=5120, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
        kv_channels=128, vocab_size=131072, padded_vocab_size=131072, max_position_embeddings=1024000,
        normalization="RMSNorm", norm_epsilon=1e-5, activation="swiglu", position_embedding_type="rope",
        rotary_base=1000000, untie_embeddings_and_output_weights=True),
    # Nemotron-4 15B (arXiv 2402.16819): 3.2B embedding + 12.5B non-embedding parameters.
    "nemotron4-15b": ArchConfig(
        num_layers=32, hidden_size=6144, ffn_hidden_size=24576, num_attention_heads=48, num_query_groups=8,
        kv_channels=128, vocab_size=256000, padded_vocab_size=256000, max_position_embeddings=4096,
        normalization="LayerNorm", apply_layernorm_1p=True, norm_epsilon=1e-5, activation="squared_relu",
        position_embedding_type="rope", rotary_base=10000, rotary_percent=0.5,
        untie_embeddings_and_output_weights=True),
    # --- Dense Hugging Face families of issue 16 (QK norm, Nemotron, Llama 3.2); facts from each config.json.
    # Qwen/Qwen3-8B config.json: head_dim 128, QK norm, untied, rms_norm_eps 1e-6, rope_theta 1e6;
    # 8,190,735,360 parameters (the Hub's safetensors total; model card: 8.2B, 6.95B non-embedding).
    "qwen3-8b": ArchConfig(
        num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32, num_query_groups=8,
        kv_channels=128, vocab_size=151936, padded_vocab_size=151936, max_position_embeddings=40960,
        normalization="RMSNorm", norm_epsilon=1e-6, activation="swiglu", position_embedding_type="rope",
        rotary_base=1000000, qk_layernorm=True, untie_embeddings_and_output_weights=True),
    # nvidia/Minitron-8B-Base config.json (model_type nemotron): LayerNorm1P (= zero-centred gamma) with
    # biases, relu2 MLP without a gate, partial_rotary_factor 0.5, head_dim 128; model card: 8B.
    "minitron-8b": ArchConfig(
        num_layers=32, hidden_size=4096, ffn_hidden_size=16384, num_attention_heads=48, num_query_groups=8,
        kv_channels=128, vocab_size=256000, padded_vocab_size=256000, max_position_embeddings=4096,
        normalization="LayerNorm", apply_layernorm_1p=True, norm_epsilon=1e-5, activation="squared_relu",
        position_embedding_type="rope", rotary_base=10000, rotary_percent=0.5,
        untie_embeddings_and_output_weights=True),
    # meta-llama/Llama-3.2-1B config.json: tied embeddings, llama3 rope scaling factor 32 with low 1 /
    # high 4 / original 8192 (the values megatron-core hard-codes); 1,235,814,400 parameters (Hub total).
    "llama3.2-1b": ArchConfig(
        num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32, num_query_groups=8,
        kv_channels=64, vocab_size=128256, padded_vocab_size=128256, max_position_embeddings=131072,
        normalization="RMSNorm", norm_epsilon=1e-5, activation="swiglu", position_embedding_type="rope",
        rotary_base=500000, rope_scaling_factor=32.0, untie_embeddings_and_output_weights=False),
    # Small CPU models. "tiny" keeps tests fast; "small" (~10M) is the demo teacher.
    "tiny": ArchConfig(
        num_layers=4, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4, num_query_groups=2,
        vocab_size=1000, max_position_embeddings=256, normalization="RMSNorm", activation="swiglu"),
    "small": ArchConfig(
        num_layers=8, hidden_size=256, ffn_hidden_size=768, num_attention_heads=8, num_query_groups=4,
        vocab_size=8192, max_position_embeddings=512, normalization="RMSNorm", activation="swiglu"),
    # ---- Mixture-of-Experts presets ----
    # Qwen/Qwen3-30B-A3B config.json: 48 layers, hidden 2048, 32 heads, 4 kv heads, head_dim 128, 128 experts,
    # top-8, moe_intermediate_size 768, norm_topk_prob true, rms_norm_eps 1e-6, rope_theta 1e6, untied;
    # 30.5B total / 3.3B active; QK layernorm (q_norm/k_norm of head_dim in every layer) as every Qwen3.
    "qwen3-30b-a3b": ArchConfig(
        num_layers=48, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=32, num_query_groups=4,
        kv_channels=128, vocab_size=151936, padded_vocab_size=151936, max_position_embeddings=40960,
        normalization="RMSNorm", norm_epsilon=1e-6, activation="swiglu", position_embedding_type="rope",
        rotary_base=1000000, untie_embeddings_and_output_weights=True, qk_layernorm=True,
        num_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768),
    # mistralai/Mixtral-8x7B-v0.1 config.json: 32 layers, hidden 4096, 32 heads, 8 kv heads, 8 experts, top-2,
    # intermediate 14336, rope_theta 1e6, vocab 32000, untied; 46.7B total / 12.9B active.
    "mixtral-8x7b": ArchConfig(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
        kv_channels=128, vocab_size=32000, padded_vocab_size=32000, max_position_embeddings=32768,
        normalization="RMSNorm", norm_epsilon=1e-5, activation="swiglu", position_embedding_type="rope",
        rotary_base=1000000, untie_embeddings_and_output_weights=True,
        num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=14336),
    # Small CPU MoE models: "tiny-moe" for tests, "small-moe" (~20M total) for CPU runs.
    "tiny-moe": ArchConfig(
        num_layers=4, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4, num_query_groups=2,
        vocab_size=1000, max_position_embeddings=256, normalization="RMSNorm", activation="swiglu",
        num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=64),
    "small-moe": ArchConfig(
        num_layers=8, hidden_size=256, ffn_hidden_size=768, num_attention_heads=8, num_query_groups=4,
        vocab_size=8192, max_position_embeddings=512, normalization="RMSNorm", activation="swiglu",
        num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=256),
}


def preset(name: str, **overrides: Any) -> ArchConfig:
    """A preset architecture, optionally with some fields changed."""
    if name not in PRESETS:
        raise ConfigError(f"unknown architecture preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def load_arch(spec: str) -> ArchConfig:
    """An architecture from a preset name or a JSON file path."""
    if spec in PRESETS:
        return PRESETS[spec]
    try:
        with open(spec, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--arch {spec!r} is neither a preset ({sorted(PRESETS)}) nor an existing JSON file") from None
    except IsADirectoryError:
        raise ConfigError(f"--arch {spec} is a directory; give a preset name or an architecture JSON file") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"--arch {spec} is not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("architecture", data), dict):
        raise ConfigError(f"--arch {spec} holds no JSON object of architecture fields")
    return ArchConfig.from_json(data.get("architecture", data))

