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
    the Llama-3.1 low/high factors (1, 4) and original length (8192) for this scaling."""

    untie_embeddings_and_output_weights: bool = True
    """True: the output layer has its own weights. False: it reuses the word embeddings."""

    add_bias_linear: bool = False
    """Biases on every linear layer (QKV, attention output, fc1, fc2)."""

    add_qkv_bias: bool = False
    """Bias on the QKV projection only (Qwen2 style); implied by add_bias_linear."""

    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation of a model trained from scratch."""

    def __post_init__(self) -> None:
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

    def check_parallel(self, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                       first_stage_layers: Optional[int] = None, last_stage_layers: Optional[int] = None) -> None:
        """Raise ConfigError if this model cannot be split over the given tensor/pipeline sizes."""
        tp, pp = tensor_parallel, pipeline_parallel
        if tp < 1 or pp < 1:
            raise ConfigError(f"tensor/pipeline parallel sizes must be >= 1, got TP={tp}, PP={pp}")
        for name, value in (("num_attention_heads", self.num_attention_heads),
                            ("num_query_groups", self.query_groups),
                            ("ffn_hidden_size", self.ffn_hidden_size),
                            ("padded_vocab_size", self.padded_vocab)):
            if value % tp:
                raise ConfigError(f"tensor-parallel size {tp} does not divide {name}={value}")
        stage_layers(self.num_layers, pp, first_stage_layers, last_stage_layers)

    # ---------------------------------------------------------------------------- parameter count
    def num_parameters(self, *, include_embeddings: bool = True) -> int:
        """Exact number of parameters of the model megatron-core builds (padded vocabulary included)."""
        h, ffn, kv = self.hidden_size, self.ffn_hidden_size, self.head_dim
        norm = h * (2 if self.has_norm_bias else 1)
        qkv_rows = kv * (self.num_attention_heads + 2 * self.query_groups)
        attn = h * qkv_rows + self.num_attention_heads * kv * h
        if self.add_bias_linear or self.add_qkv_bias:
            attn += qkv_rows
        if self.add_bias_linear:
            attn += h
        fc1_rows = ffn * (2 if self.gated else 1)
        mlp = h * fc1_rows + ffn * h + ((fc1_rows + h) if self.add_bias_linear else 0)
        total = self.num_layers * (2 * norm + attn + mlp) + norm  # + final norm
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
        """Short stable hash of the architecture (identifies which model scores and plans belong to)."""
        blob = json.dumps(self.to_json(), sort_keys=True).encode()
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
    # Small CPU models. "tiny" keeps tests fast; "small" (~10M) is the demo teacher.
    "tiny": ArchConfig(
        num_layers=4, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4, num_query_groups=2,
        vocab_size=1000, max_position_embeddings=256, normalization="RMSNorm", activation="swiglu"),
    "small": ArchConfig(
        num_layers=8, hidden_size=256, ffn_hidden_size=768, num_attention_heads=8, num_query_groups=4,
        vocab_size=8192, max_position_embeddings=512, normalization="RMSNorm", activation="swiglu"),
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

