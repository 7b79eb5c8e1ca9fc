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
from megatron_minitron.runtime.dist import ParallelConfig, Runtime, moe_token_dispatcher


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


def moe_config(arch: ArchConfig, parallel: ParallelConfig, *, backend: str, aux_loss_coeff: float,
               grouped_gemm: bool, dispatcher: Optional[str] = None) -> dict:
    """The MoE fields of megatron's TransformerConfig (empty for a dense model). The router's auxiliary
    load-balancing loss (Switch Transformer style) is a training option, so its coefficient comes from
    the caller; 0 turns it off. `dispatcher` overrides the backend's token dispatcher (importance's
    hooks read the all-gather dispatcher's token order, on any backend)."""
    if not arch.is_moe:
        return {}
    if aux_loss_coeff < 0:
        raise ConfigError(f"MoE auxiliary-loss coefficient must be >= 0, got {aux_loss_coeff}")
    # megatron keys the checkpoint per layer (decoder.layers.{i}.…) whenever moe_layer_freq is a list or
    # an integer > 1; a model whose layers are all MoE passes 1 and keeps the stacked layout.
    layers = arch.moe_layers
    freq = 1 if all(layers) else [int(flag) for flag in layers]
    return dict(
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.moe_router_topk,
        moe_ffn_hidden_size=arch.expert_ffn_hidden_size,
        moe_shared_expert_intermediate_size=arch.moe_shared_expert_ffn_hidden_size,
        moe_router_score_function=arch.moe_router_score_function,
        moe_router_pre_softmax=arch.moe_router_pre_softmax,
        moe_layer_freq=freq,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=aux_loss_coeff,
        moe_token_dispatcher_type=dispatcher or moe_token_dispatcher(backend),
        moe_grouped_gemm=grouped_gemm,
        expert_model_parallel_size=parallel.expert_parallel,
    )


def transformer_config(arch: ArchConfig, parallel: ParallelConfig, *, dtype: torch.dtype = torch.float32,
                       hidden_dropout: float = 0.0, attention_dropout: float = 0.0, backend: str = "gloo",
                       moe_aux_loss_coeff: float = 0.0, use_te: bool = False,
                       moe_dispatcher: Optional[str] = None):
    """megatron-core TransformerConfig for an architecture split over a parallel layout. `backend`
    chooses the MoE token dispatcher; with `use_te` MoE experts use grouped GEMM."""
    from megatron.core.transformer import TransformerConfig

    parallel.check_arch(arch)
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
        **moe_config(arch, parallel, backend=backend, aux_loss_coeff=moe_aux_loss_coeff, grouped_gemm=use_te,
                     dispatcher=moe_dispatcher),
    )


def layer_spec(config, *, use_te: bool, moe_layers: tuple[bool, ...] = ()):
    """Transformer-Engine spec when asked, else megatron's local spec with our LocalNorm; both cover
    every layer of this rank's stage plus the final norm. `moe_layers` flags the model's MoE layers
    (global indices): those get megatron's MoE layer (SequentialMLP experts locally, grouped GEMM with TE)."""
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_minitron.model.norm import LocalNorm

    qk = config.qk_layernorm
    if use_te and not any(moe_layers):
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk)
    experts = config.num_moe_experts
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        dense, norm = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk), TENorm
        moe = get_gpt_layer_with_transformer_engine_spec(num_experts=experts, moe_grouped_gemm=True, qk_layernorm=qk)
    else:
        dense, norm = _with_local_norms(get_gpt_layer_local_spec(qk_layernorm=qk), LocalNorm, qk), LocalNorm
        moe = _with_local_norms(get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False, qk_layernorm=qk),
                                LocalNorm, qk) if experts else None
    offset, count = get_transformer_layer_offset(config), get_num_layers_to_build(config)
    flags = moe_layers or (False,) * config.num_layers
    layers = [moe if flags[offset + i] else dense for i in range(count)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=norm)


def _with_local_norms(spec, norm, qk_layernorm: bool = False):
    attention = spec.submodules.self_attention
    if qk_layernorm:  # per-head q/k norms over kv_channels (megatron all-reduces their grads over TP)
        attention = dataclasses.replace(attention, submodules=dataclasses.replace(
            attention.submodules, q_layernorm=norm, k_layernorm=norm))
    submodules = dataclasses.replace(spec.submodules, input_layernorm=norm, pre_mlp_layernorm=norm,
                                     self_attention=attention)
    return dataclasses.replace(spec, submodules=submodules)


def build_model(arch: ArchConfig, runtime: Runtime, *, dtype: Optional[torch.dtype] = None,
                use_te: Optional[bool] = None, hidden_dropout: float = 0.0, attention_dropout: float = 0.0,
                parallel: Optional[ParallelConfig] = None, moe_aux_loss_coeff: float = 0.0,
                moe_dispatcher: Optional[str] = None):
    """This rank's stage of the model, on its device (bf16 on GPU, fp32 on CPU unless dtype is given).
    `moe_aux_loss_coeff` weighs the routers' load-balancing loss of a MoE model in training;
    `moe_dispatcher` ("allgather" or "alltoall") overrides the backend's MoE token dispatcher.

    `parallel` overrides the runtime's layout for this model only; its TP/PP sizes must be the
    runtime's, but its first/last stage layer counts may differ (a distillation teacher deeper than
    its student splits its own layers over the same pipeline stages), and a dense model may use EP 1
    in a runtime with expert parallelism (its expert-parallel ranks are plain data-parallel ranks for it:
    a dense model distilled from, or into, a MoE one)."""
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
            runtime.parallel.tensor_parallel, runtime.parallel.pipeline_parallel, runtime.parallel.sequence_parallel) \
            or parallel.expert_parallel not in (runtime.parallel.expert_parallel, 1 if not arch.is_moe else None):
        raise ConfigError(f"a model's layout {parallel} must keep the runtime's TP, PP, SP and EP ({runtime.parallel}); "
                          f"only a dense model may drop EP to 1")
    config = transformer_config(arch, parallel, dtype=dtype, hidden_dropout=hidden_dropout,
                                attention_dropout=attention_dropout, backend=runtime.backend,
                                moe_aux_loss_coeff=moe_aux_loss_coeff, use_te=use_te, moe_dispatcher=moe_dispatcher)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, use_te=use_te, moe_layers=arch.moe_layers),
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
