"""Which layers go: Block Importance, per-layer LM loss, the best contiguous block, or an explicit list."""

from __future__ import annotations

import pytest
import torch

from megatron_minitron.config import preset
from megatron_minitron.importance.scores import save_scores
from megatron_minitron.plan import PlanError, Target, best_block, make_plan

TINY = preset("tiny")
EIGHT = preset("small")  # 8 layers


def test_bi_drops_the_lowest_block_importance(make_scores):
    scores = make_scores(TINY, layers_bi=torch.tensor([0.5, 0.1, 0.9, 0.1]))
    assert make_plan(scores, Target(num_layers=2)).layers == (0, 2)
    assert make_plan(scores, Target(num_layers=3)).layers == (0, 1, 2)  # tie at 0.1: layer 3 goes
    assert make_plan(scores, Target(num_layers=2, layer_metric="bi")).scores["layer_metric"] == "bi"


def test_lm_loss_drops_the_layers_whose_removal_hurts_least(make_scores):
    scores = make_scores(TINY, layers_lm_loss=torch.tensor([3.0, 9.0, 2.5, 4.0]))
    plan = make_plan(scores, Target(num_layers=2, layer_metric="lm_loss"))
    assert plan.layers == (1, 3)
    assert plan.scores["layer_metric"] == "lm_loss" and plan.scores["dropped_layers"] == [0, 2]


def test_block_hand_made(make_scores):
    table = torch.tensor([[6.0, 6.1, 6.2, 6.3], [7.0, 6.5, 6.8, float("nan")]])
    scores = make_scores(TINY, block_sizes=(1, 2), blocks_lm_loss=table)
    plan = make_plan(scores, Target(num_layers=2, layer_metric="block"))
    assert plan.layers == (0, 3) and plan.scores["dropped_layers"] == [1, 2]
    assert plan.scores["layer_metric"] == "block"
    assert make_plan(scores, Target(num_layers=3, layer_metric="block")).layers == (1, 2, 3)


def test_block_tie_goes_to_the_earlier_block(make_scores):
    table = torch.tensor([[6.0, 5.0, 5.0, float("nan")]])
    scores = make_scores(TINY, block_sizes=(2,), blocks_lm_loss=table)
    assert best_block(scores, 2) == 1
    assert make_plan(scores, Target(num_layers=2, layer_metric="block")).layers == (0, 3)


@pytest.mark.parametrize("seed", range(10))
def test_block_equals_brute_force_minimum(make_scores, seed):
    scores = make_scores(EIGHT, seed=seed, block_sizes=(1, 2, 3, 5))
    for j, k in enumerate((1, 2, 3, 5)):
        losses = scores["blocks_lm_loss"][j].tolist()
        start = min(range(8 - k + 1), key=lambda s: (losses[s], s))
        plan = make_plan(scores, Target(num_layers=8 - k, layer_metric="block"))
        assert plan.layers == tuple(l for l in range(8) if not start <= l < start + k)


def test_block_with_nan_inside_the_valid_starts_is_refused(make_scores):
    table = torch.tensor([[6.0, float("nan"), 5.0, float("nan")]])
    with pytest.raises(PlanError, match="blocks_lm_loss for block size 2 hold NaN"):
        make_plan(make_scores(TINY, block_sizes=(2,), blocks_lm_loss=table), Target(num_layers=2, layer_metric="block"))


def test_drop_layers_are_dropped_exactly(make_scores):
    scores = make_scores(EIGHT, seed=3)
    plan = make_plan(scores, Target(drop_layers=(6, 2, 3)))
    assert plan.layers == (0, 1, 4, 5, 7) and plan.target.num_layers == 5
    assert plan.scores["layer_metric"] == "drop_layers" and plan.scores["dropped_layers"] == [2, 3, 6]
    # The width rows follow the kept source layers.
    assert plan.ffn[2] == make_plan(scores, Target()).ffn[4]


def test_provenance_names_the_scores_directory(make_scores, tmp_path):
    save_scores(make_scores(TINY), tmp_path / "scores")
    plan = make_plan(tmp_path / "scores", Target(num_layers=3))
    assert plan.scores["scores_dir"] == str(tmp_path / "scores")
    assert plan.scores["checkpoint"] == "ckpt/x" and plan.scores["iteration"] == 7
    assert plan.scores["arch_fingerprint"] == TINY.explicit().fingerprint()
    assert plan.scores["aggregation"] == {"seq": "mean", "batch": "l2", "hidden_final_norm": False,
                                          "ffn_source": "post"}
