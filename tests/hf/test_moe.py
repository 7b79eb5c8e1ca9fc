"""The Mixture-of-Experts families (Qwen3-MoE, Mixtral): the routing megatron-core builds from the imported
config is transformers' (checked on the routers themselves), Qwen3-MoE's norm_topk_prob=False maps to
pre-softmax routing, and the architecture carries the experts. Logits at TP1 and the export round trip are
in test_import.py / test_export.py with every other family; EP2, TP2+SP and TP2xPP2+SP in test_hf_multirank.py."""

from __future__ import annotations

import pytest
import torch

from megatron_minitron.model import checkpoint as ckpt
from tests.hf import models

pytest.importorskip("transformers", reason="the Hugging Face tests need transformers (pip install -e .[test])")


def test_moe_architecture_fields(hf_cases):
    qwen = ckpt.resolve(hf_cases["qwen3-moe"]["ckpt"]).arch
    assert (qwen.num_experts, qwen.moe_router_topk, qwen.moe_ffn_hidden_size, qwen.ffn_hidden_size) == (4, 2, 32, 96)
    assert qwen.qk_layernorm and not qwen.moe_router_pre_softmax and qwen.moe_topk_renormalized
    assert all(qwen.moe_layers) and qwen.moe_shared_expert_ffn_hidden_size is None
    mixtral = ckpt.resolve(hf_cases["mixtral"]["ckpt"]).arch
    assert (mixtral.num_experts, mixtral.moe_router_topk, mixtral.expert_ffn_hidden_size) == (4, 2, 64)
    assert not mixtral.qk_layernorm and not mixtral.moe_router_pre_softmax
    shapes = ckpt.tensor_shapes(ckpt.resolve(hf_cases["mixtral"]["ckpt"]).path)
    assert shapes["decoder.layers.mlp.experts.experts.linear_fc1.weight"] == (2, 4, 128, 64)
    assert shapes["decoder.layers.mlp.router.weight"] == (2, 4, 64)
    for name in models.MOE_CASES:  # the Megatron-LM args of common.pt name the experts and read back the same
        info = ckpt.resolve(hf_cases[name]["ckpt"])
        args = torch.load(info.path / "common.pt", weights_only=False)["args"]
        assert (args.num_experts, args.moe_router_topk, args.moe_grouped_gemm) == (4, 2, False)
        assert ckpt.arch_from_megatron_args(args).replace(init_method_std=info.arch.init_method_std) == info.arch


def _compare_routers(model, hf, arch) -> None:
    """Every layer's megatron TopKRouter and transformers router give the same top-k probabilities on the same
    hidden states, and both equal a softmax over the top-k logits (renormalised routing) or the top-k of the
    softmax over all experts (pre-softmax routing), computed here from the router weight."""
    routers = [m for m in model.modules() if type(m).__name__ == "TopKRouter"]
    assert len(routers) == arch.num_layers
    hidden = torch.randn(24, 2, arch.hidden_size, generator=torch.Generator().manual_seed(5))
    for layer, router in enumerate(routers):
        with torch.no_grad():
            probs, routing_map = router(hidden)
            gate = hf.model.layers[layer].mlp.gate
            _, scores, indices = gate(hidden)
        theirs = torch.zeros_like(probs).scatter(1, indices, scores.float())
        assert torch.equal(routing_map, theirs > 0)
        torch.testing.assert_close(probs, theirs, rtol=1e-6, atol=1e-7)
        logits = hidden.reshape(-1, arch.hidden_size) @ gate.weight.t()
        top, chosen = logits.topk(arch.moe_router_topk, dim=-1)
        if arch.moe_router_pre_softmax:
            expected = logits.softmax(-1).gather(1, chosen)
        else:
            expected = top.softmax(-1)
        torch.testing.assert_close(probs.gather(1, chosen), expected, rtol=1e-6, atol=1e-7)
        assert probs.sum(-1).sub(1).abs().max() < 1e-6 if arch.moe_topk_renormalized else probs.sum(-1).max() < 1


@pytest.mark.parametrize("name", models.MOE_CASES)
def test_routing_equals_transformers(hf_cases, megatron_logits, name):
    _, model = megatron_logits(hf_cases[name]["ckpt"])
    model.eval()
    _compare_routers(model, models.hf_model(name), ckpt.resolve(hf_cases[name]["ckpt"]).arch)


def test_qwen3_moe_without_topk_renormalisation(megatron_logits, tmp_path):
    """norm_topk_prob=False (transformers' default for qwen3_moe; Qwen2-MoE-style) is pre-softmax routing:
    the logits, the routers and an export's config all follow it."""
    import json

    from megatron_minitron.hf.exporter import export_hf
    from megatron_minitron.hf.importer import import_hf

    logits = models.save_case("qwen3-moe", tmp_path / "hf", norm_topk_prob=False)
    import_hf(tmp_path / "hf", tmp_path / "ckpt", print_fn=lambda _: None)
    arch = ckpt.resolve(tmp_path / "ckpt").arch
    assert arch.moe_router_pre_softmax and not arch.moe_topk_renormalized
    ours, model = megatron_logits(tmp_path / "ckpt")
    assert models.rel_error(ours, logits) <= 1e-4
    model.eval()
    _compare_routers(model, models.hf_model("qwen3-moe", norm_topk_prob=False), arch)
    export_hf(tmp_path / "ckpt", tmp_path / "out", print_fn=lambda _: None)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["norm_topk_prob"] is False and config["num_experts"] == 4 and "num_local_experts" not in config


@pytest.mark.parametrize("name", models.MOE_CASES)
def test_import_writes_what_megatron_saves(hf_cases, single_rank_runtime, tmp_path, name):
    """The imported checkpoint holds exactly the keys (expert tensors, router, per-expert `_extra_state`
    objects) and shapes megatron-core itself saves for the model, and the model megatron loads from it saves
    every tensor back bit-identical."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_minitron.model.build import build_model

    info = ckpt.resolve(hf_cases[name]["ckpt"])
    model = build_model(info.arch, single_rank_runtime, use_te=False)
    ckpt.load_checkpoint(info, model=model)
    ckpt.save_checkpoint(tmp_path / "saved", model=model, arch=info.arch, runtime=single_rank_runtime, iteration=None)
    saved = ckpt.resolve(tmp_path / "saved")

    def keys(path):
        return {k for k in FileSystemReader(str(path)).read_metadata().state_dict_metadata if not k.startswith("rng")}

    assert keys(info.path) == keys(saved.path)
    ours, theirs = ckpt.read_tensors(info.path), ckpt.read_tensors(saved.path)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("change, match", [
    (dict(moe_layer_freq=(0, 1, 1, 1)), r"a mixtral model has moe_layer_freq=1; this checkpoint has "
                                        r"moe_layer_freq=\(0, 1, 1, 1\)"),
    (dict(moe_shared_expert_ffn_hidden_size=32), r"a mixtral model has moe_shared_expert_ffn_hidden_size=None"),
    (dict(moe_router_score_function="sigmoid"), r"a mixtral model has moe_router_score_function='softmax'"),
    (dict(moe_router_pre_softmax=True), r"a mixtral model has moe_router_pre_softmax=False"),
])
def test_moe_architectures_the_families_cannot_hold(change, match):
    """What a MoE model trained here may have and neither HF family can express is named before any work
    (Qwen3-MoE takes pre-softmax routing: norm_topk_prob=False)."""
    from megatron_minitron.config import preset
    from megatron_minitron.hf.families import MIXTRAL, QWEN3_MOE, infer_family
    from megatron_minitron.hf.files import HFError

    arch = preset("tiny-moe", **change)
    assert infer_family(arch) is MIXTRAL and infer_family(arch.replace(qk_layernorm=True)) is QWEN3_MOE
    with pytest.raises(HFError, match=match):
        MIXTRAL.check_exportable(arch)
    if "moe_router_pre_softmax" in change:
        assert QWEN3_MOE.config_from_arch(arch.replace(qk_layernorm=True))["norm_topk_prob"] is False
    else:
        with pytest.raises(HFError, match=match.replace("mixtral", "qwen3_moe")):
            QWEN3_MOE.check_exportable(arch.replace(qk_layernorm=True))
