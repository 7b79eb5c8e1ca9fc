"""MoE models built by megatron-core from an ArchConfig (one process, gloo): exact parameter counts,
checkpoints that describe themselves and reload, and layout errors named before any process starts."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_minitron.config import ConfigError, preset
from megatron_minitron.model import checkpoint as ckpt
from megatron_minitron.model.build import build_model, transformer_config
from megatron_minitron.runtime import ParallelConfig

VARIANTS = {
    "all-moe": {},
    "shared-expert": dict(moe_shared_expert_ffn_hidden_size=32),
    "mixed-dense-first": dict(moe_layer_freq=(0, 1, 1, 1)),
    "every-other-top1": dict(moe_layer_freq=2, moe_router_topk=1, moe_router_pre_softmax=True),
    "sigmoid": dict(moe_router_score_function="sigmoid"),
    "layernorm-gelu": dict(normalization="LayerNorm", activation="gelu", moe_router_pre_softmax=True),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parameter_count_is_exact(single_rank_runtime, name):
    arch = preset("tiny-moe", **VARIANTS[name])
    model = build_model(arch, single_rank_runtime)
    assert sum(p.numel() for p in model.parameters()) == arch.num_parameters()
    routers = [m for m in model.modules() if type(m).__name__ == "TopKRouter"]
    assert len(routers) == sum(arch.moe_layers)
    assert all(r.topk == arch.moe_router_topk for r in routers)


def test_active_count_matches_the_experts_a_token_uses(single_rank_runtime):
    """Active = total minus the (experts - top-k) routed experts of each MoE layer, counted on the module."""
    arch = preset("tiny-moe", moe_shared_expert_ffn_hidden_size=32, moe_layer_freq=(0, 1, 1, 1))
    model = build_model(arch, single_rank_runtime)
    unused = 0
    for module in model.modules():
        if type(module).__name__ == "SequentialMLP":
            per_expert = sum(p.numel() for p in module.local_experts[0].parameters())
            unused += (len(module.local_experts) - arch.moe_router_topk) * per_expert
    assert arch.num_active_parameters() == arch.num_parameters() - unused


def test_megatron_config_carries_the_routing(single_rank_runtime):
    arch = preset("tiny-moe", moe_router_pre_softmax=True, moe_layer_freq=(1, 0, 1, 1))
    config = transformer_config(arch, ParallelConfig(), backend="gloo", moe_aux_loss_coeff=0.01)
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (4, 2, 64)
    assert config.moe_router_pre_softmax and config.moe_layer_freq == [1, 0, 1, 1]
    assert config.moe_aux_loss_coeff == 0.01 and config.moe_token_dispatcher_type == "allgather"
    assert transformer_config(arch, ParallelConfig(), backend="nccl").moe_token_dispatcher_type == "alltoall"
    assert transformer_config(preset("tiny-moe"), ParallelConfig()).moe_layer_freq == 1
    assert transformer_config(preset("tiny"), ParallelConfig()).num_moe_experts is None


@pytest.mark.parametrize("pattern", [None, (0, 1, 1, 1)])
def test_checkpoint_round_trip_describes_itself(single_rank_runtime, tmp_path, pattern):
    """Saved, resolved from minitron.json alone, rebuilt and reloaded: every tensor equal. A mixed
    dense/MoE stack is keyed per layer by megatron; that is not the singleton layout."""
    arch = preset("tiny-moe", **({"moe_layer_freq": pattern} if pattern else {}))
    torch.manual_seed(3)
    model = build_model(arch, single_rank_runtime)
    ckpt.save_checkpoint(tmp_path / "run", model=model, arch=arch, runtime=single_rank_runtime, iteration=5)
    info = ckpt.resolve(tmp_path / "run")
    meta = json.loads((info.path / ckpt.META).read_text())
    assert info.arch == arch.explicit() and not info.singleton_local_shards
    assert meta["num_active_parameters"] == arch.num_active_parameters() < meta["num_parameters"]
    assert meta["saved_with"]["expert_parallel"] == 1
    shapes = ckpt.tensor_shapes(info.path)
    key = ("decoder.layers.mlp.experts.experts.linear_fc1.weight" if pattern is None
           else "decoder.layers.1.mlp.experts.experts.linear_fc1.weight")
    assert shapes[key][-3:] == (4, 128, 64)
    fresh = build_model(info.arch, single_rank_runtime)
    ckpt.load_checkpoint(info, model=fresh)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        if torch.is_tensor(a) and a.is_floating_point():
            assert torch.equal(a, b), name


def test_checkpoint_with_other_expert_count_is_refused(single_rank_runtime, tmp_path):
    arch = preset("tiny-moe")
    model = build_model(arch, single_rank_runtime)
    ckpt.save_checkpoint(tmp_path / "run", model=model, arch=arch, runtime=single_rank_runtime, iteration=None)
    other = build_model(preset("tiny-moe", num_experts=2), single_rank_runtime)
    with pytest.raises(ckpt.CheckpointError, match=r"router.weight has global shape \(4, 4, 64\), but the model "
                                                   r"expects \(4, 2, 64\)"):
        ckpt.load_checkpoint(ckpt.resolve(tmp_path / "run"), model=other)


@pytest.mark.parametrize("parallel, world, message", [
    (ParallelConfig(tensor_parallel=2), 2, "needs sequence parallelism .* add --sequence-parallel"),
    (ParallelConfig(expert_parallel=3), 3, "expert-parallel size 3 does not divide num_experts=4"),
    (ParallelConfig(expert_parallel=2), 3, "expert-parallel size 2 does not divide the data-parallel size 3"),
    (ParallelConfig(expert_parallel=2, tensor_parallel=2, sequence_parallel=True), 2,
     "expert-parallel size 2 does not divide the data-parallel size 1"),
])
def test_layout_errors_before_any_process(parallel, world, message):
    with pytest.raises(ConfigError, match=message):
        parallel.data_parallel(world)
        parallel.check_arch(preset("tiny-moe"))


# ------------------------------------------------------------------ Megatron-LM MoE checkpoints
def _megatron_lm_checkpoint(root, model, arch, *, singleton: bool = False):
    """What Megatron-LM writes: megatron's own dist_checkpointing save of the model with `args` in the
    common state, in release/, and no minitron.json."""
    from megatron.core import dist_checkpointing

    from megatron_minitron.model.build import unwrap

    metadata = {"singleton_local_shards": True} if singleton else None
    (root / "release").mkdir(parents=True)
    state = {"model": unwrap(model).sharded_state_dict(metadata=metadata), "checkpoint_version": 3.0,
             "iteration": 0, "args": ckpt.megatron_args_from_arch(arch, moe_grouped_gemm=True)}
    dist_checkpointing.save(state, str(root / "release"), sharded_strategy=("torch_dist", 1))
    (root / ckpt.TRACKER).write_text("release")
    return root


def _grouped_gemm_twin(sequential, arch):
    """The same weights in megatron's legacy grouped-GEMM experts (GroupedMLP: one [H, E*2F] and one
    [E*F, H] matrix per layer). Only its real sharded_state_dict is used; its forward needs the
    grouped_gemm kernels, so their availability check is lifted to construct it on a CPU."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe import grouped_gemm_util

    from megatron_minitron.model.build import _with_local_norms
    from megatron_minitron.model.norm import LocalNorm

    config = transformer_config(arch, ParallelConfig())
    config.moe_grouped_gemm, config.moe_use_legacy_grouped_gemm = True, True
    spec = _with_local_norms(get_gpt_layer_local_spec(num_experts=arch.num_experts, moe_grouped_gemm=True,
                                                      moe_use_legacy_grouped_gemm=True), LocalNorm)
    check, grouped_gemm_util.assert_grouped_gemm_is_available = grouped_gemm_util.assert_grouped_gemm_is_available, (
        lambda: None)
    try:
        twin = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=arch.padded_vocab,
                        max_sequence_length=arch.max_position_embeddings, position_embedding_type="rope",
                        rotary_base=arch.rotary_base, share_embeddings_and_output_weights=False)
    finally:
        grouped_gemm_util.assert_grouped_gemm_is_available = check
    source = sequential.state_dict()
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if name.endswith("experts.weight1"):  # memory of [E, H, 2F]: each expert's fc1 transposed
                fc1 = [source[name.replace("weight1", f"local_experts.{e}.linear_fc1.weight")].t()
                       for e in range(arch.num_experts)]
                param.copy_(torch.stack(fc1).reshape(param.shape))
            elif name.endswith("experts.weight2"):  # memory of [E, F, H]: each expert's fc2 transposed
                fc2 = [source[name.replace("weight2", f"local_experts.{e}.linear_fc2.weight")].t()
                       for e in range(arch.num_experts)]
                param.copy_(torch.stack(fc2).reshape(param.shape))
            else:
                param.copy_(source[name])
    return twin


@pytest.mark.parametrize("layout", ["sequential-singleton", "grouped-gemm"])
def test_megatron_lm_moe_checkpoint_is_read_from_its_args(single_rank_runtime, tmp_path, layout):
    arch = preset("tiny-moe")
    torch.manual_seed(11)
    source = build_model(arch, single_rank_runtime)
    if layout == "grouped-gemm":
        _megatron_lm_checkpoint(tmp_path, _grouped_gemm_twin(source, arch), arch)
    else:
        _megatron_lm_checkpoint(tmp_path, source, arch, singleton=True)
    info = ckpt.resolve(tmp_path)
    assert info.origin == "megatron-lm" and info.arch.explicit() == arch.explicit()
    assert info.singleton_local_shards == (layout == "sequential-singleton")
    loaded = build_model(info.arch, single_rank_runtime)
    ckpt.load_checkpoint(info, model=loaded)
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        source.eval(), loaded.eval()
        assert torch.equal(loaded(tokens, positions, None), source(tokens, positions, None))
    with pytest.raises(ckpt.CheckpointError, match="num_experts: expected 8, checkpoint has 4"):
        ckpt.check_architecture(preset("tiny-moe", num_experts=8), info.arch, where=str(info.path))


def test_megatron_lm_args_with_another_expert_count_than_the_tensors(single_rank_runtime, tmp_path):
    """args say 2 experts, the tensors hold 4: refused before any tensor is read, naming the key."""
    from megatron.core import dist_checkpointing

    arch = preset("tiny-moe")
    model = build_model(arch, single_rank_runtime)
    (tmp_path / "release").mkdir()
    state = {"model": model.sharded_state_dict(), "checkpoint_version": 3.0, "iteration": 0,
             "args": ckpt.megatron_args_from_arch(arch.replace(num_experts=2))}
    dist_checkpointing.save(state, str(tmp_path / "release"), sharded_strategy=("torch_dist", 1))
    (tmp_path / ckpt.TRACKER).write_text("release")
    info = ckpt.resolve(tmp_path)
    assert info.arch.num_experts == 2
    with pytest.raises(ckpt.CheckpointError, match=r"decoder.layers.mlp.router.weight has global shape \(4, 4, 64\), "
                                                   r"but the model expects \(4, 2, 64\)"):
        ckpt.load_checkpoint(info, model=build_model(info.arch, single_rank_runtime))


def test_megatron_lm_moe_features_we_cannot_build_are_named():
    from argparse import Namespace

    args = ckpt.megatron_args_from_arch(preset("tiny-moe"))
    for name, value, what in [("moe_shared_expert_gate", True, "a gated shared expert"),
                              ("moe_expert_capacity_factor", 1.25, "token dropping"),
                              ("moe_router_enable_expert_bias", True, "expert-bias")]:
        with pytest.raises(ckpt.CheckpointError, match=f"args.{name}={value!r} \\({what}"):
            ckpt.arch_from_megatron_args(Namespace(**{**vars(args), name: value}))
    with pytest.raises(ckpt.CheckpointError, match="Sinkhorn routing"):
        ckpt.arch_from_megatron_args(Namespace(**{**vars(args), "moe_router_load_balancing_type": "sinkhorn"}))
    assert ckpt.arch_from_megatron_args(args).explicit() == preset("tiny-moe").explicit()
    mixed = preset("tiny-moe", moe_layer_freq=(0, 1, 1, 1), moe_shared_expert_ffn_hidden_size=32)
    assert ckpt.arch_from_megatron_args(ckpt.megatron_args_from_arch(mixed)).explicit() == mixed.explicit()
