"""Export: an imported model comes back bit-identical, under a config transformers reads as the source's,
with shards and index, generation config and tokenizer files; a model trained here exports too."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_minitron.hf import files
from megatron_minitron.hf.exporter import export_hf
from tests.hf import models

pytest.importorskip("transformers", reason="the Hugging Face tests need transformers (pip install -e .[test])")

# Keys that legitimately differ between the saved source config and the exported one.
VOLATILE = {"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"}


def load_all(directory) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("name", list(models.CASES))
def test_round_trip_is_bit_identical(hf_cases, tmp_path, name):
    import transformers

    out = tmp_path / "out"
    export_hf(hf_cases[name]["ckpt"], out, max_shard_bytes=150_000, print_fn=lambda _: None)
    source, exported = load_all(hf_cases[name]["hf"]), load_all(out)
    assert sorted(source) == sorted(exported)
    for key, tensor in source.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    # several shards, an index naming each tensor's shard, and every listed file present
    index = json.loads((out / files.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(source)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in source.values())
    theirs = transformers.AutoConfig.from_pretrained(hf_cases[name]["hf"]).to_dict()
    ours = transformers.AutoConfig.from_pretrained(out).to_dict()
    if theirs.get("head_dim") is None and "num_attention_heads" in theirs:  # the export writes head_dim always
        theirs["head_dim"] = theirs["hidden_size"] // theirs["num_attention_heads"]
    diff = {k for k in set(theirs) | set(ours) if k not in VOLATILE and theirs.get(k) != ours.get(k)}
    assert not diff, {k: (theirs.get(k), ours.get(k)) for k in diff}
    assert (out / "generation_config.json").is_file()
    assert (out / "tokenizer.json").read_bytes() == (hf_cases[name]["hf"] / "tokenizer.json").read_bytes()
    assert (out / "tokenizer_config.json").is_file()
    assert not list(tmp_path.glob(".*partial"))


def test_exported_model_loads_in_transformers(hf_cases, tmp_path):
    """`from_pretrained` (no custom code) gives the source's logits for the Mistral-NeMo-style export
    (explicit head_dim), the Llama-3.1 one (rope scaling), the GPT-2 one (Conv1D, tied), Qwen3 (QK norm),
    Nemotron (LayerNorm1P, partial rotary), Llama 3.2 (tied, rope scaling 32) and the MoE families Qwen3-MoE
    and Mixtral (per-expert tensors, which transformers 5 fuses on load)."""
    names = ("mistral-nemo", "llama3.1", "gpt2", "qwen3", "nemotron", "llama3.2", "qwen3-moe", "mixtral")
    for name in names:
        export_hf(hf_cases[name]["ckpt"], tmp_path / name, print_fn=lambda _: None)
    (tmp_path / "logits").mkdir()
    got = models.from_pretrained_logits([tmp_path / n for n in names], tmp_path / "logits")
    for name, logits in zip(names, got):
        assert models.rel_error(logits, hf_cases[name]["logits"]) <= 1e-5, name


def test_dtype_conversion_and_single_shard(hf_cases, tmp_path):
    export_hf(hf_cases["qwen2"]["ckpt"], tmp_path / "bf16", dtype="bfloat16", print_fn=lambda _: None)
    tensors = load_all(tmp_path / "bf16")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert list(json.loads((tmp_path / "bf16" / files.INDEX).read_text())["weight_map"].values())[0] == \
        "model-00001-of-00001.safetensors"


@pytest.mark.parametrize("model_type, changes", [
    ("llama", {}),
    ("qwen3", dict(qk_layernorm=True, kv_channels=24)),
    ("nemotron", dict(normalization="LayerNorm", apply_layernorm_1p=True, activation="squared_relu",
                      rotary_percent=0.5)),
])
def test_model_trained_here_exports_as_its_family(tmp_path, single_rank_runtime, megatron_logits, model_type, changes):
    """A checkpoint with no Hugging Face origin (saved from a megatron model) exports as the family its
    architecture fits: a plain GQA model as llama, a QK-norm model as qwen3 and a zero-centred-LayerNorm,
    squared-ReLU, half-rotary one as nemotron (partial_rotary_factor written); transformers agrees."""
    from megatron_minitron.config import preset
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.model.build import build_model

    arch = preset("tiny", vocab_size=1000, **changes)
    model = build_model(arch, single_rank_runtime, use_te=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt.save_checkpoint(tmp_path / "run", model=model, arch=arch, runtime=single_rank_runtime, iteration=None)
    export_hf(tmp_path / "run", tmp_path / "hf", print_fn=lambda _: None)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["head_dim"]) == (model_type, arch.head_dim)
    if model_type == "llama":
        assert config["num_key_value_heads"] == 2
    if model_type == "nemotron":
        assert (config["partial_rotary_factor"], config["hidden_act"]) == (0.5, "relu2")
    ours, _ = megatron_logits(tmp_path / "run")
    assert models.rel_error(models.hf_logits(tmp_path / "hf"), ours) <= 1e-4


def test_row_blocks_give_the_same_tensors(hf_cases, tmp_path):
    """With tiny blocks every plain tensor (embedding, output layer, per-layer projections) is copied in
    row blocks both ways: the checkpoint holds the same global tensors and the export the same files."""
    from megatron_minitron.hf.importer import import_hf
    from megatron_minitron.model import checkpoint as ckpt

    for name in ("llama2", "gpt2"):
        import_hf(hf_cases[name]["hf"], tmp_path / name, chunk_bytes=5000, print_fn=lambda _: None)
        blocked = ckpt.read_tensors(ckpt.resolve(tmp_path / name).path)
        whole = ckpt.read_tensors(ckpt.resolve(hf_cases[name]["ckpt"]).path)
        assert blocked.keys() == whole.keys() and all(torch.equal(blocked[k], whole[k]) for k in whole)
        export_hf(tmp_path / name, tmp_path / f"{name}-hf", chunk_bytes=5000, max_shard_bytes=100_000,
                  print_fn=lambda _: None)
        source, exported = load_all(hf_cases[name]["hf"]), load_all(tmp_path / f"{name}-hf")
        assert source.keys() == exported.keys() and all(torch.equal(source[k], exported[k]) for k in source)
