"""Kept indices of make_plan equal a brute-force reference that ranks by counting, with many ties."""

from __future__ import annotations

import pytest
import torch

from megatron_minitron.config import ArchConfig, preset
from megatron_minitron.plan import Target, make_plan, top_k


def reference_top_k(values, k: int) -> list[int]:
    """Index i is kept iff fewer than k entries beat it: a higher value, or an equal one at a lower index."""
    values = [float(v) for v in values]
    return [i for i, v in enumerate(values)
            if sum(1 for j, w in enumerate(values) if w > v or (w == v and j < i)) < k]


def reference_plan(scores, target_arch: ArchConfig, layers: list[int]) -> dict:
    """Every axis ranked independently with the counting reference; heads within each kept group."""
    src = scores.arch.explicit()
    per_src = src.num_attention_heads // src.query_groups
    per_dst = target_arch.num_attention_heads // target_arch.query_groups
    groups = [reference_top_k(scores["query_groups"][l].tolist(), target_arch.query_groups) for l in layers]
    heads = []
    for l, kept in zip(layers, groups):
        row = scores["heads"][l].tolist()
        heads.append([g * per_src + i for g in kept
                      for i in reference_top_k(row[g * per_src:(g + 1) * per_src], per_dst)])
    return {"hidden": reference_top_k(scores["hidden"].tolist(), target_arch.hidden_size),
            "ffn": [reference_top_k(scores["ffn"][l].tolist(), target_arch.ffn_hidden_size) for l in layers],
            "query_groups": groups, "heads": heads}


def test_top_k_hand_made_ties():
    assert top_k(torch.tensor([1.0, 3.0, 3.0, 2.0, 0.0, 3.0]), 3) == [1, 2, 5]
    assert top_k(torch.tensor([1.0, 3.0, 3.0, 2.0, 0.0, 3.0]), 2) == [1, 2]
    assert top_k(torch.tensor([0.0, 0.0, 0.0, 0.0]), 2) == [0, 1]
    assert top_k(torch.tensor([0.25, -1.0, 0.25, 7.0]), 4) == [0, 1, 2, 3]


@pytest.mark.parametrize("seed", range(20))
def test_top_k_equals_reference_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 4, (37,), generator=g).to(torch.bfloat16 if seed % 2 else torch.float32)
    for k in (1, 5, 18, 36, 37):
        assert top_k(values, k) == reference_top_k(values.float().tolist(), k)


GQA8 = ArchConfig(num_layers=5, hidden_size=96, ffn_hidden_size=80, num_attention_heads=8, num_query_groups=2,
                  kv_channels=16, vocab_size=300)
MHA = ArchConfig(num_layers=3, hidden_size=48, ffn_hidden_size=96, num_attention_heads=6, vocab_size=500,
                 normalization="LayerNorm", activation="gelu", position_embedding_type="learned_absolute",
                 max_position_embeddings=64, untie_embeddings_and_output_weights=False, add_bias_linear=True)


@pytest.mark.parametrize("arch, target", [
    (preset("tiny"), Target(num_layers=2, hidden_size=40, ffn_hidden_size=100, num_attention_heads=2,
                            num_query_groups=1)),
    (preset("tiny"), Target(num_attention_heads=2)),
    (preset("tiny"), Target(num_query_groups=1)),
    (preset("tiny"), Target(hidden_size=1, ffn_hidden_size=1, num_layers=1)),
    (GQA8, Target(num_attention_heads=4, ffn_hidden_size=33, hidden_size=50, num_layers=3)),
    (GQA8, Target(num_attention_heads=3, num_query_groups=1)),
    (MHA, Target(num_attention_heads=4, hidden_size=32, ffn_hidden_size=64, num_layers=2)),
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_make_plan_equals_brute_force(make_scores, arch, target, seed):
    scores = make_scores(arch, seed=seed, ties=True)
    plan = make_plan(scores, target)
    layers = reference_top_k(scores["layers_bi"].tolist(), plan.target.num_layers)
    assert list(plan.layers) == layers
    expected = reference_plan(scores, plan.target, layers)
    assert list(plan.hidden) == expected["hidden"]
    assert [list(r) for r in plan.ffn] == expected["ffn"]
    assert [list(r) for r in plan.query_groups] == expected["query_groups"]
    assert [list(r) for r in plan.heads] == expected["heads"]


def test_heads_hand_made_within_groups(make_scores):
    # tiny: 4 heads in 2 groups (heads 0,1 | 2,3). Keep one head per group: the best of each group, ties low.
    arch = preset("tiny")
    heads = torch.tensor([[1.0, 2.0, 9.0, 9.0]] * 4)
    groups = torch.tensor([[0.5, 0.5]] * 4)
    plan = make_plan(make_scores(arch, heads=heads, query_groups=groups), Target(num_attention_heads=2))
    assert plan.heads == ((1, 2),) * 4 and plan.query_groups == ((0, 1),) * 4
    # One group of two heads: the tie between groups goes to group 0, which keeps both its heads,
    # although heads 2 and 3 score higher (whole groups are ranked by the group score).
    plan = make_plan(make_scores(arch, heads=heads, query_groups=groups), Target(num_query_groups=1))
    assert plan.query_groups == ((0,),) * 4 and plan.heads == ((0, 1),) * 4


def test_default_heads_and_groups_follow_the_gqa_rules(make_scores):
    assert make_plan(make_scores(GQA8), Target(num_query_groups=1)).target.num_attention_heads == 4
    assert make_plan(make_scores(GQA8), Target(num_attention_heads=4)).target.query_groups == 2
    mha = make_plan(make_scores(MHA), Target(num_attention_heads=4)).target
    assert (mha.num_attention_heads, mha.query_groups) == (4, 4)


def test_target_architecture_keeps_head_width_explicitly(make_scores):
    plan = make_plan(make_scores(MHA), Target(hidden_size=24, num_attention_heads=4))
    assert plan.target.kv_channels == 8 == MHA.head_dim != 24 // 4
    assert plan.target == MHA.explicit().replace(hidden_size=24, num_attention_heads=4, num_query_groups=4)


def test_empty_target_is_the_identity(make_scores):
    plan = make_plan(make_scores(GQA8, ties=True), Target())
    assert plan.is_identity() and plan.params_after == plan.params_before
    assert plan.heads == (tuple(range(8)),) * 5 and plan.scores["layer_metric"] == "none"
