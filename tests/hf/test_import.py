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
