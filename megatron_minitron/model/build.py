"""Build megatron-core's GPTModel for this rank's pipeline stage from an `ArchConfig`.

A model is always built from a config and a layer spec, never made by editing a live model: a
pruned model is a new `ArchConfig` loaded from a rewritten checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_minitron.config import ArchConfig, ConfigError
from megatron_minitron.runtime.dist import ParallelConfig, Runtime


def transformer_engine_available() -> bool:
    """Whether megatron-core can build the Transformer-Engine layer spec here (TE importable, CUDA present)."""
    if not torch.cuda.is_available():
        return False
    from megatron.core.models.gpt import gpt_layer_specs

    return bool(getattr(gpt_layer_specs, "HAVE_TE", False))


def _activation(arch: ArchConfig):
    from megatron.core.activations import squared_relu
    from megatron.core.transformer.utils import openai_gelu

    return {"swiglu": F.silu, "gelu": F.gelu, "gelu_tanh": openai_gelu, "squared_relu": squared_relu,
            "relu": F.relu}[arch.activation]


def transformer_config(arch: ArchConfig, parallel: ParallelConfig, *, dtype: torch.dtype = torch.float32,
                       hidden_dropout: float = 0.0, attention_dropout: float = 0.0):
    """megatron-core TransformerConfig for an architecture split over a parallel layout."""
    from megatron.core.transformer import TransformerConfig

    arch.check_parallel(tensor_parallel=parallel.tensor_parallel, pipeline_parallel=parallel.pipeline_parallel,
                        first_stage_layers=parallel.first_stage_layers, last_stage_layers=parallel.last_stage_layers)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"dtype {dtype} is not supported; use float32 or bfloat16")
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.query_groups,
        kv_channels=arch.head_dim,
        normalization=arch.normalization,
        layernorm_epsilon=arch.norm_epsilon,
        layernorm_zero_centered_gamma=arch.apply_layernorm_1p,
        gated_linear_unit=arch.gated,
        activation_func=_activation(arch),
        add_bias_linear=arch.add_bias_linear,
        add_qkv_bias=arch.add_qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        init_method_std=arch.init_method_std,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        sequence_parallel=parallel.sequence_parallel,
        num_layers_in_first_pipeline_stage=parallel.first_stage_layers,
        num_layers_in_last_pipeline_stage=parallel.last_stage_layers,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        # Initialise the global weight on the CPU and split it: the same seed then gives the same
        # model at every TP size (and keeps GPU memory free of full matrices).
        use_cpu_initialization=not torch.cuda.is_available(),
        calculate_per_token_loss=True,
        # Fused kernels go through torch.compile/apex/TE; keep them off (they are the same math).
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


def layer_spec(config, *, use_te: bool):
    """Transformer-Engine spec when asked, else megatron's local spec with our LocalNorm; both cover
    every layer of this rank's stage plus the final norm."""
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from megatron_minitron.model.norm import LocalNorm

    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm)
    attention = spec.submodules.self_attention
    if config.qk_layernorm:  # per-head q/k norms: LocalNorm over kv_channels (megatron all-reduces their grads over TP)
        attention = dataclasses.replace(attention, submodules=dataclasses.replace(
            attention.submodules, q_layernorm=LocalNorm, k_layernorm=LocalNorm))
    submodules = dataclasses.replace(spec.submodules, input_layernorm=LocalNorm, pre_mlp_layernorm=LocalNorm,
                                     self_attention=attention)
    layer = dataclasses.replace(spec, submodules=submodules)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=LocalNorm)


def build_model(arch: ArchConfig, runtime: Runtime, *, dtype: Optional[torch.dtype] = None,
                use_te: Optional[bool] = None, hidden_dropout: float = 0.0, attention_dropout: float = 0.0,
                parallel: Optional[ParallelConfig] = None):
    """This rank's stage of the model, on its device (bf16 on GPU, fp32 on CPU unless dtype is given).

    `parallel` overrides the runtime's layout for this model only; its TP/PP sizes must be the
    runtime's, but its first/last stage layer counts may differ (a distillation teacher deeper than
    its student splits its own layers over the same pipeline stages)."""
    from megatron.core.models.gpt import GPTModel

    if dtype is None:
        dtype = torch.bfloat16 if runtime.device.type == "cuda" else torch.float32
    if use_te is None:
        use_te = transformer_engine_available()
    elif use_te and not transformer_engine_available():
        raise ConfigError("the Transformer-Engine layer spec was requested, but transformer_engine is not "
                          "importable or CUDA is absent; use the local spec")
    if parallel is None:
        parallel = runtime.parallel
    elif (parallel.tensor_parallel, parallel.pipeline_parallel, parallel.sequence_parallel) != (
            runtime.parallel.tensor_parallel, runtime.parallel.pipeline_parallel, runtime.parallel.sequence_parallel):
        raise ConfigError(f"a model's layout {parallel} must keep the runtime's TP, PP and SP ({runtime.parallel})")
    config = transformer_config(arch, parallel, dtype=dtype, hidden_dropout=hidden_dropout,
                                attention_dropout=attention_dropout)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, use_te=use_te),
        vocab_size=arch.padded_vocab,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=runtime.is_first_stage,
        post_process=runtime.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=not arch.untie_embeddings_and_output_weights,
        position_embedding_type=arch.position_embedding_type,
        rotary_percent=arch.rotary_percent,
        rotary_base=arch.rotary_base,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
    )
    model = model.to(runtime.device)
    if dtype == torch.bfloat16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)  # casts inputs to bf16 and the last stage's output to fp32
    return model


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
