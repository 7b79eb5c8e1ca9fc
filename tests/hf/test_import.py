"""Import: each family's random transformers model gives the same logits in megatron at TP1 (the
4-process TP2 and TP2xPP2 check is test_hf_multirank.py); the architecture, tokenizer and RoPE
frequencies are the source's."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_minitron.model import checkpoint as ckpt
from tests.hf import models

pytest.importorskip("transformers", reason="the Hugging Face tests need transformers (pip install -e .[test])")


@pytest.mark.parametrize("name", list(models.CASES))
def test_logits_equal_transformers_at_tp1(hf_cases, megatron_logits, name):
    logits, _ = megatron_logits(hf_cases[name]["ckpt"])
    assert logits.shape == hf_cases[name]["logits"].shape
    assert models.rel_error(logits, hf_cases[name]["logits"]) <= 1e-4


def test_architecture_fields(hf_cases):
    nemo = ckpt.resolve(hf_cases["mistral-nemo"]["ckpt"]).arch
    assert (nemo.kv_channels, nemo.hidden_size, nemo.num_attention_heads) == (32, 64, 4)  # head_dim != 64/4
    assert nemo.rotary_base == 1000000
    llama31 = ckpt.resolve(hf_cases["llama3.1"]["ckpt"]).arch
    assert (llama31.rope_scaling_factor, llama31.rotary_base, llama31.num_query_groups) == (8.0, 500000, 2)
    qwen = ckpt.resolve(hf_cases["qwen2"]["ckpt"]).arch
    assert qwen.add_qkv_bias and not qwen.add_bias_linear and not qwen.untie_embeddings_and_output_weights
    gpt2 = ckpt.resolve(hf_cases["gpt2"]["ckpt"]).arch
    assert (gpt2.normalization, gpt2.activation, gpt2.position_embedding_type, gpt2.add_bias_linear) == (
        "LayerNorm", "gelu_tanh", "learned_absolute", True)  # GPT-2's default gelu_new
    qwen3 = ckpt.resolve(hf_cases["qwen3"]["ckpt"]).arch
    assert qwen3.qk_layernorm and (qwen3.kv_channels, qwen3.add_qkv_bias) == (32, False)
    assert not qwen3.untie_embeddings_and_output_weights
    nemotron = ckpt.resolve(hf_cases["nemotron"]["ckpt"]).arch
    assert (nemotron.normalization, nemotron.apply_layernorm_1p, nemotron.activation, nemotron.rotary_percent) == (
        "LayerNorm", True, "squared_relu", 0.5)
    llama32 = ckpt.resolve(hf_cases["llama3.2"]["ckpt"]).arch
    assert (llama32.rope_scaling_factor, llama32.untie_embeddings_and_output_weights) == (32.0, False)
    for case in hf_cases.values():
        arch = ckpt.resolve(case["ckpt"]).arch
        assert (arch.vocab_size, arch.padded_vocab_size) == (models.VOCAB, 1024)


@pytest.mark.parametrize("name", ["llama3.1", "llama3.2"])  # rope scaling factor 8 and 32
def test_llama3_rope_scaling_frequencies(hf_cases, megatron_logits, name):
    """The short test sequence barely feels the scaled low frequencies; compare them directly."""
    _, model = megatron_logits(hf_cases[name]["ckpt"])
    hf = models.hf_model(name)
    ours, theirs = model.rotary_pos_emb.inv_freq.float(), hf.model.rotary_emb.inv_freq.float()
    plain = 1.0 / (500000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert not torch.allclose(theirs, plain)  # scaling changes some frequencies ...
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)  # ... and megatron's are the same


def test_tokenizer_follows_the_model(hf_cases):
    from megatron_minitron.data.tokenizer import TokenizerRef

    for name, case in hf_cases.items():
        info = ckpt.resolve(case["ckpt"])
        assert info.tokenizer["kind"] == "huggingface"
        tokenizer = TokenizerRef.from_json(info.tokenizer).load()
        eos = "<|endoftext|>" if name == "gpt2" else "</s>"
        assert tokenizer.eod == tokenizer.vocab[eos] == 2
        assert tokenizer.tokenize("w1 w7") == [4, 10]
        assert (case["ckpt"] / "tokenizer" / "tokenizer_config.json").is_file()
        args = torch.load(info.path / "common.pt", weights_only=False)["args"]
        assert args.tokenizer_type == "HuggingFaceTokenizer" and args.kv_channels == info.arch.head_dim


def test_checkpoint_is_self_describing(hf_cases):
    info = ckpt.resolve(hf_cases["qwen2"]["ckpt"])
    meta = json.loads((info.path / "minitron.json").read_text())
    assert meta["provenance"]["model_type"] == "qwen2"
    assert (info.root / "hf" / "config.json").is_file()
    assert ckpt.latest_iteration(info.root) == "release"
    keys = ckpt.tensor_shapes(info.path)
    assert keys["decoder.layers.self_attention.linear_qkv.bias"] == (2, (4 + 2 * 2) * 16)
    assert "output_layer.weight" not in keys  # tied


def test_bfloat16_import_loads_into_fp32_model(hf_cases, megatron_logits, tmp_path):
    from megatron_minitron.hf.importer import import_hf

    import_hf(hf_cases["llama2"]["hf"], tmp_path / "bf16", dtype="bfloat16", print_fn=lambda _: None)
    assert torch.bfloat16 in {t.dtype for t in ckpt.read_tensors(ckpt.resolve(tmp_path / "bf16").path).values()}
    logits, _ = megatron_logits(tmp_path / "bf16")
    assert models.rel_error(logits, hf_cases["llama2"]["logits"]) <= 2e-2  # bf16 weights, fp32 compute


def test_nemotron_hub_config_form_reads_the_same(hf_cases, tmp_path):
    """Hub configs of Nemotron carry rope_theta and partial_rotary_factor at top level (transformers 5 writes
    them inside rope_parameters); both forms import to the same architecture and tensors, and an absent
    factor is transformers' default for the family (0.5)."""
    import shutil

    from megatron_minitron.hf.importer import import_hf

    src = tmp_path / "hub"
    shutil.copytree(hf_cases["nemotron"]["hf"], src)
    config = json.loads((src / "config.json").read_text())
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.5
    config.pop("rope_parameters")
    config.update(rope_theta=10000.0, partial_rotary_factor=0.5)
    (src / "config.json").write_text(json.dumps(config))
    import_hf(src, tmp_path / "ckpt", print_fn=lambda _: None)
    ours, theirs = ckpt.resolve(tmp_path / "ckpt"), ckpt.resolve(hf_cases["nemotron"]["ckpt"])
    assert ours.arch == theirs.arch
    a, b = ckpt.read_tensors(ours.path), ckpt.read_tensors(theirs.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from megatron_minitron.hf.families import NEMOTRON

    config.pop("partial_rotary_factor")
    assert NEMOTRON.arch_from_config(config).rotary_percent == 0.5
    assert NEMOTRON.arch_from_config({**config, "partial_rotary_factor": 0.25}).rotary_percent == 0.25


# The Hub's config.json of each preset's model (Qwen/Qwen3-8B, meta-llama/Llama-3.2-1B, nvidia/Minitron-8B-Base,
# Qwen/Qwen3-30B-A3B, mistralai/Mixtral-8x7B-v0.1),
# in the form the Hub serves them (top-level rope_theta / rope_scaling / partial_rotary_factor, torch_dtype).
HUB_CONFIGS = {
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 40960,
        "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936},
    "llama3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256},
    "minitron-8b": {
        "architectures": ["NemotronForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 2, "eos_token_id": 3, "head_dim": 128, "hidden_act": "relu2", "hidden_size": 4096,
        "initializer_range": 0.0134, "intermediate_size": 16384, "max_position_embeddings": 4096, "mlp_bias": False,
        "model_type": "nemotron", "norm_eps": 1e-05, "num_attention_heads": 48, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "partial_rotary_factor": 0.5, "rope_theta": 10000, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "vocab_size": 256000},
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
        "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
        "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936},
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
        "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 32000},
}


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_hub_config_imports_as_the_preset(name):
    """The family tables read each Hub config.json into exactly the preset's architecture (the preset's
    published parameter counts are checked in tests/test_config.py)."""
    from megatron_minitron.config import preset
    from megatron_minitron.hf.families import family_for_config

    arch = family_for_config(HUB_CONFIGS[name]).arch_from_config(HUB_CONFIGS[name])
    assert arch.replace(init_method_std=preset(name).init_method_std) == preset(name)


def test_checksums_hashed_while_writing_equal_a_rehash(hf_cases):
    """import-hf hashes its shard as it writes it; checksums.json must equal reading every file back."""
    from megatron_minitron.model.integrity import CHECKSUMS, compute_checksums

    for name, case in hf_cases.items():
        release = ckpt.resolve(case["ckpt"]).path
        assert json.loads((release / CHECKSUMS).read_text()) == compute_checksums(release), name
