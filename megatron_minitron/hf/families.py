"""One mapping table per Hugging Face model family: config fields, fixed options, tensor names.

Each `Family` says, declaratively:

- `fields`: ArchConfig field <-> config.json key, with the value transformers assumes when the key is
  absent (so an old config reads as transformers reads it);
- `fixed`: the ArchConfig options every model of the family has (norm, activation, positions, biases);
- `requires`: config.json keys that must hold one of the listed values (the first one is what an export
  writes), so an unsupported option (attention bias in Llama, sliding windows, cross-attention)
  fails with an error naming the key instead of importing a different model;
- `tensors`: checkpoint key <-> HF tensor names (`{i}` is the layer, `{e}` a routed expert) and the rule
  (rules.py) that fuses them.

Adding a family is adding a table here. RoPE settings (`rope_theta`, `rope_scaling` or transformers 5's
`rope_parameters`) are shared by the RoPE families and read by `_rope_from_hf`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from megatron_minitron.config import ArchConfig, ConfigError
from megatron_minitron.hf.files import HFError
from megatron_minitron.hf.rules import COPY, GATE_UP, QKV_FUSED, QKV_SPLIT, VOCAB, Rule, Transposed

ABSENT = object()
"""`Field.default` of a key that must be present."""


@dataclass(frozen=True)
class Field:
    """ArchConfig field <-> config.json key."""

    arch: str
    hf: str
    default: Any = ABSENT
    """Value transformers uses when the key is absent or null (a callable gets the config dict)."""
    invert: bool = False
    """Booleans stored negated (untie_embeddings_and_output_weights <-> tie_word_embeddings)."""


@dataclass(frozen=True)
class TensorMap:
    """One checkpoint tensor <-> its HF tensors."""

    megatron: str
    hf: tuple[str, ...]
    rule: Rule = COPY
    when: Optional[Callable[[ArchConfig], bool]] = None
    """Only for architectures where this holds (untied output layer, QKV bias)."""
    experts: bool = False
    """One set of HF tensors per routed expert (`{e}` in their names); the megatron tensor has an expert
    axis after the layer axis ([layers, experts, rows, cols]) and the rule applies to one expert."""

    @property
    def layered(self) -> bool:
        return self.megatron.startswith("decoder.layers.")

    def applies(self, arch: ArchConfig) -> bool:
        return self.when is None or self.when(arch)


@dataclass(frozen=True)
class Family:
    """A Hugging Face model family and how it maps onto megatron-core."""

    model_type: str
    architecture: str
    """The transformers class named in config.json "architectures"."""
    fields: tuple[Field, ...]
    fixed: dict[str, Any]
    requires: dict[str, tuple]
    tensors: tuple[TensorMap, ...]
    rope: bool = True
    partial_rotary: Optional[float] = None
    """The family carries `partial_rotary_factor` (-> rotary_percent): transformers' value when the config has
    none (Nemotron: 0.5). None: whole heads rotate, and any other factor is refused."""
    derived_heads: bool = False
    """The family has no head_dim or GQA setting: head width is hidden/heads and every head has its own k/v."""
    optional_prefix: str = ""
    """A prefix of the table's tensor names that some files lack (GPT-2 saved from GPT2Model rather than
    GPT2LMHeadModel has no "transformer."); import accepts both, export writes it."""
    ignored: tuple[str, ...] = ()
    """Name suffixes of stored tensors that carry no weights (buffers some checkpoints hold)."""
    activation: tuple[str, dict[str, str]] = ("hidden_act", {"silu": "swiglu"})
    """The config key of the MLP activation and its values -> ArchConfig activation."""
    writes: dict[str, Any] = field(default_factory=dict)
    """Extra config.json keys an export writes when it has no source config to start from (token ids then
    come from the checkpoint's tokenizer)."""
    moe: bool = False
    """Every layer is a Mixture-of-Experts layer (the ArchConfig has num_experts); dense families have none."""
    aliases: tuple[str, ...] = ()
    """Other spellings of mapped config.json keys (transformers 5 saves Qwen3-MoE's num_experts as
    num_local_experts): read through the field's default, dropped from an export's config."""

    # ------------------------------------------------------------------------------ config in
    def arch_from_config(self, config: dict, *, pad_to: int = 128) -> ArchConfig:
        """The ArchConfig of an HF config.json of this family; HFError naming the first unsupported key."""
        for key, accepted in self.requires.items():
            value = config.get(key, accepted[0])
            if value not in accepted:
                raise HFError(f"config.json {key}={value!r} is not supported for model_type {self.model_type!r} "
                              f"(supported: {list(accepted)})")
        layer_types = config.get("layer_types") or []
        if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
            raise HFError(f"config.json layer_types={layer_types!r} is not supported for model_type "
                          f"{self.model_type!r}: every layer must be 'full_attention' (no sliding-window layers)")
        values: dict[str, Any] = dict(self.fixed)
        for f in self.fields:
            value = config.get(f.hf)
            if value is None:
                if f.default is ABSENT:
                    raise HFError(f"config.json has no {f.hf!r}, which a {self.model_type} model needs")
                value = f.default(config) if callable(f.default) else f.default
            values[f.arch] = (not value) if f.invert else value
        act_key, act_map = self.activation
        act = config.get(act_key, next(iter(act_map)))
        if act not in act_map:
            raise HFError(f"config.json {act_key}={act!r} is not supported for model_type {self.model_type!r} "
                          f"(supported: {sorted(act_map)})")
        values["activation"] = act_map[act]
        if self.rope:
            values.update(_rope_from_hf(config, self.partial_rotary))
        vocab = values["vocab_size"]
        values["padded_vocab_size"] = -(-vocab // pad_to) * pad_to
        try:
            return ArchConfig(**values)
        except ConfigError as error:
            raise HFError(f"config.json of model_type {self.model_type!r} describes no valid model: {error}") from None
        except TypeError as error:  # a key of the wrong JSON type
            raise HFError(f"config.json of model_type {self.model_type!r} has a value of the wrong type: {error}"
                          ) from None

    # ----------------------------------------------------------------------------- config out
    def check_exportable(self, arch: ArchConfig) -> None:
        """HFError naming the first ArchConfig field this family cannot express."""
        for name, value in self.fixed.items():
            if getattr(arch, name) != value:
                raise HFError(f"a {self.model_type} model has {name}={value!r}; this checkpoint has "
                              f"{name}={getattr(arch, name)!r}")
        if arch.activation not in self.activation[1].values():
            raise HFError(f"a {self.model_type} model has activation in {sorted(set(self.activation[1].values()))}; "
                          f"this checkpoint has activation={arch.activation!r}")
        if arch.is_moe != self.moe:
            raise HFError(f"a {self.model_type} model has {'experts in every layer' if self.moe else 'no experts'}; "
                          f"this checkpoint has num_experts={arch.num_experts} (export it as "
                          f"{'a dense family' if self.moe else 'mixtral or qwen3_moe'})")
        if arch.apply_layernorm_1p and "apply_layernorm_1p" not in self.fixed:
            raise HFError(f"a {self.model_type} model has no zero-centred norm (apply_layernorm_1p=True here)")
        if self.rope and self.partial_rotary is None and arch.rotary_percent != 1.0:
            raise HFError(f"a {self.model_type} model rotates whole heads; this checkpoint has "
                          f"rotary_percent={arch.rotary_percent}")
        if self.derived_heads:
            if arch.head_dim * arch.num_attention_heads != arch.hidden_size:
                raise HFError(f"a {self.model_type} model derives the head width from hidden size / heads; this "
                              f"checkpoint has kv_channels={arch.head_dim} with hidden_size={arch.hidden_size} and "
                              f"{arch.num_attention_heads} heads (export it as another family, or prune heads and "
                              f"hidden size together)")
            if arch.query_groups != arch.num_attention_heads:
                raise HFError(f"a {self.model_type} model has no grouped-query attention; this checkpoint has "
                              f"num_query_groups={arch.query_groups} for {arch.num_attention_heads} heads")

    def config_from_arch(self, arch: ArchConfig, *, base: Optional[dict] = None, dtype: str = "float32") -> dict:
        """config.json for an architecture: the source model's config (when known) with every mapped key
        replaced, so token ids and other unmapped settings survive pruning."""
        self.check_exportable(arch)
        config = dict(base) if base and base.get("model_type") == self.model_type else {}
        for stale in ("rope_parameters", "rope_scaling", "rope_theta", "torch_dtype", "dtype", "head_dim",
                      "transformers_version", "_name_or_path", "layer_types", "partial_rotary_factor") + self.aliases:
            config.pop(stale, None)
        if not config:
            config.update(self.writes)
        config["architectures"] = [self.architecture]
        config["model_type"] = self.model_type
        for key, accepted in self.requires.items():
            if config.get(key, ABSENT) not in accepted:
                config[key] = accepted[0]
        for f in self.fields:
            value = getattr(arch, f.arch)
            config[f.hf] = (not value) if f.invert else value
        act_key, act_map = self.activation
        config[act_key] = next(k for k, v in act_map.items() if v == arch.activation)
        if self.rope:
            # Written in the form transformers 4 and 5 both read (5 turns it into rope_parameters).
            config["rope_theta"] = float(arch.rotary_base)
            config["rope_scaling"] = None if arch.rope_scaling_factor is None else {
                "rope_type": "llama3", "factor": float(arch.rope_scaling_factor), **LLAMA3_FIXED}
            if self.partial_rotary is not None:
                config["partial_rotary_factor"] = float(arch.rotary_percent)
        config["torch_dtype"] = dtype
        return dict(sorted(config.items()))


# ------------------------------------------------------------------------------------------ RoPE
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""The Llama-3 RoPE scaling values megatron-core 0.16.1 hard-codes (GPTModel(rope_scaling=True))."""


def _rope_from_hf(config: dict, partial_default: Optional[float] = None) -> dict[str, Any]:
    """RoPE fields from the top-level keys and/or rope_scaling / rope_parameters. partial_default: the
    family's partial_rotary_factor when absent (None: the family rotates whole heads, 1.0 only)."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise HFError("config.json rope_parameters/rope_scaling must be JSON objects")
    if "rope_type" not in params and any(isinstance(v, dict) for v in params.values()):
        raise HFError("config.json rope_parameters are per layer type; not supported")
    clash = sorted(k for k in set(params) & set(scaling) if params[k] != scaling[k])
    if clash:
        raise HFError(f"config.json rope_scaling and rope_parameters disagree on {clash}; keep one of them")
    merged = {**scaling, **params}
    theta = config.get("rope_theta", merged.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0 or float(theta) != int(theta):
        raise HFError(f"config.json rope_theta={theta!r}: only positive whole-number RoPE bases are supported")
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    out: dict[str, Any] = {"rotary_base": int(theta), "rope_scaling_factor": None}
    top, inner = config.get("partial_rotary_factor"), merged.get("partial_rotary_factor")
    if top is not None and inner is not None and top != inner:
        raise HFError(f"config.json partial_rotary_factor={top!r} and rope_parameters partial_rotary_factor="
                      f"{inner!r} disagree; keep one of them")
    partial = next((v for v in (inner, top, partial_default) if v is not None), 1.0)
    if partial_default is None and partial != 1.0:
        raise HFError(f"config.json partial_rotary_factor={partial!r} is not supported (whole heads rotate here)")
    if not isinstance(partial, (int, float)) or not 0.0 < partial <= 1.0:
        raise HFError(f"config.json partial_rotary_factor={partial!r} must be a number in (0, 1]")
    if partial_default is not None:
        out["rotary_percent"] = float(partial)
    if rope_type == "default":
        return out
    if rope_type != "llama3":
        raise HFError(f"config.json rope_scaling rope_type={rope_type!r} is not supported: megatron-core has only "
                      f"Llama-3 scaling ('llama3'); dynamic-NTK, YaRN and linear scaling have no equivalent")
    for key, value in LLAMA3_FIXED.items():
        if not math.isclose(float(merged.get(key, value)), value):
            raise HFError(f"config.json rope_scaling {key}={merged.get(key)!r} is not supported: megatron-core "
                          f"hard-codes {key}={value} for 'llama3' scaling")
    factor = merged.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise HFError(f"config.json rope_scaling factor={factor!r} must be a positive number")
    out["rope_scaling_factor"] = float(factor)
    return out


# -------------------------------------------------------------------------------------- tables
def _untied(arch: ArchConfig) -> bool:
    return arch.untie_embeddings_and_output_weights


def _qkv_bias(arch: ArchConfig) -> bool:
    return arch.add_qkv_bias


def _heads(config: dict) -> int:
    return config["num_attention_heads"]


def _head_dim(config: dict) -> int:
    return config["hidden_size"] // config["num_attention_heads"]


_L = "decoder.layers."
_HF = "model.layers.{i}."

LLAMA_TENSORS = (
    TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    TensorMap(_L + "self_attention.linear_qkv.layer_norm_weight", (_HF + "input_layernorm.weight",)),
    TensorMap(_L + "self_attention.linear_qkv.weight",
              tuple(_HF + f"self_attn.{p}_proj.weight" for p in "qkv"), QKV_SPLIT),
    TensorMap(_L + "self_attention.linear_qkv.bias",
              tuple(_HF + f"self_attn.{p}_proj.bias" for p in "qkv"), QKV_SPLIT, when=_qkv_bias),
    TensorMap(_L + "self_attention.linear_proj.weight", (_HF + "self_attn.o_proj.weight",)),
    TensorMap(_L + "mlp.linear_fc1.layer_norm_weight", (_HF + "post_attention_layernorm.weight",)),
    TensorMap(_L + "mlp.linear_fc1.weight", (_HF + "mlp.gate_proj.weight", _HF + "mlp.up_proj.weight"), GATE_UP),
    TensorMap(_L + "mlp.linear_fc2.weight", (_HF + "mlp.down_proj.weight",)),
    TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",)),
    TensorMap("output_layer.weight", ("lm_head.weight",), VOCAB, when=_untied),
)

_ROPE_FIELDS = (
    Field("num_layers", "num_hidden_layers"),
    Field("hidden_size", "hidden_size"),
    Field("ffn_hidden_size", "intermediate_size"),
    Field("num_attention_heads", "num_attention_heads"),
    Field("num_query_groups", "num_key_value_heads", default=_heads),
    Field("kv_channels", "head_dim", default=_head_dim),
    Field("vocab_size", "vocab_size"),
    Field("norm_epsilon", "rms_norm_eps", default=1e-6),
    Field("init_method_std", "initializer_range", default=0.02),
)
_ROPE_FIXED = {"normalization": "RMSNorm", "position_embedding_type": "rope", "add_bias_linear": False,
               "add_qkv_bias": False, "qk_layernorm": False}

LLAMA = Family(
    model_type="llama", architecture="LlamaForCausalLM",
    fields=_ROPE_FIELDS + (Field("max_position_embeddings", "max_position_embeddings", default=2048),
                           Field("untie_embeddings_and_output_weights", "tie_word_embeddings", default=False,
                                 invert=True)),
    fixed=_ROPE_FIXED,
    requires={"attention_bias": (False,), "mlp_bias": (False,)},
    tensors=LLAMA_TENSORS,
    ignored=("rotary_emb.inv_freq",),
    writes={"use_cache": True},
)

MISTRAL = Family(
    model_type="mistral", architecture="MistralForCausalLM",
    fields=_ROPE_FIELDS + (Field("max_position_embeddings", "max_position_embeddings", default=4096 * 32),
                           Field("untie_embeddings_and_output_weights", "tie_word_embeddings", default=False,
                                 invert=True)),
    fixed=_ROPE_FIXED,
    # Sliding-window attention (Mistral 7B v0.1) has no megatron-core equivalent wired in here.
    requires={"sliding_window": (None,)},
    tensors=LLAMA_TENSORS,
    ignored=("rotary_emb.inv_freq",),
    writes={"use_cache": True},
)

QWEN2 = Family(
    model_type="qwen2", architecture="Qwen2ForCausalLM",
    fields=_ROPE_FIELDS + (Field("max_position_embeddings", "max_position_embeddings", default=32768),
                           Field("untie_embeddings_and_output_weights", "tie_word_embeddings", default=False,
                                 invert=True)),
    fixed={**_ROPE_FIXED, "add_qkv_bias": True},
    requires={"use_sliding_window": (False,)},
    tensors=LLAMA_TENSORS,
    ignored=("rotary_emb.inv_freq",),
    writes={"use_cache": True},
)

def _qwen3_head_dim(config: dict) -> int:
    return 128  # Qwen3Config's default: unlike Llama's, it is not hidden / heads


QWEN3 = Family(
    model_type="qwen3", architecture="Qwen3ForCausalLM",
    fields=tuple(Field("kv_channels", "head_dim", default=_qwen3_head_dim) if f.arch == "kv_channels" else f
                 for f in _ROPE_FIELDS) + (
        Field("max_position_embeddings", "max_position_embeddings", default=32768),
        Field("untie_embeddings_and_output_weights", "tie_word_embeddings", default=False, invert=True)),
    fixed={**_ROPE_FIXED, "qk_layernorm": True},
    requires={"attention_bias": (False,), "use_sliding_window": (False,)},
    # QK norm: one RMSNorm [head_dim] for all query heads and one for all key heads of a layer (DESIGN §2c).
    tensors=LLAMA_TENSORS[:3] + (
        TensorMap(_L + "self_attention.q_layernorm.weight", (_HF + "self_attn.q_norm.weight",)),
        TensorMap(_L + "self_attention.k_layernorm.weight", (_HF + "self_attn.k_norm.weight",)),
    ) + LLAMA_TENSORS[4:],
    ignored=("rotary_emb.inv_freq",),
    writes={"use_cache": True},
)


def _nemotron_head_dim(config: dict) -> int:
    return config["hidden_size"] // config["num_attention_heads"]


NEMOTRON = Family(
    model_type="nemotron", architecture="NemotronForCausalLM",
    fields=(
        Field("num_layers", "num_hidden_layers"),
        Field("hidden_size", "hidden_size"),
        Field("ffn_hidden_size", "intermediate_size"),
        Field("num_attention_heads", "num_attention_heads"),
        Field("num_query_groups", "num_key_value_heads", default=_heads),
        Field("kv_channels", "head_dim", default=_nemotron_head_dim),
        Field("vocab_size", "vocab_size"),
        Field("norm_epsilon", "norm_eps", default=1e-5),
        Field("init_method_std", "initializer_range", default=0.0134),
        Field("max_position_embeddings", "max_position_embeddings", default=4096),
        Field("untie_embeddings_and_output_weights", "tie_word_embeddings", default=False, invert=True),
    ),
    # LayerNorm1P computes layer_norm(x, 1 + w, b): megatron's zero-centred gamma, stored the same way (w as is).
    fixed={"normalization": "LayerNorm", "apply_layernorm_1p": True, "position_embedding_type": "rope",
           "add_bias_linear": False, "add_qkv_bias": False, "qk_layernorm": False},
    requires={"attention_bias": (False,), "mlp_bias": (False,)},
    activation=("hidden_act", {"relu2": "squared_relu"}),  # no gate: up_proj is all of fc1
    partial_rotary=0.5,
    tensors=(
        TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
        TensorMap(_L + "self_attention.linear_qkv.layer_norm_weight", (_HF + "input_layernorm.weight",)),
        TensorMap(_L + "self_attention.linear_qkv.layer_norm_bias", (_HF + "input_layernorm.bias",)),
        TensorMap(_L + "self_attention.linear_qkv.weight",
                  tuple(_HF + f"self_attn.{p}_proj.weight" for p in "qkv"), QKV_SPLIT),
        TensorMap(_L + "self_attention.linear_proj.weight", (_HF + "self_attn.o_proj.weight",)),
        TensorMap(_L + "mlp.linear_fc1.layer_norm_weight", (_HF + "post_attention_layernorm.weight",)),
        TensorMap(_L + "mlp.linear_fc1.layer_norm_bias", (_HF + "post_attention_layernorm.bias",)),
        TensorMap(_L + "mlp.linear_fc1.weight", (_HF + "mlp.up_proj.weight",)),
        TensorMap(_L + "mlp.linear_fc2.weight", (_HF + "mlp.down_proj.weight",)),
        TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",)),
        TensorMap("decoder.final_layernorm.bias", ("model.norm.bias",)),
        TensorMap("output_layer.weight", ("lm_head.weight",), VOCAB, when=_untied),
    ),
    ignored=("rotary_emb.inv_freq",),
    writes={"use_cache": True},
)

_G = "transformer.h.{i}."


def _n_inner(config: dict) -> int:
    return 4 * config["n_embd"]


GPT2 = Family(
    model_type="gpt2", architecture="GPT2LMHeadModel",
    fields=(
        Field("num_layers", "n_layer"),
        Field("hidden_size", "n_embd"),
        Field("ffn_hidden_size", "n_inner", default=_n_inner),
        Field("num_attention_heads", "n_head"),
        Field("vocab_size", "vocab_size"),
        Field("max_position_embeddings", "n_positions"),
        Field("norm_epsilon", "layer_norm_epsilon", default=1e-5),
        Field("init_method_std", "initializer_range", default=0.02),
    ),
    fixed={"normalization": "LayerNorm", "position_embedding_type": "learned_absolute", "add_bias_linear": True,
           "untie_embeddings_and_output_weights": False, "qk_layernorm": False},
    requires={"tie_word_embeddings": (True,), "scale_attn_weights": (True,),
              "scale_attn_by_inverse_layer_idx": (False,), "add_cross_attention": (False,)},
    # GPT-2's default is gelu_new, the tanh approximation (ArchConfig "gelu_tanh", megatron's openai_gelu);
    # "gelu" is the exact erf GELU.
    activation=("activation_function", {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}),
    rope=False,
    derived_heads=True,
    tensors=(
        TensorMap("embedding.word_embeddings.weight", ("transformer.wte.weight",), VOCAB),
        TensorMap("embedding.position_embeddings.weight", ("transformer.wpe.weight",)),
        TensorMap(_L + "self_attention.linear_qkv.layer_norm_weight", (_G + "ln_1.weight",)),
        TensorMap(_L + "self_attention.linear_qkv.layer_norm_bias", (_G + "ln_1.bias",)),
        TensorMap(_L + "self_attention.linear_qkv.weight", (_G + "attn.c_attn.weight",), Transposed(QKV_FUSED)),
        TensorMap(_L + "self_attention.linear_qkv.bias", (_G + "attn.c_attn.bias",), QKV_FUSED),
        TensorMap(_L + "self_attention.linear_proj.weight", (_G + "attn.c_proj.weight",), Transposed(COPY)),
        TensorMap(_L + "self_attention.linear_proj.bias", (_G + "attn.c_proj.bias",)),
        TensorMap(_L + "mlp.linear_fc1.layer_norm_weight", (_G + "ln_2.weight",)),
        TensorMap(_L + "mlp.linear_fc1.layer_norm_bias", (_G + "ln_2.bias",)),
        TensorMap(_L + "mlp.linear_fc1.weight", (_G + "mlp.c_fc.weight",), Transposed(COPY)),
        TensorMap(_L + "mlp.linear_fc1.bias", (_G + "mlp.c_fc.bias",)),
        TensorMap(_L + "mlp.linear_fc2.weight", (_G + "mlp.c_proj.weight",), Transposed(COPY)),
        TensorMap(_L + "mlp.linear_fc2.bias", (_G + "mlp.c_proj.bias",)),
        TensorMap("decoder.final_layernorm.weight", ("transformer.ln_f.weight",)),
        TensorMap("decoder.final_layernorm.bias", ("transformer.ln_f.bias",)),
    ),
    optional_prefix="transformer.",
    ignored=(".attn.bias", ".attn.masked_bias"),
    writes={"use_cache": True,
            "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "reorder_and_upcast_attn": False},
)

# ------------------------------------------------------------------------------------ Mixture of Experts
# Both families route softmax(top-k logits) or, for Qwen3-MoE with norm_topk_prob=False, top-k of the softmax
# over all experts without renormalising (megatron's moe_router_pre_softmax=True; DESIGN §2c). Every layer
# is MoE: a stack mixing dense and MoE layers is stored by megatron under per-layer keys, which the
# stacked-tensor importer does not write, so decoder_sparse_step / mlp_only_layers other than "all MoE"
# are refused by name. router_aux_loss_coef and output_router_logits are training options and are ignored.
_MOE_FIXED = {**_ROPE_FIXED, "moe_layer_freq": 1, "moe_shared_expert_ffn_hidden_size": None,
              "moe_router_score_function": "softmax"}
_EXPERTS = _L + "mlp.experts.experts."


def _moe_tensors(router: str, gate: str, up: str, down: str) -> tuple[TensorMap, ...]:
    """Router [E, H] and the per-expert gate/up (-> fc1 = [gate; up]) and down (-> fc2) projections."""
    return (
        TensorMap(_L + "mlp.router.weight", (_HF + router,)),
        TensorMap(_EXPERTS + "linear_fc1.weight", (_HF + gate, _HF + up), GATE_UP, experts=True),
        TensorMap(_EXPERTS + "linear_fc2.weight", (_HF + down,), experts=True),
    )


def _qwen3_moe_experts(config: dict) -> int:
    value = config.get("num_local_experts")  # what transformers 5 saves; Hub configs say num_experts
    return 128 if value is None else value


QWEN3_MOE = Family(
    model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM",
    fields=_ROPE_FIELDS + (
        Field("max_position_embeddings", "max_position_embeddings", default=32768),
        Field("untie_embeddings_and_output_weights", "tie_word_embeddings", default=False, invert=True),
        Field("num_experts", "num_experts", default=_qwen3_moe_experts),
        Field("moe_router_topk", "num_experts_per_tok", default=8),
        Field("moe_ffn_hidden_size", "moe_intermediate_size", default=768),
        # norm_topk_prob=True renormalises the top-k probabilities (softmax over the top-k logits): pre-softmax
        # False; False keeps top-k of the full softmax: pre-softmax True. transformers' default is False.
        Field("moe_router_pre_softmax", "norm_topk_prob", default=False, invert=True)),
    fixed={**_MOE_FIXED, "qk_layernorm": True},
    requires={"attention_bias": (False,), "use_sliding_window": (False,), "decoder_sparse_step": (1,),
              "mlp_only_layers": ([],)},
    tensors=LLAMA_TENSORS[:3] + (
        TensorMap(_L + "self_attention.q_layernorm.weight", (_HF + "self_attn.q_norm.weight",)),
        TensorMap(_L + "self_attention.k_layernorm.weight", (_HF + "self_attn.k_norm.weight",)),
    ) + LLAMA_TENSORS[4:6] + _moe_tensors("mlp.gate.weight", "mlp.experts.{e}.gate_proj.weight",
                                          "mlp.experts.{e}.up_proj.weight", "mlp.experts.{e}.down_proj.weight")
    + LLAMA_TENSORS[8:],
    ignored=("rotary_emb.inv_freq",),
    writes={"use_cache": True},
    moe=True,
    aliases=("num_local_experts",),
)

MIXTRAL = Family(
    model_type="mixtral", architecture="MixtralForCausalLM",
    fields=tuple(Field("norm_epsilon", "rms_norm_eps", default=1e-5) if f.arch == "norm_epsilon" else f
                 for f in _ROPE_FIELDS) + (
        Field("max_position_embeddings", "max_position_embeddings", default=4096 * 32),
        Field("untie_embeddings_and_output_weights", "tie_word_embeddings", default=False, invert=True),
        Field("num_experts", "num_local_experts", default=8),
        Field("moe_router_topk", "num_experts_per_tok", default=2),
        # Every layer is MoE: the experts' width is intermediate_size (ffn_hidden_size, read from the same key
        # above, is unused; an export writes the experts' width, this field being last).
        Field("moe_ffn_hidden_size", "intermediate_size")),
    fixed={**_MOE_FIXED, "moe_router_pre_softmax": False},
    # Sliding-window attention and router jitter (multiplicative noise on the router input) have no
    # megatron-core equivalent wired in here.
    requires={"sliding_window": (None,), "router_jitter_noise": (0.0,)},
    tensors=LLAMA_TENSORS[:6] + _moe_tensors("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.w1.weight",
                                             "block_sparse_moe.experts.{e}.w3.weight",
                                             "block_sparse_moe.experts.{e}.w2.weight") + LLAMA_TENSORS[8:],
    ignored=("rotary_emb.inv_freq",),
    writes={"use_cache": True},
    moe=True,
)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, NEMOTRON, GPT2, QWEN3_MOE,
                                                         MIXTRAL)}


def family_for_config(config: dict) -> Family:
    """The family of an HF config.json; HFError naming model_type when unsupported."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise HFError(f"config.json model_type={model_type!r} is not supported; supported families: "
                      f"{sorted(FAMILIES)}")
    return FAMILIES[model_type]


def family_by_name(name: str) -> Family:
    if name not in FAMILIES:
        raise HFError(f"unknown Hugging Face family {name!r}; supported: {sorted(FAMILIES)}")
    return FAMILIES[name]


def infer_family(arch: ArchConfig) -> Family:
    """The family an architecture fits when no source config names one (a model trained here)."""
    if arch.is_moe:
        return QWEN3_MOE if arch.qk_layernorm else MIXTRAL
    if arch.position_embedding_type == "learned_absolute":
        return GPT2
    if arch.qk_layernorm:
        return QWEN3
    if arch.apply_layernorm_1p or arch.activation == "squared_relu":
        return NEMOTRON
    return QWEN2 if arch.add_qkv_bias and not arch.add_bias_linear else LLAMA


def hf_name(name: str, layer: Optional[int], strip: str = "", expert: Optional[int] = None) -> str:
    """The HF tensor name of a table entry for one layer (and expert), without the prefix `strip` when given."""
    full = name.format(i=layer, e=expert) if layer is not None else name
    return full[len(strip):] if strip and full.startswith(strip) else full
