"""make_plan refuses every target it cannot prune to, before choosing anything, naming the field and the fix."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_minitron.config import preset
from megatron_minitron.importance.scores import ScoresError
from megatron_minitron.plan import PlanError, Target, check_target, make_plan, random_plan

TINY = preset("tiny")  # 4 layers, hidden 64, ffn 192, 4 heads in 2 groups, padded vocab 1024


@pytest.mark.parametrize("target, parallel, message", [
    (Target(hidden_size=65), {}, "hidden_size=65 (--target-hidden-size) is larger than the source's 64"),
    (Target(num_layers=5), {}, "num_layers=5 (--target-num-layers) is larger than the source's 4"),
    (Target(num_attention_heads=6), {}, "num_attention_heads=6 (--target-num-attention-heads) is larger"),
    (Target(num_query_groups=3), {}, "num_query_groups=3 (--target-num-query-groups) is larger than the source's 2"),
    (Target(num_layers=0), {}, "num_layers=0 (--target-num-layers) would prune the whole axis away"),
    (Target(ffn_hidden_size=0), {}, "ffn_hidden_size=0 (--target-ffn-hidden-size) would prune the whole axis"),
    (Target(hidden_size=-3), {}, "hidden_size=-3 (--target-hidden-size) would prune the whole axis away"),
    (Target(drop_layers=(0, 1, 2, 3)), {}, "num_layers=0"),
    (Target(num_attention_heads=3), {}, "num_attention_heads=3 is not a multiple of num_query_groups=2"),
    (Target(num_attention_heads=4, num_query_groups=1), {},
     "puts 4 heads in each group, but the source's groups hold 2; keep num_attention_heads <= 2"),
    (Target(ffn_hidden_size=191), {"tensor_parallel": 2},
     "tensor-parallel size 2 does not divide ffn_hidden_size=191"),
    (Target(num_attention_heads=2), {"tensor_parallel": 4},
     "tensor-parallel size 4 does not divide num_attention_heads=2"),
    (Target(num_layers=2), {"pipeline_parallel": 4}, "num_layers=2 is fewer than the pipeline-parallel size 4"),
    (Target(drop_layers=(1, 4)), {}, "drop_layers [4] are not layers of the source, which has layers 0..3"),
    (Target(num_layers=3, drop_layers=(1, 2)), {}, "num_layers=3 disagrees with drop_layers, which leave 2 of 4"),
])
def test_target_errors(make_scores, target, parallel, message):
    with pytest.raises(PlanError) as info:
        make_plan(make_scores(TINY), target, **parallel)
    assert message in str(info.value)
    with pytest.raises(PlanError) as info:  # the random baseline validates the same way
        random_plan(TINY, target, 0, **parallel)
    assert message in str(info.value)


def test_padded_vocab_must_split_over_tensor_parallel():
    source = preset("small", padded_vocab_size=8194)
    with pytest.raises(PlanError, match="tensor-parallel size 4 does not divide padded_vocab_size=8194"):
        check_target(source, Target(num_layers=4), tensor_parallel=4)
    assert check_target(source, Target(num_layers=4), tensor_parallel=2)["num_layers"] == 4


def test_valid_parallel_targets_pass(make_scores):
    plan = make_plan(make_scores(TINY), Target(num_layers=3, ffn_hidden_size=190), tensor_parallel=2,
                     pipeline_parallel=3)
    assert plan.target.num_layers == 3 and plan.target.ffn_hidden_size == 190


def test_scores_of_another_model_are_refused(make_scores):
    with pytest.raises(ScoresError, match="computed on architecture .* but the model to prune has architecture"):
        make_plan(make_scores(preset("small")), Target(num_layers=2), source=TINY)


def test_manifest_that_disagrees_with_its_architecture_is_refused(make_scores):
    scores = make_scores(TINY)
    manifest = dataclasses.replace(scores.manifest, arch_fingerprint="0123456789abcdef")
    bad = dataclasses.replace(scores, manifest=manifest)
    with pytest.raises(ScoresError, match="computed on architecture 0123456789abcdef"):
        make_plan(bad, Target(num_layers=2))


@pytest.mark.parametrize("override, message", [
    ({"ffn": torch.rand(4, 100)}, "scores 'ffn' have shape (4, 100), but the source needs (4, 192)"),
    ({"hidden": torch.full((64,), float("nan"))}, "scores 'hidden' hold NaN or infinite values"),
])
def test_malformed_score_tensors(make_scores, override, message):
    with pytest.raises(PlanError) as info:
        make_plan(make_scores(TINY, **override), Target(hidden_size=32))
    assert message in str(info.value)


def test_missing_layer_lm_loss(make_scores):
    scores = make_scores(TINY, lm_loss=False)
    with pytest.raises(PlanError, match="layer_metric='lm_loss' needs per-layer LM losses .* or choose "
                                        "layer_metric='bi'"):
        make_plan(scores, Target(num_layers=2, layer_metric="lm_loss"))
    # Not needed when depth is kept.
    assert make_plan(scores, Target(hidden_size=32, layer_metric="lm_loss")).layers == (0, 1, 2, 3)


@pytest.mark.parametrize("block_sizes", [(), (1, 3)])
def test_block_size_not_scored(make_scores, block_sizes):
    with pytest.raises(PlanError) as info:
        make_plan(make_scores(TINY, block_sizes=block_sizes), Target(num_layers=2, layer_metric="block"))
    assert (f"removes a block of 2 layers, but the scores hold block LM losses for block sizes {list(block_sizes)}; "
            f"recompute the scores with block size 2") in str(info.value)
