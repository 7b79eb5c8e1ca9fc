"""ArchConfig: validation errors, JSON round trip, presets' published sizes."""

from __future__ import annotations

import json

import pytest

from megatron_minitron.config import PRESETS, ArchConfig, ConfigError, load_arch, preset, stage_layers


def test_json_round_trip_every_preset():
    for arch in PRESETS.values():
        assert ArchConfig.from_json(json.loads(json.dumps(arch.to_json()))) == arch


def test_explicit_fills_derived_sizes_and_keeps_the_model():
    arch = preset("tiny")
    explicit = arch.explicit()
    assert explicit.kv_channels == 16 and explicit.num_query_groups == 2 and explicit.padded_vocab_size == 1024
    assert explicit.num_parameters() == arch.num_parameters()


@pytest.mark.parametrize("name, total, tolerance", [
    ("llama3.1-8b", 8.03e9, 0.005e9),       # meta-llama/Llama-3.1-8B model card: 8.03B
    ("mistral-nemo-12b", 12.25e9, 0.01e9),  # mistralai/Mistral-Nemo-Base-2407: 12.2B (safetensors 12,247,782,400)
    ("nemotron4-15b", 15.6e9, 0.05e9),      # arXiv 2402.16819: 3.2B embedding + 12.5B non-embedding
])
def test_presets_have_their_published_size(name, total, tolerance):
    assert abs(preset(name).num_parameters() - total) <= tolerance


@pytest.mark.parametrize("name, total", [
    ("qwen3-8b", 8_190_735_360),     # Qwen/Qwen3-8B: the Hub's safetensors parameter total (card: 8.2B)
    ("llama3.2-1b", 1_235_814_400),  # meta-llama/Llama-3.2-1B: the Hub's total (card: 1.23B), tied embeddings
])
def test_presets_match_the_published_parameter_total_exactly(name, total):
    assert preset(name).num_parameters() == total


def test_qwen3_8b_non_embedding_and_minitron_sizes():
    assert abs(preset("qwen3-8b").num_parameters(include_embeddings=False) - 6.95e9) < 0.005e9  # model card
    assert 8.0e9 <= preset("minitron-8b").num_parameters() < 8.5e9  # nvidia/Minitron-8B-Base: "8B"
    # The paper's MINITRON 4B shape (arXiv 2407.14679): 4.2B parameters, 2.6B of them outside the embeddings.
    minitron4b = preset("minitron-8b", hidden_size=3072, num_attention_heads=24, ffn_hidden_size=9216)
    assert abs(minitron4b.num_parameters() - 4.2e9) < 0.05e9
    assert abs(minitron4b.num_parameters(include_embeddings=False) - 2.6e9) < 0.05e9


def test_qk_layernorm_parameters_are_two_norms_per_layer():
    qwen = preset("qwen3-8b")
    assert qwen.num_parameters() - qwen.replace(qk_layernorm=False).num_parameters() == 36 * 2 * 128
    tiny = preset("tiny", normalization="LayerNorm", qk_layernorm=True, kv_channels=24)
    assert tiny.num_parameters() - tiny.replace(qk_layernorm=False).num_parameters() == 4 * 2 * 2 * 24  # w + b


def test_nemotron_non_embedding_size():
    assert abs(preset("nemotron4-15b").num_parameters(include_embeddings=False) - 12.5e9) < 0.05e9


@pytest.mark.parametrize("changes, message", [
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(num_attention_heads=6, num_query_groups=4), "num_attention_heads=6 is not divisible by num_query_groups=4"),
    (dict(hidden_size=66), "hidden_size=66 is not divisible by num_attention_heads=4"),
    (dict(activation="tanh"), "activation='tanh' is not one of"),
    (dict(normalization="BatchNorm"), "normalization='BatchNorm'"),
    (dict(padded_vocab_size=512), "padded_vocab_size=512 is smaller than vocab_size=1000"),
    (dict(apply_layernorm_1p=True), "apply_layernorm_1p needs normalization='LayerNorm'"),
    (dict(rotary_percent=0.0), "rotary_percent"),
])
def test_invalid_architectures_name_the_field(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preset("tiny", **changes)


@pytest.mark.parametrize("tp, message", [
    (3, "tensor-parallel size 3 does not divide num_attention_heads=4"),
    (4, "tensor-parallel size 4 does not divide num_query_groups=2"),
])
def test_tensor_parallel_must_divide(tp, message):
    with pytest.raises(ConfigError, match=message):
        preset("tiny").check_parallel(tensor_parallel=tp)


def test_tensor_parallel_must_divide_ffn():
    with pytest.raises(ConfigError, match="does not divide ffn_hidden_size=191"):
        preset("tiny", ffn_hidden_size=191).check_parallel(tensor_parallel=2)


def test_pipeline_layout_even_and_uneven():
    assert stage_layers(4, 2) == [2, 2]
    assert stage_layers(7, 3, first=1, last=2) == [1, 4, 2]
    assert stage_layers(5, 2, first=2) == [2, 3]
    with pytest.raises(ConfigError, match="pipeline-parallel size 3 does not divide num_layers=4"):
        stage_layers(4, 3)
    with pytest.raises(ConfigError, match="middle stages must split the rest evenly"):
        stage_layers(8, 4, first=1, last=2)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="neither a preset"):
        load_arch("no-such-model")
    with pytest.raises(ConfigError, match="unknown architecture preset 'x'"):
        preset("x")


def test_unknown_json_field_is_named():
    data = preset("tiny").to_json() | {"num_routed_experts": 8}
    with pytest.raises(ConfigError, match=r"unknown architecture fields \['num_routed_experts'\]"):
        ArchConfig.from_json(data)


def test_fingerprint_of_older_architectures_is_unchanged_by_later_fields():
    """Scores and plans written before qk_layernorm and the MoE fields existed keep matching: a dense
    model's defaults are left out."""
    import hashlib

    from megatron_minitron.config import MOE_FIELDS

    arch = preset("tiny")
    before = {k: v for k, v in arch.to_json().items() if k not in ("qk_layernorm", *MOE_FIELDS)}  # as it was
    assert arch.fingerprint() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert arch.replace(qk_layernorm=True).fingerprint() != arch.fingerprint()


def test_fingerprint_changes_with_the_architecture():
    assert preset("tiny").fingerprint() == preset("tiny").fingerprint()
    assert preset("tiny").fingerprint() != preset("tiny", ffn_hidden_size=128).fingerprint()
