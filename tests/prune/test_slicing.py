"""The per-tensor slicing rules, checked against slicing written another way (reshaped views)."""

from __future__ import annotations

import pytest
import torch

from megatron_minitron.config import preset
from megatron_minitron.plan.plan import Plan, identity_plan
from megatron_minitron.prune.slicing import AxisIndices, PruneError, rename_object, rule_for, slice_full

# 4 layers, hidden 64, ffn 192, 4 heads in 2 groups, kv 16.
SRC = preset("tiny").explicit()


def make_plan(src=SRC, *, layers=None, hidden=None, ffn=None, groups=None, heads=None, head_merge=False) -> Plan:
    """A hand-built plan: per-axis keeps, the same for every kept layer unless lists of lists are given."""
    layers = list(range(src.num_layers)) if layers is None else layers
    hidden = list(range(src.hidden_size)) if hidden is None else hidden
    ffn = list(range(src.ffn_hidden_size)) if ffn is None else ffn
    groups = list(range(src.query_groups)) if groups is None else groups
    n = src.num_attention_heads // src.query_groups
    heads = [g * n + h for g in groups for h in range(n)] if heads is None else heads
    target = src.replace(num_layers=len(layers), hidden_size=len(hidden), ffn_hidden_size=len(ffn),
                         num_attention_heads=len(heads), num_query_groups=len(groups))
    L = len(layers)
    return Plan(source=src, target=target, layers=layers, hidden=hidden, ffn=[ffn] * L, query_groups=[groups] * L,
                heads=[heads] * L, head_merge=head_merge, params_before=src.num_parameters(),
                params_after=target.num_parameters()).validate()


def stacked_shapes(arch) -> dict[str, tuple[int, ...]]:
    """Stored global shapes of a checkpoint of `arch` (stacked layout), as megatron writes them."""
    L, h, f, kv = arch.num_layers, arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    qkv = (arch.num_attention_heads + 2 * arch.query_groups) * kv
    shapes = {"embedding.word_embeddings.weight": (arch.padded_vocab, h),
              "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (L, h),
              "decoder.layers.self_attention.linear_qkv.weight": (L, qkv, h),
              "decoder.layers.self_attention.linear_proj.weight": (L, h, arch.num_attention_heads * kv),
              "decoder.layers.mlp.linear_fc1.layer_norm_weight": (L, h),
              "decoder.layers.mlp.linear_fc1.weight": (L, f * (2 if arch.gated else 1), h),
              "decoder.layers.mlp.linear_fc2.weight": (L, h, f),
              "decoder.final_layernorm.weight": (h,), "output_layer.weight": (arch.padded_vocab, h)}
    if arch.add_bias_linear:
        shapes.update({"decoder.layers.self_attention.linear_qkv.bias": (L, qkv),
                       "decoder.layers.self_attention.linear_proj.bias": (L, h),
                       "decoder.layers.mlp.linear_fc1.bias": (L, f * (2 if arch.gated else 1)),
                       "decoder.layers.mlp.linear_fc2.bias": (L, h)})
    return shapes


def random_tensors(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in stacked_shapes(arch).items()}


def reference_layer(t: dict, plan: Plan, j: int) -> dict[str, torch.Tensor]:
    """Target layer j computed on reshaped [group, slot, channel, hidden] views (independent of the rules)."""
    src = plan.source
    G, n, kv = src.query_groups, src.num_attention_heads // src.query_groups, src.head_dim
    i, hid, ffn = plan.layers[j], torch.tensor(plan.hidden), torch.tensor(plan.ffn[j])
    groups = plan.query_groups[j]
    n_dst = len(plan.heads[j]) // len(groups)
    qkv = t["decoder.layers.self_attention.linear_qkv.weight"][i].reshape(G, n + 2, kv, -1)
    blocks = []
    for tg, g in enumerate(groups):
        local = [h - g * n for h in plan.heads[j][tg * n_dst:(tg + 1) * n_dst]]
        blocks.append(qkv[g, local + [n, n + 1]])
    qkv = torch.stack(blocks).reshape(-1, src.hidden_size)[:, hid]
    proj = t["decoder.layers.self_attention.linear_proj.weight"][i].reshape(src.hidden_size, -1, kv)
    proj = proj[hid][:, list(plan.heads[j])].reshape(len(hid), -1)
    gate, up = t["decoder.layers.mlp.linear_fc1.weight"][i].chunk(2)
    fc1 = torch.cat([gate[ffn], up[ffn]])[:, hid]
    fc2 = t["decoder.layers.mlp.linear_fc2.weight"][i][hid][:, ffn]
    return {"qkv": qkv, "proj": proj, "fc1": fc1, "fc2": fc2}


PLANS = {
    "depth": dict(layers=[0, 2, 3]),
    "hidden": dict(hidden=list(range(0, 64, 2)) + [63]),
    "ffn": dict(ffn=list(range(5, 192, 3))),
    "heads-within-groups": dict(heads=[1, 3]),
    "groups": dict(groups=[1]),
    "all": dict(layers=[1, 3], hidden=list(range(1, 64, 2)), ffn=list(range(0, 192, 2)), groups=[0, 1], heads=[0, 2]),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_rules_match_reshaped_reference(name):
    plan = make_plan(**PLANS[name])
    tensors = random_tensors(SRC)
    out = slice_full(tensors, plan)
    assert {k: tuple(v.shape) for k, v in out.items()} == stacked_shapes(plan.target)
    hid = torch.tensor(plan.hidden)
    for j in range(plan.target.num_layers):
        ref = reference_layer(tensors, plan, j)
        torch.testing.assert_close(out["decoder.layers.self_attention.linear_qkv.weight"][j], ref["qkv"], rtol=0, atol=0)
        torch.testing.assert_close(out["decoder.layers.self_attention.linear_proj.weight"][j], ref["proj"], rtol=0, atol=0)
        torch.testing.assert_close(out["decoder.layers.mlp.linear_fc1.weight"][j], ref["fc1"], rtol=0, atol=0)
        torch.testing.assert_close(out["decoder.layers.mlp.linear_fc2.weight"][j], ref["fc2"], rtol=0, atol=0)
        i = plan.layers[j]
        for norm in ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"):
            assert torch.equal(out[f"decoder.layers.{norm}"][j], tensors[f"decoder.layers.{norm}"][i][hid])
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):  # vocab rows (and padding) kept
        assert torch.equal(out[key], tensors[key][:, hid])
    assert torch.equal(out["decoder.final_layernorm.weight"], tensors["decoder.final_layernorm.weight"][hid])


def test_identity_plan_selects_nothing_and_returns_the_same_values():
    plan = identity_plan(SRC)
    tensors = random_tensors(SRC)
    axes = AxisIndices(plan)
    for key, tensor in tensors.items():
        rule = rule_for(key, tensor.shape, plan, axes)
        assert all(idx is None for idx in rule.index(0)), key
    out = slice_full(tensors, plan)
    assert out.keys() == tensors.keys() and all(torch.equal(out[k], tensors[k]) for k in tensors)


def test_non_glu_biases_and_separate_norm_names():
    src = preset("tiny", activation="gelu", normalization="LayerNorm", add_bias_linear=True).explicit()
    plan = make_plan(src, layers=[0, 3], hidden=list(range(32)), ffn=list(range(0, 192, 4)), heads=[0, 2], groups=[0, 1])
    tensors = random_tensors(src)
    tensors["decoder.layers.input_layernorm.bias"] = torch.randn(4, 64)
    tensors["decoder.layers.pre_mlp_layernorm.weight"] = torch.randn(4, 64)
    out = slice_full(tensors, plan)
    ffn, hid = torch.tensor(plan.ffn[0]), torch.tensor(plan.hidden)
    assert torch.equal(out["decoder.layers.mlp.linear_fc1.bias"], tensors["decoder.layers.mlp.linear_fc1.bias"][[0, 3]][:, ffn])
    assert torch.equal(out["decoder.layers.mlp.linear_fc1.weight"],
                       tensors["decoder.layers.mlp.linear_fc1.weight"][[0, 3]][:, ffn][:, :, hid])
    for key in ("decoder.layers.input_layernorm.bias", "decoder.layers.pre_mlp_layernorm.weight",
                "decoder.layers.mlp.linear_fc2.bias", "decoder.layers.self_attention.linear_proj.bias"):
        assert torch.equal(out[key], tensors[key][[0, 3]][:, hid]), key
    qkv_bias = tensors["decoder.layers.self_attention.linear_qkv.bias"].reshape(4, 2, 4, 16)  # n=2 heads + k + v
    expected = torch.stack([qkv_bias[:, 0, [0, 2, 3]], qkv_bias[:, 1, [0, 2, 3]]], 1)[[0, 3]].reshape(2, -1)
    assert torch.equal(out["decoder.layers.self_attention.linear_qkv.bias"], expected)


def test_qk_layernorm_is_carried_whole_through_head_and_depth_pruning():
    """QK norms ([kv_channels], shared by all heads) keep every channel: only the layer axis is selected,
    whatever heads, groups and hidden channels go (stacked and per-layer layouts alike)."""
    src = preset("tiny", qk_layernorm=True, normalization="LayerNorm").explicit()
    plan = make_plan(src, layers=[0, 2, 3], hidden=list(range(0, 64, 2)), heads=[1, 3], groups=[0, 1])
    tensors = random_tensors(src)
    names = [f"decoder.layers.self_attention.{n}_layernorm.{p}" for n in "qk" for p in ("weight", "bias")]
    tensors.update({name: torch.randn(4, 16) for name in names})
    tensors["decoder.layers.1.self_attention.q_layernorm.weight"] = torch.randn(16)
    tensors["decoder.layers.2.self_attention.q_layernorm.weight"] = torch.randn(16)
    out = slice_full(tensors, plan)
    for name in names:
        assert torch.equal(out[name], tensors[name][[0, 2, 3]]), name
    per_layer = sorted(k for k in out if k.startswith("decoder.layers.") and k.split(".")[2].isdigit())
    assert per_layer == ["decoder.layers.1.self_attention.q_layernorm.weight"]  # source layer 1 is pruned, 2 -> 1
    assert torch.equal(out["decoder.layers.1.self_attention.q_layernorm.weight"],
                       tensors["decoder.layers.2.self_attention.q_layernorm.weight"])
    assert plan.target.qk_layernorm and plan.target.num_parameters() == \
        plan.target.replace(qk_layernorm=False).num_parameters() + 3 * 4 * 16


def test_per_layer_layout_renumbers_layers_and_splits_glu():
    plan = make_plan(layers=[1, 3], ffn=list(range(0, 192, 2)))
    tensors = random_tensors(SRC)
    fc1 = tensors.pop("decoder.layers.mlp.linear_fc1.weight")
    per_layer = {}
    for i in range(4):
        per_layer[f"decoder.layers.{i}.mlp.linear_fc1.weight_w"], per_layer[f"decoder.layers.{i}.mlp.linear_fc1.weight_v"] = fc1[i].chunk(2)
        per_layer[f"decoder.layers.{i}.mlp.linear_fc2.weight"] = tensors["decoder.layers.mlp.linear_fc2.weight"][i]
    out = slice_full(per_layer, plan)
    assert sorted(out) == sorted(f"decoder.layers.{j}.mlp.{n}" for j in (0, 1)
                                 for n in ("linear_fc1.weight_w", "linear_fc1.weight_v", "linear_fc2.weight"))
    ffn = torch.tensor(plan.ffn[0])
    assert torch.equal(out["decoder.layers.1.mlp.linear_fc1.weight_v"], fc1[3].chunk(2)[1][ffn])
    assert torch.equal(out["decoder.layers.0.mlp.linear_fc2.weight"], tensors["decoder.layers.mlp.linear_fc2.weight"][1][:, ffn])


def test_extra_state_objects_are_renamed_with_the_new_layer_axis():
    plan = make_plan(layers=[0, 2, 3])
    name = "decoder.layers.self_attention.linear_qkv._extra_state"
    assert rename_object(f"{name}/shard_2_4", plan) == f"{name}/shard_1_3"
    assert rename_object(f"{name}/shard_1_4", plan) is None
    assert rename_object("decoder.layers.3.mlp.linear_fc1._extra_state/shard_0_1", plan) == \
        "decoder.layers.2.mlp.linear_fc1._extra_state/shard_0_1"
    assert rename_object("output_layer._extra_state/shard_0_1", plan) == "output_layer._extra_state/shard_0_1"
    with pytest.raises(PruneError, match="layer axis of 8"):
        rename_object(f"{name}/shard_2_8", plan)
    with pytest.raises(PruneError, match="'decoder.layers.x._extra_state'"):
        rename_object("decoder.layers.x._extra_state", plan)


def test_unknown_and_mismatched_tensors_are_named():
    plan = make_plan(hidden=list(range(32)))
    axes = AxisIndices(plan)
    with pytest.raises(PruneError, match="'decoder.layers.self_attention.q_norm.weight' is not one"):
        rule_for("decoder.layers.self_attention.q_norm.weight", (4, 16), plan, axes)
    with pytest.raises(PruneError, match="size 32 on its kv_channels dim.*does not belong"):
        rule_for("decoder.layers.self_attention.k_layernorm.weight", (4, 32), plan, axes)
    with pytest.raises(PruneError, match="'mtp.something' is not one"):
        rule_for("mtp.something", (64,), plan, axes)
    with pytest.raises(PruneError, match="size 128 on its hidden dim.*does not belong"):
        rule_for("decoder.final_layernorm.weight", (128,), plan, axes)
    with pytest.raises(PruneError, match="stacked layer axis of 4"):
        rule_for("decoder.layers.mlp.linear_fc2.weight", (6, 64, 192), plan, axes)
    assert rule_for("optimizer.state.exp_avg.decoder.final_layernorm.weight", (64,), plan, axes) is None


def test_head_merge_folds_pruned_heads_by_rank():
    # One group of 4 heads (MHA-like group), keep 2: ranks by score: 2 > 0 > 3 > 1.
    src = preset("tiny", num_query_groups=1).explicit()
    plan = make_plan(src, heads=[0, 2], head_merge=True)
    scores = torch.tensor([[0.8, 0.1, 0.9, 0.5]] * 4)
    axes = AxisIndices(plan, scores)
    # K=2: rank 1 (head 2) absorbs rank 4 (head 1), rank 2 (head 0) absorbs rank 3 (head 3).
    assert sorted(axes.merge_pairs(0)) == [(0, 3), (2, 1)]
    tensors = random_tensors(src)
    out = slice_full(tensors, plan, scores)
    kv = 16
    qkv = tensors["decoder.layers.self_attention.linear_qkv.weight"][0].reshape(6, kv, 64)  # 4 q, k, v
    expected = torch.cat([2 * qkv[0] - qkv[3], 2 * qkv[2] - qkv[1], qkv[4], qkv[5]])
    torch.testing.assert_close(out["decoder.layers.self_attention.linear_qkv.weight"][0], expected)
    proj = tensors["decoder.layers.self_attention.linear_proj.weight"][0].reshape(64, 4, kv)
    expected = torch.cat([2 * proj[:, 0] - proj[:, 3], 2 * proj[:, 2] - proj[:, 1]], 1)
    torch.testing.assert_close(out["decoder.layers.self_attention.linear_proj.weight"][0], expected)
    with pytest.raises(PruneError, match="head merge, which needs the head importance scores"):
        AxisIndices(plan)


def test_row_chunks_compose_to_the_whole():
    plan = make_plan(**PLANS["all"])
    tensors = random_tensors(SRC)
    axes = AxisIndices(plan)
    for key in ("decoder.layers.self_attention.linear_qkv.weight", "decoder.layers.mlp.linear_fc1.weight",
                "embedding.word_embeddings.weight"):
        rule = rule_for(key, tensors[key].shape, plan, axes)
        j = 1 if rule.layered else 0
        layer = tensors[key][rule.source_layer(j)] if rule.layered else tensors[key]
        whole = rule.apply(layer, j)
        parts = []
        for a in range(0, whole.shape[0], 7):
            b = min(a + 7, whole.shape[0])
            s0, s1 = rule.source_rows(j, a, b)
            parts.append(rule.apply(layer[s0:s1], j, rows=(a, b)))
        assert torch.equal(torch.cat(parts), whole), key
