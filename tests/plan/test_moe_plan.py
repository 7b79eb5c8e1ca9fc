"""Mixture-of-Experts targets and plans: flags and JSON, each layer's own experts ranked as an independent
argsort ranks them, each expert's own neurons, total and active counts, and every bad input refused by name."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from megatron_minitron.config import preset
from megatron_minitron.plan import (Plan, PlanError, Target, add_target_arguments, identity_plan, load_plan, make_plan,
                                    random_plan, target_from_args)
from tests.plan.conftest import scores_for

STACKED = preset("tiny-moe").explicit()  # 4 MoE layers, 4 experts top-2, expert width 64
MIXED = preset("tiny-moe", moe_layer_freq=(0, 1, 1, 1), moe_shared_expert_ffn_hidden_size=32).explicit()


def moe_scores(arch, seed: int = 0):
    """Scores in the agreed layout: NaN expert rows for dense layers, NaN ffn rows for MoE layers."""
    g = torch.Generator().manual_seed(seed)
    L, E = arch.num_layers, arch.num_experts
    moe = torch.tensor(arch.moe_layers)
    extra = {"experts": torch.rand(L, E, generator=g), "experts_router_mass": torch.rand(L, E, generator=g),
             "expert_ffn": torch.rand(L, E, arch.expert_ffn_hidden_size, generator=g),
             "ffn": torch.rand(L, arch.ffn_hidden_size, generator=g)}
    if arch.moe_shared_expert_ffn_hidden_size:
        extra["shared_ffn"] = torch.rand(L, arch.moe_shared_expert_ffn_hidden_size, generator=g)
    for key in ("experts", "experts_router_mass", "expert_ffn", "shared_ffn"):
        if key in extra:
            extra[key][~moe] = float("nan")
    extra["ffn"][moe] = float("nan")
    return scores_for(arch, seed=seed, **extra)


def best(values: torch.Tensor, k: int) -> list[int]:
    """Independent ranking: the k largest by argsort (scores are random floats, so there are no ties)."""
    return sorted(torch.argsort(values, descending=True)[:k].tolist())


def test_flags_and_export_config(tmp_path):
    parser = argparse.ArgumentParser()
    add_target_arguments(parser)
    args = parser.parse_args(["--target-num-moe-experts", "64", "--target-moe-ffn-hidden-size", "512",
                              "--target-moe-shared-expert-intermediate-size", "256", "--target-hidden-size", "1536"])
    target = target_from_args(args)
    assert target == Target(num_experts=64, moe_ffn_hidden_size=512, moe_shared_expert_ffn_hidden_size=256,
                            hidden_size=1536)
    path = tmp_path / "export.json"
    path.write_text(json.dumps(target.to_json()))
    assert target_from_args(parser.parse_args(["--export-config", str(path)])) == target
    assert target.to_json() == {"hidden_size": 1536, "num_experts": 64, "moe_ffn_hidden_size": 512,
                                "moe_shared_expert_ffn_hidden_size": 256}


@pytest.mark.parametrize("arch", [STACKED, MIXED], ids=["stacked", "mixed"])
def test_each_layer_keeps_its_own_best_experts_and_neurons(arch):
    scores = moe_scores(arch)
    shared = {"moe_shared_expert_ffn_hidden_size": 16} if arch.moe_shared_expert_ffn_hidden_size else {}
    plan = make_plan(scores, Target(num_experts=2, moe_ffn_hidden_size=24, hidden_size=48, **shared),
                     tensor_parallel=2, expert_parallel=2)
    for j, layer in enumerate(plan.layers):
        if not arch.moe_layers[layer]:
            assert plan.experts[j] == plan.expert_ffn[j] == plan.shared_ffn[j] == ()
            assert plan.ffn[j] == tuple(best(scores["ffn"][layer], arch.ffn_hidden_size))
            continue
        assert plan.ffn[j] == ()
        assert plan.experts[j] == tuple(best(scores["experts"][layer], 2))
        for e, neurons in zip(plan.experts[j], plan.expert_ffn[j]):
            assert neurons == tuple(best(scores["expert_ffn"][layer, e], 24))
        if shared:
            assert plan.shared_ffn[j] == tuple(best(scores["shared_ffn"][layer], 16))
    # the layers differ in which experts they keep (else "each its own" would be untested)
    assert len({row for row in plan.experts if row}) > 1
    target = plan.target
    assert (target.num_experts, target.moe_ffn_hidden_size, target.hidden_size) == (2, 24, 48)
    assert plan.params_after == target.num_parameters() and plan.active_params_after == target.num_active_parameters()
    assert plan.active_params_before == arch.num_active_parameters() < plan.params_before
    assert any(line.split() == ["num_experts", "4", "->", "2", "(50%)"] for line in plan.summary().splitlines())
    assert f"active parameters {arch.num_active_parameters():,} -> {target.num_active_parameters():,}" in plan.summary()


def test_plan_file_round_trip_and_tampering(tmp_path):
    plan = make_plan(moe_scores(MIXED, seed=3), Target(num_experts=2, drop_layers=(2,), moe_ffn_hidden_size=32))
    assert plan.target.moe_layer_freq == (0, 1, 1)  # the kept layers' pattern
    path = plan.save(tmp_path / "plan.json")
    assert load_plan(path) == plan
    data = json.loads(path.read_text())
    assert data["experts"][0] == [] and len(data["experts"][1]) == 2 and len(data["expert_ffn"][1][0]) == 32
    for edit, message in [
        (lambda d: d["experts"][1].reverse(), "experts[1] (source layer 1) indices must be sorted and unique"),
        (lambda d: d["experts"][1].append(3), "experts[1] (source layer 1) keeps 3 indices, but the target needs 2"),
        (lambda d: d["expert_ffn"][2].pop(), "expert_ffn[2] (source layer 3) has 1 rows; one per kept expert (2)"),
        (lambda d: d["experts"][0].append(0), "experts[0] (source layer 0) is a dense layer"),
        (lambda d: d.update(active_params_after=5), "active_params_after=5 does not match"),
    ]:
        tampered = json.loads(path.read_text())
        edit(tampered)
        with pytest.raises(PlanError) as info:
            Plan.from_json(tampered)
        assert message in str(info.value)


def test_random_plan_covers_experts_and_identity_keeps_all():
    a, b = (random_plan(STACKED, Target(num_experts=2, moe_ffn_hidden_size=16), seed) for seed in (1, 2))
    assert a == random_plan(STACKED, Target(num_experts=2, moe_ffn_hidden_size=16), 1)
    assert a.experts != b.experts and all(len(row) == 2 for row in a.experts)
    assert len({row for layer in a.expert_ffn for row in layer}) > 1  # experts keep different neurons
    same = identity_plan(MIXED)
    assert same.is_identity() and same.experts[0] == () and same.experts[1] == (0, 1, 2, 3)
    assert Plan.from_json(same.to_json()) == same


def test_dense_plans_read_as_before():
    dense = identity_plan(preset("tiny"))
    assert "experts" not in dense.to_json() and dense.experts == ()


@pytest.mark.parametrize("target, parallel, message", [
    (Target(num_experts=1), {}, "target num_experts=1 (--target-num-moe-experts) is fewer than the router's top-k "
                                "(2 experts per token); keep at least 2 experts"),
    (Target(num_experts=3), {"expert_parallel": 2},
     "num_experts=3 (--target-num-moe-experts) is not divisible by the expert-parallel size 2"),
    (Target(num_experts=5), {}, "num_experts=5 (--target-num-moe-experts) is larger than the source's 4"),
    (Target(moe_ffn_hidden_size=63), {"tensor_parallel": 2},
     "tensor-parallel size 2 does not divide moe_ffn_hidden_size=63"),
    (Target(moe_ffn_hidden_size=0), {}, "moe_ffn_hidden_size=0 (--target-moe-ffn-hidden-size) would prune the whole"),
    (Target(moe_shared_expert_ffn_hidden_size=8), {},
     "(--target-moe-shared-expert-intermediate-size) prunes the shared expert, but the source's MoE layers have none"),
    (Target(ffn_hidden_size=96), {}, "every layer of the source is a MoE layer; use --target-moe-ffn-hidden-size"),
])
def test_moe_target_errors(target, parallel, message):
    with pytest.raises(PlanError) as info:
        make_plan(moe_scores(STACKED), target, **parallel)
    assert message in str(info.value)
    with pytest.raises(PlanError) as info:
        random_plan(STACKED, target, 0, **parallel)
    assert message in str(info.value)


def test_scores_of_the_other_kind_and_expert_flags_on_a_dense_model():
    dense = preset("tiny")
    with pytest.raises(PlanError, match="computed on a dense model, but the model to prune is a Mixture-of-Experts"):
        make_plan(scores_for(dense), Target(num_experts=2), source=STACKED)
    with pytest.raises(PlanError, match="computed on a Mixture-of-Experts model, but the model to prune is a dense"):
        make_plan(moe_scores(STACKED), Target(hidden_size=32), source=dense)
    with pytest.raises(PlanError, match=r"--target-num-moe-experts\) prunes experts, but the source model is dense"):
        random_plan(dense, Target(num_experts=2), 0)
    with pytest.raises(PlanError, match="expert-parallel size 2 needs a Mixture-of-Experts model"):
        random_plan(dense, Target(hidden_size=32), 0, expert_parallel=2)
    broken = moe_scores(STACKED)
    broken.tensors["expert_ffn"][1, 2, 5] = float("nan")
    with pytest.raises(PlanError, match="scores 'expert_ffn' hold NaN"):
        make_plan(broken, Target(num_experts=2))
    with pytest.raises(PlanError, match="the scores lack 'shared_ffn'"):
        make_plan(scores_for(MIXED, experts=torch.rand(4, 4), expert_ffn=torch.rand(4, 4, 64)), Target(num_experts=2))


def test_a_ranking_that_keeps_no_moe_layer_is_refused():
    mixed = preset("tiny-moe", moe_layer_freq=(1, 0, 0, 0)).explicit()
    scores = moe_scores(mixed)
    scores.tensors["layers_bi"] = torch.tensor([0.0, 1.0, 1.0, 1.0])  # the MoE layer 0 matters least
    with pytest.raises(PlanError, match=r"the kept layers \[1, 2, 3\] hold no MoE layer \(the source's are \[0\]\)"):
        make_plan(scores, Target(num_layers=3))
