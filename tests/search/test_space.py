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
