"""Bad inputs to import-hf and export-hf: each is a clear error naming the file, field or tensor, raised
before anything is written (no output, no partial directory left behind)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megatron_minitron.cli import main
from megatron_minitron.hf.exporter import export_hf
from megatron_minitron.hf.files import HFError
from megatron_minitron.hf.importer import import_hf

pytest.importorskip("transformers", reason="the Hugging Face tests need transformers (pip install -e .[test])")


def quiet(_):
    pass


@pytest.fixture
def copy(hf_cases, tmp_path):
    """copy(name) -> a private copy of a case's HF directory."""
    def make(name: str) -> Path:
        target = tmp_path / f"{name}-copy"
        shutil.copytree(hf_cases[name]["hf"], target)
        return target
    return make


def assert_refused(source: Path, out: Path, match: str, **kwargs) -> None:
    with pytest.raises(HFError, match=match):
        import_hf(source, out, print_fn=quiet, **kwargs)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_directory_without_config(copy, tmp_path):
    src = copy("llama2")
    (src / "config.json").unlink()
    assert_refused(src, tmp_path / "out", r"has no config\.json")
    assert_refused(tmp_path / "nowhere", tmp_path / "out", r"nowhere does not exist")


def test_directory_without_weights(copy, tmp_path):
    src = copy("llama2")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    assert_refused(src, tmp_path / "out", r"neither model\.safetensors nor .*pytorch_model\.bin.*convert")


def test_missing_shard_and_index_naming_absent_file(copy, tmp_path):
    src = copy("llama3.1")  # saved in several shards
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (src / shard).unlink()
    assert_refused(src, tmp_path / "out", rf"names shard file\(s\) \['{shard}'\] that are not in")


def test_index_placing_a_tensor_in_the_wrong_file(copy, tmp_path):
    src = copy("llama3.1")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][name] = files[1]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(src, tmp_path / "out", rf"places tensor '{name}' in {files[1]}, which does not hold it")


@pytest.mark.parametrize("keep", [0.5, 0.999, 4])
def test_truncated_shard(copy, tmp_path, keep):
    src = copy("llama3.1")
    shard = src / "model-00002-of-00005.safetensors"
    if not shard.exists():
        shard = sorted(src.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    assert_refused(src, tmp_path / "out", rf"{shard.name} is truncated")


def test_unsupported_family_and_options(copy, tmp_path):
    cases = [
        ("llama2", {"model_type": "qwen2_moe"}, r"model_type='qwen2_moe' is not supported; supported families"),
        ("llama2", {"attention_bias": True}, r"attention_bias=True is not supported"),
        ("llama2", {"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
        # transformers 5 saved rope_parameters; older configs carry rope_scaling (both forms are read)
        ("llama3.1", {"rope_parameters": None, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
         r"rope_type='yarn' is not supported"),
        ("llama3.1", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
         r"rope_type='dynamic' is not supported"),
        ("llama3.1", {"rope_parameters": None, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
            "original_max_position_embeddings": 8192}}, r"high_freq_factor=2.0 is not supported"),
        ("llama3.1", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, r"rope_scaling and rope_parameters "
                                                                               r"disagree on \['factor', 'rope_type'\]"),
        ("mistral-nemo", {"sliding_window": 4096}, r"sliding_window=4096 is not supported"),
        ("qwen2", {"use_sliding_window": True}, r"use_sliding_window=True is not supported"),
        ("gpt2", {"activation_function": "silu"}, r"activation_function='silu' is not supported.*gelu_new"),
        ("llama2", {"num_key_value_heads": 3}, r"no valid model: num_attention_heads=4 is not divisible by num_query_groups=3"),
        # Qwen3: sliding windows (the switch, or sliding layers listed), YaRN, attention bias
        ("qwen3", {"use_sliding_window": True}, r"use_sliding_window=True is not supported for model_type 'qwen3'"),
        ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]},
         r"layer_types=\['full_attention', 'sliding_attention'\] is not supported.*no sliding-window layers"),
        ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                       "original_max_position_embeddings": 32768}},
         r"rope_type='yarn' is not supported"),
        ("qwen3", {"attention_bias": True}, r"attention_bias=True is not supported for model_type 'qwen3'"),
        # Nemotron: another activation, biases on the linear layers, partial rotary given twice differently
        ("nemotron", {"hidden_act": "relu"}, r"hidden_act='relu' is not supported.*\['relu2'\]"),
        ("nemotron", {"mlp_bias": True}, r"mlp_bias=True is not supported for model_type 'nemotron'"),
        ("nemotron", {"partial_rotary_factor": 0.25}, r"partial_rotary_factor=0.25 and rope_parameters "
                                                       r"partial_rotary_factor=0.5 disagree"),
        ("nemotron", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.5}},
         r"partial_rotary_factor=1.5 must be a number in \(0, 1\]"),
        # Partial rotary in a family that rotates whole heads
        ("llama2", {"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5 is not supported \(whole heads"),
        # Llama 3.2 with a llama3 scaling megatron-core cannot build (it hard-codes original 8192)
        ("llama3.2", {"rope_parameters": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 4096,
                                          "rope_theta": 500000.0}},
         r"original_max_position_embeddings=4096 is not supported: megatron-core hard-codes"),
        # Qwen3-MoE: dense layers among the MoE ones (either key), sliding windows, attention bias, top-k > experts
        ("qwen3-moe", {"decoder_sparse_step": 2}, r"decoder_sparse_step=2 is not supported for model_type 'qwen3_moe'"),
        ("qwen3-moe", {"mlp_only_layers": [0]}, r"mlp_only_layers=\[0\] is not supported for model_type 'qwen3_moe'"),
        ("qwen3-moe", {"use_sliding_window": True}, r"use_sliding_window=True is not supported for model_type "
                                                    r"'qwen3_moe'"),
        ("qwen3-moe", {"attention_bias": True}, r"attention_bias=True is not supported for model_type 'qwen3_moe'"),
        ("qwen3-moe", {"num_experts_per_tok": 8}, r"no valid model: moe_router_topk=8 is larger than num_experts=4"),
        # Mixtral: sliding windows, router jitter, another activation, top-1 softmax routing (no router gradient)
        ("mixtral", {"sliding_window": 4096}, r"sliding_window=4096 is not supported for model_type 'mixtral'"),
        ("mixtral", {"router_jitter_noise": 0.01}, r"router_jitter_noise=0.01 is not supported for model_type "
                                                   r"'mixtral'"),
        ("mixtral", {"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported for model_type 'mixtral'"),
        ("mixtral", {"num_experts_per_tok": 1}, r"no valid model: moe_router_topk=1 with softmax routing needs "
                                                r"moe_router_pre_softmax=True"),
    ]
    for name, change, match in cases:
        src = copy(name)
        edit_config(src, **change)
        assert_refused(src, tmp_path / "out", match)
        shutil.rmtree(src)


def test_config_disagreeing_with_the_weights(copy, tmp_path):
    src = copy("llama2")
    edit_config(src, intermediate_size=128)
    assert_refused(src, tmp_path / "out", r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[160, 64\], "
                                          r"config\.json implies \[128, 64\]")
    src = copy("qwen2")
    edit_config(src, model_type="llama")  # Qwen2 weights under a Llama config: the q/k/v biases are left over
    assert_refused(src, tmp_path / "out", r"tensors the llama table does not map, e\.g\. \['model\.layers\.0\.self_attn")


def test_expert_count_disagreeing_with_the_weights(copy, tmp_path):
    src = copy("mixtral")
    edit_config(src, num_local_experts=8)
    assert_refused(src, tmp_path / "out", r"tensor 'model\.layers\.0\.block_sparse_moe\.gate\.weight' has shape "
                                          r"\[4, 64\], config\.json implies \[8, 64\]")
    src = copy("qwen3-moe")
    edit_config(src, num_local_experts=2)  # transformers 5's spelling of num_experts is read too
    assert_refused(src, tmp_path / "out", r"tensor 'model\.layers\.0\.mlp\.gate\.weight' has shape \[4, 64\], "
                                          r"config\.json implies \[2, 64\]")


def test_shared_expert_weights_are_refused(copy, tmp_path):
    """Qwen3-MoE has no shared expert: weights of one (a Qwen2-MoE-style checkpoint) are named, not dropped."""
    import torch
    from safetensors.torch import load_file, save_file

    src = copy("qwen3-moe")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.mlp.shared_expert.gate_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert_refused(src, tmp_path / "out", r"tensors the qwen3_moe table does not map, e\.g\. "
                                          r"\['model\.layers\.0\.mlp\.shared_expert\.gate_proj\.weight'\]")


def test_tokenizer_larger_than_the_model(copy, tmp_path):
    from tokenizers import Tokenizer, models

    src = copy("llama2")
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(1500)}, unk_token="t0")).save(str(src / "tokenizer.json"))
    assert_refused(src, tmp_path / "out", r"tokenizer .*tokenizer\.json has 1500 tokens, more than config\.json "
                                          r"vocab_size=1000")


def test_parallel_layout_that_does_not_divide(hf_cases, tmp_path):
    assert_refused(hf_cases["llama2"]["hf"], tmp_path / "out", r"pipeline-parallel size 3 does not divide num_layers=2",
                   pipeline_parallel=3)


def test_existing_target(hf_cases, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # a directory of user files is never replaced, --overwrite or not
    for overwrite in (False, True):
        with pytest.raises(HFError, match=r"taken already exists, is not empty and is not a checkpoint"):
            import_hf(hf_cases["llama2"]["hf"], out, overwrite=overwrite, print_fn=quiet)
        with pytest.raises(HFError, match=r"taken already exists, is not empty and is not a Hugging Face model"):
            export_hf(hf_cases["llama2"]["ckpt"], out, overwrite=overwrite, print_fn=quiet)
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    # a previous output of the same kind is replaced with --overwrite, and only then
    ckpt_out, hf_out = tmp_path / "ckpt", tmp_path / "hf"
    import_hf(hf_cases["llama2"]["hf"], ckpt_out, print_fn=quiet)
    export_hf(hf_cases["llama2"]["ckpt"], hf_out, print_fn=quiet)
    with pytest.raises(HFError, match=r"ckpt already exists and is not empty.*--overwrite"):
        import_hf(hf_cases["llama2"]["hf"], ckpt_out, print_fn=quiet)
    with pytest.raises(HFError, match=r"is not a checkpoint"):  # an HF directory is not a checkpoint
        import_hf(hf_cases["llama2"]["hf"], hf_out, overwrite=True, print_fn=quiet)
    import_hf(hf_cases["llama2"]["hf"], ckpt_out, overwrite=True, print_fn=quiet)
    export_hf(hf_cases["llama2"]["ckpt"], hf_out, overwrite=True, print_fn=quiet)
    assert (ckpt_out / "latest_checkpointed_iteration.txt").is_file() and (hf_out / "config.json").is_file()
    with pytest.raises(HFError, match=r"overlaps the source"):
        export_hf(hf_cases["llama2"]["ckpt"], hf_cases["llama2"]["ckpt"] / "hf-out", print_fn=quiet)


def test_export_into_a_family_that_cannot_hold_the_model(hf_cases, tmp_path):
    with pytest.raises(HFError, match=r"a gpt2 model has normalization='LayerNorm'; this checkpoint has "
                                      r"normalization='RMSNorm'"):
        export_hf(hf_cases["llama2"]["ckpt"], tmp_path / "out", family="gpt2", print_fn=quiet)
    with pytest.raises(HFError, match=r"a llama model has add_qkv_bias=False"):
        export_hf(hf_cases["qwen2"]["ckpt"], tmp_path / "out", family="llama", print_fn=quiet)
    with pytest.raises(HFError, match=r"a llama model has qk_layernorm=False; this checkpoint has qk_layernorm=True"):
        export_hf(hf_cases["qwen3"]["ckpt"], tmp_path / "out", family="llama", print_fn=quiet)
    with pytest.raises(HFError, match=r"a qwen3 model has normalization='RMSNorm'; this checkpoint has "
                                      r"normalization='LayerNorm'"):
        export_hf(hf_cases["nemotron"]["ckpt"], tmp_path / "out", family="qwen3", print_fn=quiet)
    with pytest.raises(HFError, match=r"a nemotron model has normalization='LayerNorm'"):
        export_hf(hf_cases["llama3.2"]["ckpt"], tmp_path / "out", family="nemotron", print_fn=quiet)
    with pytest.raises(HFError, match=r"a llama model has no experts; this checkpoint has num_experts=4 \(export it "
                                      r"as mixtral or qwen3_moe\)"):
        export_hf(hf_cases["mixtral"]["ckpt"], tmp_path / "out", family="llama", print_fn=quiet)
    with pytest.raises(HFError, match=r"a mixtral model has experts in every layer; this checkpoint has "
                                      r"num_experts=None"):
        export_hf(hf_cases["llama2"]["ckpt"], tmp_path / "out", family="mixtral", print_fn=quiet)
    with pytest.raises(HFError, match=r"a mixtral model has qk_layernorm=False; this checkpoint has qk_layernorm=True"):
        export_hf(hf_cases["qwen3-moe"]["ckpt"], tmp_path / "out", family="mixtral", print_fn=quiet)
    assert not (tmp_path / "out").exists()


def test_cli_reports_one_line(hf_cases, tmp_path, capsys):
    from megatron_minitron.cli.export_hf import FAMILY_CHOICES
    from megatron_minitron.hf.families import FAMILIES

    assert FAMILY_CHOICES == tuple(sorted(FAMILIES))
    assert main(["import-hf", "--hf", str(tmp_path / "nowhere"), "--save", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minitron import-hf: error:") and "nowhere" in err[0]
    assert main(["export-hf", "--load", str(hf_cases["gpt2"]["ckpt"]), "--save", str(tmp_path / "o"),
                 "--max-shard-size", "lots"]) == 2
    assert "--max-shard-size 'lots'" in capsys.readouterr().err
    assert main(["import-hf", "--hf", str(hf_cases["gpt2"]["hf"]), "--save", str(tmp_path / "ok"), "--tp", "2"]) == 0
    assert main(["export-hf", "--load", str(tmp_path / "ok"), "--save", str(tmp_path / "ok-hf"),
                 "--max-shard-size", "100KB"]) == 0
    assert len(list((tmp_path / "ok-hf").glob("model-*.safetensors"))) > 1


def test_non_finite_weight_is_refused_naming_tensor_and_file(hf_cases, tmp_path):
    from safetensors.torch import load_file, save_file

    hf = tmp_path / "hf"
    shutil.copytree(hf_cases["llama2"]["hf"], hf)
    weights = hf / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in sorted(tensors) if k.endswith("mlp.down_proj.weight"))
    tensors[name][0, 0] = float("inf")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(HFError, match=rf"model.safetensors: tensor '{name}' holds NaN or infinite values"):
        import_hf(hf, tmp_path / "out", print_fn=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
