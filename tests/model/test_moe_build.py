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
