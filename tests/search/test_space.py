"""Search-space enumeration: the candidates equal an independent brute-force enumeration, every one is
within the budget tolerance and valid for the layout, and bad spaces are refused with the reason."""

from __future__ import annotations

import itertools

import pytest

from megatron_minitron.config import ConfigError, preset
from megatron_minitron.search.space import SearchSpace, enumerate_candidates

SOURCE = preset("small")  # 8 layers, hidden 256, ffn 768, 8 heads in 4 groups, vocab 8192


def brute_force(space: dict, budget: int, tolerance: float, tp: int, pp: int) -> set[str]:
    """Written from the rules, not from the code: GQA (heads a multiple of groups, at most the source's
    heads per group), TP divides heads, groups and ffn, PP stages get at least one layer."""
    names = set()
    per_group = SOURCE.num_attention_heads // SOURCE.query_groups
    for L, h, f, H, G in itertools.product(*space.values()):
        if H % G or H // G > per_group or H % tp or G % tp or f % tp or L < pp:
            continue
        params = SOURCE.explicit().replace(num_layers=L, hidden_size=h, ffn_hidden_size=f, num_attention_heads=H,
                                           num_query_groups=G).num_parameters()
        if abs(params - budget) <= tolerance * budget:
            names.add(f"L{L}-h{h}-f{f}-H{H}-G{G}")
    return names


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (4, 2)])
def test_candidates_equal_an_independent_enumeration(tp, pp):
    space = {"num_layers": (8, 6, 4, 1), "hidden_size": (256, 192, 128), "ffn_hidden_size": (768, 510, 384),
             "num_attention_heads": (8, 6, 4, 2), "num_query_groups": (4, 2, 1)}
    budget = SOURCE.num_parameters() // 2
    candidates, removed = enumerate_candidates(SOURCE, SearchSpace(**space), budget=budget, tolerance=0.1,
                                               tensor_parallel=tp, pipeline_parallel=pp)
    expected = brute_force(space, budget, 0.1, tp, pp)
    assert {c.name for c in candidates} == expected and expected
    assert len(candidates) + sum(removed.values()) == 4 * 3 * 3 * 4 * 3
    for c in candidates:
        assert abs(c.params - budget) <= 0.1 * budget


def test_default_grid_is_the_papers_style():
    space = SearchSpace.default(SOURCE)
    assert space.num_layers == (8, 7, 6) and space.hidden_size == (256, 224, 192, 160, 128)
    assert space.ffn_hidden_size == (768, 672, 576, 480, 384) and space.num_query_groups is None
    candidates, _ = enumerate_candidates(SOURCE, space, budget=SOURCE.num_parameters() // 2, tensor_parallel=2)
    assert candidates and all(c.sizes["num_query_groups"] == 4 for c in candidates)


def test_bad_spaces_are_refused_with_the_reason():
    budget = SOURCE.num_parameters() // 2
    with pytest.raises(ConfigError, match="larger than the source model"):
        enumerate_candidates(SOURCE, SearchSpace(), budget=SOURCE.num_parameters() + 1)
    with pytest.raises(ConfigError, match="hidden_size value 300 is outside 1..256"):
        enumerate_candidates(SOURCE, SearchSpace(hidden_size=(300,)), budget=budget)
    candidates, removed = enumerate_candidates(SOURCE, SearchSpace(num_attention_heads=(6, 3)), budget=budget,
                                               tensor_parallel=4)
    assert not candidates and sum(removed.values()) == 2 and len(removed) >= 1
    from megatron_minitron.search.space import explain_empty

    message = explain_empty(removed, 2)
    assert message.startswith("no candidate left: of 2 combinations") and "widen the space" in message


# ------------------------------------------------------------------------------ Mixture-of-Experts axes
def moe_parameters(arch, *, active: bool, **sizes) -> int:
    """Written from the architecture, not from ArchConfig's counter: RMSNorm, SwiGLU experts, no biases, every
    layer MoE, rotary positions. A token's path holds top-k experts; the model holds them all."""
    a = {"num_layers": arch.num_layers, "hidden_size": arch.hidden_size,
         "num_attention_heads": arch.num_attention_heads, "num_query_groups": arch.query_groups, "num_experts": arch.num_experts,
         "moe_ffn_hidden_size": arch.moe_ffn_hidden_size, **sizes}
    h, kv, E, w = a["hidden_size"], arch.head_dim, a["num_experts"], a["moe_ffn_hidden_size"]
    attention = h * kv * (a["num_attention_heads"] + 2 * a["num_query_groups"]) + a["num_attention_heads"] * kv * h
    experts = (arch.moe_router_topk if active else E) * 3 * h * w
    layer = 2 * h + attention + (2 * kv if arch.qk_layernorm else 0) + E * h + experts
    vocab = -(-arch.vocab_size // arch.make_vocab_size_divisible_by) * arch.make_vocab_size_divisible_by
    embeddings = vocab * h * (2 if arch.untie_embeddings_and_output_weights else 1)
    return a["num_layers"] * layer + h + embeddings


@pytest.mark.parametrize("name", ["tiny-moe", "qwen3-30b-a3b"])
def test_independent_moe_count_matches_the_presets(name):
    arch = preset(name)
    assert moe_parameters(arch, active=False) == arch.num_parameters()
    assert moe_parameters(arch, active=True) == arch.num_active_parameters()


MOE_SPACE = {"num_layers": (4, 3), "hidden_size": (64, 48), "num_experts": (4, 3, 2, 1),
             "moe_ffn_hidden_size": (64, 48, 36, 30)}


def moe_brute_force(arch, space: dict, budget: int, kind: str, tp: int, ep: int) -> set[str]:
    names = set()
    for L, h, E, w in itertools.product(*space.values()):
        if E < arch.moe_router_topk or E % ep or w % tp or arch.num_attention_heads % tp:
            continue
        params = moe_parameters(arch, active=kind == "active", num_layers=L, hidden_size=h, num_experts=E,
                                moe_ffn_hidden_size=w)
        if abs(params - budget) <= 0.1 * budget:
            names.add(f"L{L}-h{h}-f{arch.ffn_hidden_size}-H4-G2-E{E}-e{w}")
    return names


@pytest.mark.parametrize("kind, tp, ep", [("total", 1, 1), ("active", 1, 1), ("active", 2, 2), ("total", 2, 4)])
def test_moe_candidates_equal_an_independent_enumeration(kind, tp, ep):
    arch = preset("tiny-moe")  # 4 layers, hidden 64, 4 heads in 2 groups, 4 experts of width 64, top-2
    budget = int(0.7 * (arch.num_active_parameters() if kind == "active" else arch.num_parameters()))
    candidates, removed = enumerate_candidates(arch, SearchSpace(**MOE_SPACE), budget=budget, tolerance=0.1,
                                               tensor_parallel=tp, expert_parallel=ep, budget_kind=kind)
    expected = moe_brute_force(arch, MOE_SPACE, budget, kind, tp, ep)
    assert {c.name for c in candidates} == expected and expected
    assert len(candidates) + sum(removed.values()) == 2 * 2 * 4 * 4
    assert removed["fewer experts than the router's top-k"] == 2 * 2 * 4  # every E=1 combination
    if ep == 4:  # only E=4 divides: the E=3 and E=2 combinations go by that rule
        assert removed["experts not divisible by the expert-parallel size"] == 2 * 2 * 2 * 4
    for c in candidates:
        assert c.active_params == moe_parameters(arch, active=True, **{k: c.sizes[k] for k in MOE_SPACE})
        assert c.params == moe_parameters(arch, active=False, **{k: c.sizes[k] for k in MOE_SPACE})
        counted = c.active_params if kind == "active" else c.params
        assert abs(counted - budget) <= 0.1 * budget


def test_active_budget_on_qwen3_30b_a3b():
    """At an active budget of 2B (from 3.35B), the number of experts barely moves the active count (only the
    router), so candidates differing only in experts all fit: 9 candidates of 6.7B to 17.3B parameters in total,
    none of which a 2B total budget admits."""
    arch = preset("qwen3-30b-a3b")
    space = SearchSpace(num_layers=(48, 40, 36), num_experts=(128, 96, 64), moe_ffn_hidden_size=(768, 576, 384),
                        hidden_size=(2048, 1792, 1536))
    candidates, removed = enumerate_candidates(arch, space, budget=2_000_000_000, tolerance=0.05, tensor_parallel=2,
                                               expert_parallel=8, budget_kind="active")
    names = {c.name for c in candidates}
    expected = set()
    for L, h, E, w in itertools.product((48, 40, 36), (2048, 1792, 1536), (128, 96, 64), (768, 576, 384)):
        active = moe_parameters(arch, active=True, num_layers=L, hidden_size=h, num_experts=E, moe_ffn_hidden_size=w)
        if abs(active - 2e9) <= 0.05 * 2e9:
            expected.add(f"L{L}-h{h}-f6144-H32-G4-E{E}-e{w}")
    assert names == expected and len(names) == 9 and sum(removed.values()) == 81 - 9
    assert {c.sizes["num_experts"] for c in candidates} == {128, 96, 64}
    totals = sorted(c.params for c in candidates)
    assert totals[-1] - totals[0] > 10e9 and all(abs(c.active_params - 2e9) <= 1e8 for c in candidates)
    by_total, _ = enumerate_candidates(arch, space, budget=2_000_000_000, tolerance=0.05, tensor_parallel=2,
                                       expert_parallel=8)
    assert not by_total  # no candidate of this space has 2B parameters in total


def test_default_moe_grid_and_bad_moe_spaces():
    arch = preset("tiny-moe")
    space = SearchSpace.default(arch)
    # every layer is MoE: no dense MLP to shrink; experts 100/75/50%, expert width 100-50% in eighths
    assert space.ffn_hidden_size is None and space.num_experts == (4, 3, 2)
    assert space.moe_ffn_hidden_size == (64, 56, 48, 40, 32)
    assert SearchSpace.default(preset("small")).num_experts is None
    with pytest.raises(ConfigError, match="search space axis num_experts needs a Mixture-of-Experts source"):
        enumerate_candidates(SOURCE, SearchSpace(num_experts=(2,)), budget=SOURCE.num_parameters() // 2)
    with pytest.raises(ConfigError, match="num_experts value 8 is outside 1..4"):
        enumerate_candidates(arch, SearchSpace(num_experts=(8,)), budget=arch.num_parameters() // 2)
    with pytest.raises(ConfigError, match="moe_ffn_hidden_size value 96 is outside 1..64"):
        enumerate_candidates(arch, SearchSpace(moe_ffn_hidden_size=(96,)), budget=arch.num_parameters() // 2)
    with pytest.raises(ConfigError, match=r"larger than the source model \([0-9,]+ active parameters\)"):
        enumerate_candidates(arch, space, budget=arch.num_active_parameters() + 1, budget_kind="active")


def test_moe_candidates_become_targets_with_the_pruner_field_names():
    from megatron_minitron.plan.target import Target

    arch = preset("tiny-moe")
    candidates, _ = enumerate_candidates(arch, SearchSpace(num_experts=(2,), moe_ffn_hidden_size=(32,)),
                                         budget=arch.num_parameters() // 2, tolerance=0.5)
    (candidate,) = candidates
    assert candidate.name == "L4-h64-f192-H4-G2-E2-e32"
    target = candidate.target("bi")
    assert isinstance(target, Target) and (target.num_experts, target.moe_ffn_hidden_size) == (2, 32)
    dense, _ = enumerate_candidates(SOURCE, SearchSpace(hidden_size=(192,)), budget=SOURCE.num_parameters() * 3 // 4,
                                    tolerance=0.2)
    assert dense[0].target().to_json() == {"num_layers": 8, "hidden_size": 192, "ffn_hidden_size": 768,
                                           "num_attention_heads": 8, "num_query_groups": 4}
