"""Plans round-trip through JSON; tampered files are refused; parameter counts are exact."""

from __future__ import annotations

import json

import pytest

from megatron_minitron.config import ArchConfig, preset
from megatron_minitron.plan import PlanError, Target, identity_plan, load_plan, make_plan, random_plan

TINY = preset("tiny")
GELU = ArchConfig(num_layers=3, hidden_size=48, ffn_hidden_size=96, num_attention_heads=6, vocab_size=500,
                  normalization="LayerNorm", activation="gelu", position_embedding_type="learned_absolute",
                  max_position_embeddings=64, untie_embeddings_and_output_weights=False, add_bias_linear=True)


@pytest.fixture
def tiny_plan(make_scores):
    return make_plan(make_scores(TINY), Target(num_layers=2, hidden_size=32, ffn_hidden_size=96,
                                               num_attention_heads=2, num_query_groups=2), tensor_parallel=2)


def test_round_trip(tiny_plan, tmp_path):
    path = tiny_plan.save(tmp_path / "plan.json")
    assert not (tmp_path / "plan.json.partial").exists()
    loaded = load_plan(path)
    assert loaded == tiny_plan and loaded.to_json() == tiny_plan.to_json()
    assert json.loads(path.read_text())["source_fingerprint"] == TINY.explicit().fingerprint()


def tamper(plan, tmp_path, edit) -> str:
    data = plan.to_json()
    edit(data)
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(data))
    return path


def _edit_source(data):
    data["source"]["hidden_size"] = 128


def _move_head(data):
    data["heads"][0] = [0, 1]  # two heads of source group 0, but target group 1 is source group 1


def _swap_groups(data):
    data["query_groups"][1] = [1, 0]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(source_fingerprint="0" * 16), "does not match its source architecture"),
    (_edit_source, "does not match its source architecture"),
    (lambda d: d.pop("source_fingerprint"), "plan lacks ['source_fingerprint']"),
    (_move_head, "heads[0] of target group 1 must all belong to source group 1"),
    (lambda d: d["ffn"][1].pop(), "plan ffn[1] (source layer"),
    (lambda d: d["hidden"].append(63), "plan hidden keeps 33 indices, but the target needs 32"),
    (lambda d: d["layers"].pop(), "plan layers keeps 1 indices, but the target needs 2"),
    (lambda d: d["heads"].pop(), "plan heads has 1 rows; one per kept layer (2) is needed"),
    (_swap_groups, "must be sorted and unique"),
    (lambda d: d["hidden"].__setitem__(-1, 64), "must lie in [0, 64)"),
    (lambda d: d.update(params_after=d["params_after"] - 1), "params_after="),
    (lambda d: d.pop("params_before"), "plan lacks ['params_before']"),
    (lambda d: d.update(extra=1), "unknown plan keys ['extra']"),
])
def test_tampered_plan_is_refused(tiny_plan, tmp_path, edit, message):
    with pytest.raises(PlanError) as info:
        load_plan(tamper(tiny_plan, tmp_path, edit))
    assert message in str(info.value)


def test_not_a_plan_file(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "nope.json")
    (tmp_path / "cut.json").write_text('{"format": "megatron-minitron-plan/1", "la')
    with pytest.raises(PlanError, match="is not valid JSON"):
        load_plan(tmp_path / "cut.json")


def test_tiny_parameter_counts_by_hand(make_scores):
    # tiny: 4 layers, h=64, ffn=192 (SwiGLU), 4 heads, 2 groups, head width 16, vocab 1000 -> 1024, RMSNorm, untied.
    # layer: 2 norms 128 + qkv 64*16*(4+2*2) 8192 + proj 4*16*64 4096 + fc1 2*192*64 24576 + fc2 192*64 12288
    before = 4 * (128 + 8192 + 4096 + 24576 + 12288) + 64 + 2 * 1024 * 64
    # target: 2 layers, h=32, ffn=96, 2 heads in 1 group, head width stays 16.
    # layer: 2 norms 64 + qkv 32*16*(2+2) 2048 + proj 2*16*32 1024 + fc1 2*96*32 6144 + fc2 96*32 3072
    after = 2 * (64 + 2048 + 1024 + 6144 + 3072) + 32 + 2 * 1024 * 32
    plan = make_plan(make_scores(TINY), Target(num_layers=2, hidden_size=32, ffn_hidden_size=96,
                                               num_attention_heads=2, num_query_groups=1))
    assert (plan.params_before, plan.params_after) == (before, after) == (328256, 90272)
    assert plan.params_after == plan.target.num_parameters()


def test_gelu_layernorm_bias_tied_counts_by_hand(make_scores):
    # GELU, LayerNorm (weight + bias), biases on every linear, learned positions (64), tied output, MHA.
    # target: 2 layers, h=32, ffn=64, 3 heads of width 8, padded vocab 512.
    # layer: 2 norms 2*2*32 128 + qkv 32*8*9 2304 + bias 72 + proj 3*8*32 768 + bias 32
    #        + fc1 64*32 2048 + bias 64 + fc2 64*32 2048 + bias 32
    after = 2 * (128 + 2304 + 72 + 768 + 32 + 2048 + 64 + 2048 + 32) + 2 * 32 + 512 * 32 + 64 * 32
    plan = make_plan(make_scores(GELU), Target(num_layers=2, hidden_size=32, ffn_hidden_size=64,
                                               num_attention_heads=3))
    assert plan.params_after == after == 33488 == plan.target.num_parameters()


def test_summary(make_scores):
    plan = make_plan(make_scores(TINY), Target(num_layers=2, hidden_size=32, ffn_hidden_size=96,
                                               num_attention_heads=2, num_query_groups=1, head_merge=True))
    text = plan.summary()
    lines = {line.split()[0]: line for line in text.splitlines()[1:6]}
    assert "4 -> 2" in lines["num_layers"] and "(50%)" in lines["num_layers"]
    assert "64 -> 32" in lines["hidden_size"] and "2 -> 1" in lines["num_query_groups"]
    assert f"dropped layers {plan.scores['dropped_layers']} (chosen by bi)" in text
    assert "parameters 328,256 -> 90,272 (27.5% of the source)" in text and "merged" in text
    assert "(" not in identity_plan(TINY).summary().splitlines()[1]


def test_random_plan_is_deterministic_per_seed():
    small = preset("small")
    target = Target(num_layers=5, hidden_size=200, ffn_hidden_size=500, num_attention_heads=4)
    a, b, c = random_plan(small, target, 1), random_plan(small, target, 1), random_plan(small, target, 2)
    assert a == b
    for axis in ("layers", "hidden", "ffn", "heads"):
        assert getattr(a, axis) != getattr(c, axis)
    assert a.target == c.target and a.params_after == c.params_after == a.target.num_parameters()
    assert a.scores["random_seed"] == 1 and a.scores["layer_metric"] == "random"
    assert random_plan(small, Target(drop_layers=(0, 7)), 5).layers == (1, 2, 3, 4, 5, 6)
