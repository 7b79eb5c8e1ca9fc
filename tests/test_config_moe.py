"""Mixture-of-Experts fields of ArchConfig: validation, total and active parameter counts, JSON, presets."""

from __future__ import annotations

import json

import pytest

from megatron_minitron.config import PRESETS, ArchConfig, ConfigError, preset


@pytest.mark.parametrize("name, total, active", [
    # Qwen/Qwen3-30B-A3B model card: 30.5B total, 3.3B activated.
    ("qwen3-30b-a3b", 30.5e9, 3.3e9),
    # mistralai/Mixtral-8x7B (Mistral AI's announcement): 46.7B total, 12.9B used per token.
    ("mixtral-8x7b", 46.7e9, 12.9e9),
])
def test_moe_presets_have_their_published_sizes(name, total, active):
    """Published figures have one decimal (Qwen3's 3.3B is our 3.353B cut, not rounded): within 0.06B."""
    arch = preset(name)
    assert abs(arch.num_parameters() - total) <= 0.06e9
    assert abs(arch.num_active_parameters() - active) <= 0.06e9
    assert arch.num_active_parameters() < arch.num_parameters() / 3


def test_counts_by_hand_for_a_small_moe():
    """tiny-moe counted term by term: 4 layers, hidden 64, 4 heads in 2 groups (head 16), 4 experts of
    width 64 (SwiGLU), top-2, vocab padded to 1024, untied."""
    arch = preset("tiny-moe", moe_shared_expert_ffn_hidden_size=32, moe_layer_freq=(0, 1, 1, 1))
    h, heads, groups, kv = 64, 4, 2, 16
    attn = h * kv * (heads + 2 * groups) + heads * kv * h
    expert = 3 * h * 64
    shared = 3 * h * 32
    dense = 3 * h * 192
    router = 4 * h
    per_layer_norms = 2 * h
    common = 4 * (attn + per_layer_norms) + h + 2 * 1024 * h
    assert arch.num_parameters() == common + dense + 3 * (router + 4 * expert + shared)
    assert arch.num_active_parameters() == common + dense + 3 * (router + 2 * expert + shared)
    assert arch.num_active_parameters(include_embeddings=False) == arch.num_active_parameters() - 2 * 1024 * h


def test_dense_models_have_equal_total_and_active_counts_and_unchanged_fingerprints():
    for name in ("tiny", "small", "llama3.1-8b"):
        assert preset(name).num_active_parameters() == preset(name).num_parameters()
    # Fingerprints recorded before the MoE fields existed: stored scores and plans still match.
    assert preset("tiny").fingerprint() == "1b603562d6ca167a"
    assert preset("small").fingerprint() == "d6a660f18e290e8d"


def test_moe_fields_round_trip_through_json_and_change_the_fingerprint():
    arch = preset("tiny-moe", moe_layer_freq=(0, 1, 1, 0), moe_shared_expert_ffn_hidden_size=32,
                  moe_router_score_function="sigmoid")
    back = ArchConfig.from_json(json.loads(json.dumps(arch.to_json())))
    assert back == arch and back.moe_layer_freq == (0, 1, 1, 0)
    # A pattern that is "every k-th layer" is that k: one model, one form (and one fingerprint).
    assert preset("tiny-moe", moe_layer_freq=[1, 0, 1, 0]) == preset("tiny-moe", moe_layer_freq=2)
    assert preset("tiny-moe", moe_layer_freq=(1, 1, 1, 1)).moe_layer_freq == 1
    assert back.fingerprint() == arch.fingerprint()
    assert arch.fingerprint() != preset("tiny-moe").fingerprint()
    assert preset("tiny-moe", moe_router_topk=3).fingerprint() != preset("tiny-moe").fingerprint()
    for name in PRESETS:
        assert ArchConfig.from_json(json.loads(json.dumps(PRESETS[name].to_json()))) == PRESETS[name]


def test_layer_pattern_and_routing_properties():
    assert preset("tiny-moe").moe_layers == (True,) * 4
    assert preset("tiny-moe", moe_layer_freq=2).moe_layers == (True, False, True, False)
    assert preset("tiny-moe", moe_layer_freq=(0, 1, 1, 1)).moe_layers == (False, True, True, True)
    assert preset("tiny").moe_layers == (False,) * 4
    assert preset("tiny-moe").moe_topk_renormalized
    assert not preset("tiny-moe", moe_router_pre_softmax=True).moe_topk_renormalized
    assert preset("tiny-moe", moe_router_score_function="sigmoid").moe_topk_renormalized
    assert preset("tiny-moe").expert_ffn_hidden_size == 64
    assert preset("tiny-moe", moe_ffn_hidden_size=None).expert_ffn_hidden_size == 192


@pytest.mark.parametrize("changes, message", [
    (dict(moe_router_topk=5), "moe_router_topk=5 is larger than num_experts=4"),
    (dict(num_experts=0), "num_experts must be a positive integer"),
    (dict(moe_ffn_hidden_size=-8), "moe_ffn_hidden_size must be a positive integer or None"),
    (dict(moe_shared_expert_ffn_hidden_size=0), "moe_shared_expert_ffn_hidden_size must be a positive integer"),
    (dict(moe_router_score_function="tanh"), "moe_router_score_function='tanh' is not one of"),
    (dict(moe_router_score_function="sigmoid", moe_router_pre_softmax=True), "moe_router_pre_softmax=True applies"),
    (dict(moe_layer_freq=(1, 0, 1)), r"moe_layer_freq=\[1, 0, 1\] must hold num_layers=4 flags"),
    (dict(moe_layer_freq=(0, 0, 0, 0)), "moe_layer_freq has no MoE layer"),
    (dict(moe_layer_freq=0), "moe_layer_freq must be a positive integer"),
    (dict(add_bias_linear=True), "add_bias_linear=True with num_experts"),
    (dict(moe_router_topk=1), "moe_router_topk=1 with softmax routing needs moe_router_pre_softmax=True"),
])
def test_invalid_moe_fields_are_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        preset("tiny-moe", **changes)


def test_moe_fields_on_a_dense_model_are_refused():
    with pytest.raises(ConfigError, match="moe_router_topk=4 is a Mixture-of-Experts field, but num_experts is None"):
        preset("tiny", moe_router_topk=4)


@pytest.mark.parametrize("arch, sizes, message", [
    (preset("tiny-moe"), dict(expert_parallel=3), "expert-parallel size 3 does not divide num_experts=4"),
    (preset("tiny"), dict(expert_parallel=2), "expert-parallel size 2 needs a Mixture-of-Experts model"),
    (preset("tiny-moe", moe_ffn_hidden_size=65), dict(tensor_parallel=2),
     "tensor-parallel size 2 does not divide moe_ffn_hidden_size=65"),
    (preset("tiny-moe", moe_shared_expert_ffn_hidden_size=31), dict(tensor_parallel=2),
     "tensor-parallel size 2 does not divide moe_shared_expert_ffn_hidden_size=31"),
    (preset("tiny-moe", moe_layer_freq=2, ffn_hidden_size=191), dict(tensor_parallel=2),
     "tensor-parallel size 2 does not divide ffn_hidden_size=191"),
])
def test_parallel_sizes_must_divide_the_experts(arch, sizes, message):
    with pytest.raises(ConfigError, match=message):
        arch.check_parallel(**sizes)


def test_dense_width_does_not_matter_when_every_layer_is_moe():
    preset("tiny-moe", ffn_hidden_size=191).check_parallel(tensor_parallel=2, expert_parallel=4)
