"""The pruned checkpoint is the pruned model: logits at TP2xPP2 (one 4-process torchrun launch that
also prunes, its ranks sharing the work) equal a one-process reference built by slicing the full
source weights another way; identity and depth plans are exact; 1, 2 and 4 workers agree bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_minitron.model import checkpoint as ckpt
from megatron_minitron.prune.rewrite import prune_checkpoint
from tests.conftest import REPO, torchrun
from tests.multirank.prune_equivalence import ARCHS, TOKENS, plans

CASES = [(variant, name) for variant in ARCHS for name in plans(variant)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prune-multirank")
    torchrun(REPO / "tests/multirank/prune_equivalence.py", out, nproc=4, timeout=600)
    return out


def reference_state_dict(src: dict[str, torch.Tensor], plan) -> dict[str, torch.Tensor]:
    """Module parameters of the target model (local spec, TP1) sliced from the global source tensors
    on reshaped [group, slot, channel, hidden] views, without the pruner's rules."""
    s = plan.source
    G, kv = s.query_groups, s.head_dim
    n = s.num_attention_heads // G
    hid = torch.tensor(plan.hidden)
    out = {"embedding.word_embeddings.weight": src["embedding.word_embeddings.weight"][:, hid],
           "decoder.final_layernorm.weight": src["decoder.final_layernorm.weight"][hid]}
    for key in ("embedding.position_embeddings.weight", "output_layer.weight"):
        if key in src:
            out[key] = src[key][:, hid]
    if "decoder.final_layernorm.bias" in src:
        out["decoder.final_layernorm.bias"] = src["decoder.final_layernorm.bias"][hid]
    L = "decoder.layers."
    for j, i in enumerate(plan.layers):
        ffn, groups = torch.tensor(plan.ffn[j]), plan.query_groups[j]
        m = len(plan.heads[j]) // len(groups)
        slots = [[h - g * n for h in plan.heads[j][t * m:(t + 1) * m]] + [n, n + 1] for t, g in enumerate(groups)]

        def qkv_rows(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(G, n + 2, kv, *t.shape[1:])
            return torch.cat([t[g, sl] for g, sl in zip(groups, slots)]).reshape(-1, *t.shape[3:])

        p = f"{L}{j}."
        out[p + "input_layernorm.weight"] = src[L + "self_attention.linear_qkv.layer_norm_weight"][i][hid]
        out[p + "pre_mlp_layernorm.weight"] = src[L + "mlp.linear_fc1.layer_norm_weight"][i][hid]
        out[p + "self_attention.linear_qkv.weight"] = qkv_rows(src[L + "self_attention.linear_qkv.weight"][i])[:, hid]
        proj = src[L + "self_attention.linear_proj.weight"][i].reshape(s.hidden_size, -1, kv)
        out[p + "self_attention.linear_proj.weight"] = proj[hid][:, list(plan.heads[j])].flatten(1)
        fc1 = src[L + "mlp.linear_fc1.weight"][i]
        fc1 = torch.cat([half[ffn] for half in fc1.chunk(2)]) if s.gated else fc1[ffn]
        out[p + "mlp.linear_fc1.weight"] = fc1[:, hid]
        out[p + "mlp.linear_fc2.weight"] = src[L + "mlp.linear_fc2.weight"][i][hid][:, ffn]
        if s.has_norm_bias:
            out[p + "input_layernorm.bias"] = src[L + "self_attention.linear_qkv.layer_norm_bias"][i][hid]
            out[p + "pre_mlp_layernorm.bias"] = src[L + "mlp.linear_fc1.layer_norm_bias"][i][hid]
        if s.add_bias_linear:
            out[p + "self_attention.linear_qkv.bias"] = qkv_rows(src[L + "self_attention.linear_qkv.bias"][i])
            out[p + "self_attention.linear_proj.bias"] = src[L + "self_attention.linear_proj.bias"][i][hid]
            fc1_bias = src[L + "mlp.linear_fc1.bias"][i]
            out[p + "mlp.linear_fc1.bias"] = fc1_bias[ffn] if not s.gated else \
                torch.cat([half[ffn] for half in fc1_bias.chunk(2)])
            out[p + "mlp.linear_fc2.bias"] = src[L + "mlp.linear_fc2.bias"][i][hid]
    return out


@pytest.fixture(scope="module")
def source_tensors(launched):
    return {v: ckpt.read_tensors(ckpt.resolve(launched / f"src_{v}").path) for v in ARCHS}


@pytest.mark.parametrize("variant,name", CASES)
def test_logits_equal_the_sliced_reference(launched, source_tensors, single_rank_runtime, variant, name):
    from megatron_minitron.model.build import build_model
    from megatron_minitron.model.forward import forward_logits

    plan = plans(variant)[name]
    info = ckpt.resolve(launched / f"pruned_{variant}_{name}")
    assert info.arch == plan.target.explicit()
    model = build_model(plan.target, single_rank_runtime)
    expected = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    reference = reference_state_dict(source_tensors[variant], plan)
    assert set(reference) == expected
    model.load_state_dict(reference, strict=False)
    positions = torch.arange(TOKENS.shape[1]).expand_as(TOKENS)
    want = forward_logits(model, TOKENS, positions, single_rank_runtime)
    got = torch.load(launched / f"logits_{variant}_{name}.pt")
    assert got.shape == want.shape
    rel = (got - want).abs().max() / want.abs().max()
    assert rel <= 1e-5, f"{variant}/{name}: relative logits error {rel:.2e}"


@pytest.mark.parametrize("variant", sorted(ARCHS))
def test_identity_is_bit_identical_and_depth_drops_layers(launched, source_tensors, variant):
    src = source_tensors[variant]
    same = ckpt.read_tensors(ckpt.resolve(launched / f"pruned_{variant}_identity").path)
    assert same.keys() == src.keys()
    assert all(torch.equal(same[k], src[k]) for k in src)
    depth = ckpt.read_tensors(ckpt.resolve(launched / f"pruned_{variant}_depth").path)
    for key, tensor in src.items():
        expected = tensor[[0, 3]] if key.startswith("decoder.layers.") else tensor
        assert torch.equal(depth[key], expected), key
    names = set(ckpt.tensor_shapes(ckpt.resolve(launched / f"pruned_{variant}_depth").path))
    from torch.distributed.checkpoint import FileSystemReader

    objects = {k for k in FileSystemReader(str(ckpt.resolve(launched / f"pruned_{variant}_depth").path))
               .read_metadata().state_dict_metadata} - names
    assert objects == {f"decoder.layers.{m}._extra_state/shard_{j}_2" for j in (0, 1) for m in
                       ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")}


def test_one_two_and_four_workers_write_the_same_tensors(launched, tmp_path):
    """... and the checksums each worker (or rank) recorded while writing its shard equal a re-hash."""
    from megatron_minitron.model.integrity import CHECKSUMS, compute_checksums

    plan = plans("swiglu")["all"]
    four_path = ckpt.resolve(launched / "pruned_swiglu_all").path
    four = ckpt.read_tensors(four_path)
    outputs = [four_path]
    for workers in (1, 2):
        out = prune_checkpoint(launched / "src_swiglu", plan, tmp_path / f"w{workers}", workers=workers,
                               chunk_bytes=4096 * workers, print_fn=lambda s: None)
        got = ckpt.read_tensors(out)
        assert got.keys() == four.keys()
        assert all(torch.equal(got[k], four[k]) for k in four)
        outputs.append(out)
    for out in outputs:
        recorded = json.loads((out / CHECKSUMS).read_text())
        assert recorded == compute_checksums(out) and len([n for n in recorded["files"] if n.endswith(".distcp")]) \
            == {four_path: 4, outputs[-1]: 2}.get(out, 1), out


def test_pruned_checkpoint_describes_itself(launched):
    info = ckpt.resolve(launched / "pruned_gelu_all")
    plan = plans("gelu")["all"]
    assert info.metadata["plan"] == plan.to_json()
    assert info.metadata["provenance"]["scores"] == {"note": "hand-built test plan"}
    assert info.metadata["num_parameters"] == plan.target.num_parameters()
    assert Path(info.tokenizer["path"]).read_bytes() == b"a tokenizer file the pruner must copy"
    args = ckpt.load_common(info.path)["args"]
    assert ckpt.arch_from_megatron_args(args) == plan.target.explicit()
