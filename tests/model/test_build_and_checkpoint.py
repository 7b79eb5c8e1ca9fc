"""Models built by megatron-core from an ArchConfig (one process, gloo), and checkpoint errors."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
import torch

from megatron_minitron.config import ConfigError, preset
from megatron_minitron.model import checkpoint as ckpt
from megatron_minitron.model.build import build_model

VARIANTS = {
    "swiglu-rmsnorm-gqa": {},
    "layernorm-gelu-learned-tied": dict(normalization="LayerNorm", activation="gelu",
                                        position_embedding_type="learned_absolute",
                                        untie_embeddings_and_output_weights=False),
    "squared-relu-1p-bias": dict(normalization="LayerNorm", apply_layernorm_1p=True, activation="squared_relu",
                                 add_bias_linear=True, rotary_percent=0.5),
    "qkv-bias-only": dict(add_qkv_bias=True),
    "head-dim-not-hidden-over-heads": dict(kv_channels=24, num_query_groups=4),
    "relu-no-positions": dict(activation="relu", position_embedding_type="none"),
    "qk-rmsnorm": dict(qk_layernorm=True, kv_channels=24, num_query_groups=4),
    "qk-layernorm-1p-bias": dict(qk_layernorm=True, normalization="LayerNorm", apply_layernorm_1p=True,
                                 add_bias_linear=True),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parameter_count_is_exact(single_rank_runtime, name):
    arch = preset("tiny", **VARIANTS[name])
    model = build_model(arch, single_rank_runtime)
    built = sum(p.numel() for p in model.parameters())
    assert built == arch.num_parameters()


def test_zero_centred_gamma_norm_starts_at_identity(single_rank_runtime):
    arch = preset("tiny", normalization="LayerNorm", apply_layernorm_1p=True)
    model = build_model(arch, single_rank_runtime)
    norm = model.decoder.final_layernorm
    assert torch.count_nonzero(norm.weight) == 0
    x = torch.randn(3, 64)
    torch.testing.assert_close(norm(x), torch.nn.functional.layer_norm(x, (64,), eps=arch.norm_epsilon))


def test_qk_layernorm_normalises_each_head_of_queries_and_keys(single_rank_runtime):
    """The q/k norms are built over kv_channels with the model's norm kind, under megatron's checkpoint
    keys, and change the attention output (they are really applied)."""
    arch = preset("tiny", qk_layernorm=True, kv_channels=24)
    model = build_model(arch, single_rank_runtime)
    attention = model.decoder.layers[0].self_attention
    assert attention.q_layernorm.weight.shape == attention.k_layernorm.weight.shape == (24,)
    assert attention.q_layernorm.bias is None  # RMSNorm
    keys = {getattr(t, "key", None) for t in model.sharded_state_dict().values()}  # the stored (global) names
    assert {"decoder.layers.self_attention.q_layernorm.weight", "decoder.layers.self_attention.k_layernorm.weight"} \
        <= set(keys)
    x = torch.randn(5, 2, 64)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool).triu(1)
    before = attention(x, attention_mask=mask)[0]
    with torch.no_grad():
        attention.k_layernorm.weight.mul_(3.0)
    assert not torch.allclose(attention(x, attention_mask=mask)[0], before)


def test_missing_and_empty_checkpoint_dirs(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint directory {tmp_path / 'nope'} does not exist"):
        ckpt.resolve(tmp_path / "nope")
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint directory {tmp_path} is empty"):
        ckpt.resolve(tmp_path)
    (tmp_path / ckpt.TRACKER).write_text("12")
    with pytest.raises(ckpt.CheckpointError, match="names iteration 12, but .*iter_0000012 does not exist"):
        ckpt.resolve(tmp_path)
    (tmp_path / ckpt.TRACKER).write_text("latest")
    with pytest.raises(ckpt.CheckpointError, match="holds 'latest'; expected an iteration number"):
        ckpt.resolve(tmp_path)


def test_unfinished_iteration_dir_is_not_a_checkpoint(tmp_path):
    (tmp_path / "iter_0000001").mkdir()
    (tmp_path / ckpt.TRACKER).write_text("1")
    with pytest.raises(ckpt.CheckpointError, match="not a finished torch_dist checkpoint"):
        ckpt.resolve(tmp_path)


def _save(runtime, arch, root, **kwargs):
    model = build_model(arch, runtime)
    ckpt.save_checkpoint(root, model=model, arch=arch, runtime=runtime, iteration=5, **kwargs)
    return model


def test_checkpoint_describes_itself_and_loads_without_flags(single_rank_runtime, tmp_path):
    arch = preset("tiny", num_layers=2)
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"not a real model, only copied")
    model = _save(single_rank_runtime, arch, tmp_path / "ck", tokenizer={"kind": "sentencepiece", "path": str(tokenizer)})
    info = ckpt.resolve(tmp_path / "ck")
    assert info.iteration == 5 and info.origin == "minitron"
    assert info.arch == arch.explicit()
    assert info.tokenizer["path"] == str((tmp_path / "ck" / "tokenizer" / "tok.model").resolve())
    assert json.loads((info.path / ckpt.META).read_text())["num_parameters"] == arch.num_parameters()
    torch.manual_seed(99)
    other = build_model(info.arch, single_rank_runtime)
    ckpt.load_checkpoint(info, model=other)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    assert not list((tmp_path / "ck").glob("*.partial"))


def test_different_architecture_is_refused_before_loading(single_rank_runtime, tmp_path):
    _save(single_rank_runtime, preset("tiny", num_layers=2), tmp_path / "ck")
    info = ckpt.resolve(tmp_path / "ck")
    with pytest.raises(ckpt.CheckpointError, match="ffn_hidden_size: expected 128, checkpoint has 192"):
        ckpt.check_architecture(preset("tiny", num_layers=2, ffn_hidden_size=128), info.arch, where="ck")
    wrong = build_model(preset("tiny", num_layers=2, ffn_hidden_size=128), single_rank_runtime)
    with pytest.raises(ckpt.CheckpointError, match=r"tensor decoder\.layers\.mlp\.linear_fc[12]\.weight has global "
                                                   r"shape \(2, (384, 64|64, 192)\), but the model expects"):
        ckpt.load_checkpoint(info, model=wrong)


def test_megatron_lm_checkpoint_architecture_from_args(single_rank_runtime, tmp_path):
    """A checkpoint in Megatron-LM's layout with only `args` (no minitron.json) describes itself."""
    from megatron.core import dist_checkpointing

    arch = preset("tiny", num_layers=2)
    model = build_model(arch, single_rank_runtime)
    args = Namespace(num_layers=2, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4,
                     group_query_attention=True, num_query_groups=2, kv_channels=None, padded_vocab_size=1024,
                     max_position_embeddings=256, normalization="RMSNorm", swiglu=True,
                     position_embedding_type="rope", untie_embeddings_and_output_weights=True,
                     add_bias_linear=False, tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model="/t.model")
    iter_dir = tmp_path / "iter_0000200"
    iter_dir.mkdir()
    dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args, "iteration": 200,
                             "checkpoint_version": 3.0}, str(iter_dir))
    (tmp_path / ckpt.TRACKER).write_text("200")
    info = ckpt.resolve(tmp_path)
    assert info.origin == "megatron-lm" and info.iteration == 200
    assert info.arch.explicit() == arch.replace(vocab_size=1024).explicit()
    assert info.tokenizer == {"kind": "sentencepiece", "path": "/t.model"}
    loaded = build_model(info.arch, single_rank_runtime)
    ckpt.load_checkpoint(info, model=loaded)
    assert torch.equal(loaded.output_layer.weight, model.output_layer.weight)


def test_megatron_lm_defaults_and_unsupported_args():
    args = Namespace(num_layers=2, hidden_size=64, num_attention_heads=4, padded_vocab_size=128,
                     max_position_embeddings=64)
    arch = ckpt.arch_from_megatron_args(args)
    # Megatron-LM's defaults: LayerNorm, GELU, 4h MLP, learned positions, tied embeddings, biases on.
    assert (arch.normalization, arch.activation, arch.ffn_hidden_size, arch.position_embedding_type) == \
        ("LayerNorm", "gelu", 256, "learned_absolute")
    assert not arch.untie_embeddings_and_output_weights and arch.add_bias_linear
    with pytest.raises(ckpt.CheckpointError, match=r"args.multi_latent_attention=True \(multi-latent attention\)"):
        ckpt.arch_from_megatron_args(Namespace(**vars(args), multi_latent_attention=True))


def test_megatron_args_round_trip():
    for name in ("tiny", "llama3.1-8b", "nemotron4-15b", "qk-norm"):
        arch = preset("tiny", qk_layernorm=True) if name == "qk-norm" else preset(name)
        assert ckpt.arch_from_megatron_args(ckpt.megatron_args_from_arch(arch)).explicit() == arch.explicit()


def test_existing_output_dir_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("user data")
    for overwrite in (False, True):  # user files are never replaced
        with pytest.raises(ConfigError, match="already exists, is not empty and is not a checkpoint"):
            ckpt.check_new_output(tmp_path / "out", overwrite=overwrite)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / ckpt.TRACKER).write_text("release")  # a previous checkpoint: replaced only with overwrite
    with pytest.raises(ConfigError, match="already exists and is not empty.*--overwrite"):
        ckpt.check_new_output(tmp_path / "old")
    assert ckpt.check_new_output(tmp_path / "old", overwrite=True) == tmp_path / "old"
    assert ckpt.check_new_output(tmp_path / "fresh") == tmp_path / "fresh"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        ckpt.check_new_output(tmp_path / "afile", overwrite=True)
