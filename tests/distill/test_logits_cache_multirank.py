"""Logits caches at TP2 and TP1 x DP2, and distillation from them against the teacher online (one torchrun
launch of 2 processes, tests/multirank/cache_layouts.py): the vocab-parallel top-k does not depend on the
layout, and with K = the padded vocabulary a cached run is the online run step for step."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_minitron.distill.logits_cache import LogitsCache
from tests.conftest import REPO, torchrun
from tests.multirank.cache_layouts import ARCH, GBS, SEQ, STEPS


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache-layouts")
    torchrun(REPO / "tests/multirank/cache_layouts.py", out, nproc=2, timeout=600)
    return out


def _runs(out):
    return json.loads((out / "runs.json").read_text())


@pytest.mark.parametrize("k", [16, ARCH.padded_vocab])
def test_top_k_at_tp2_is_the_top_k_at_tp1(out, k):
    tp2, tp1 = LogitsCache(out / f"cache_tp2_k{k}"), LogitsCache(out / f"cache_tp1_dp2_k{k}")
    for i in range(STEPS * GBS):
        a, b = tp2.sample("train", i), tp1.sample("train", i)
        assert a["teacher_ids"].shape == (SEQ, k) and torch.equal(a["tokens"], b["tokens"])
        if k == 16:
            assert torch.equal(a["teacher_ids"], b["teacher_ids"]), f"sample {i}"
        else:  # the whole vocabulary; a random teacher's tail holds ties within the TP rounding (~1e-7)
            assert torch.equal(a["teacher_ids"].sort(-1).values, torch.arange(k).expand(SEQ, k).int())
            assert torch.isneginf(a["teacher_rest"]).all()
        # the teacher's logits at TP2 and TP1 differ by fp32 rounding of the split matmuls
        assert torch.allclose(a["teacher_logp"], b["teacher_logp"], atol=1e-5)
        assert (a["teacher_logp"].diff(dim=-1) <= 0).all()  # sorted, most likely first


@pytest.mark.parametrize("run", ["tp1_dp2_forward_cache_tp1_dp2", "tp2_forward_cache_tp2", "tp2_reverse_cache_tp2"])
def test_cached_distillation_with_the_whole_vocabulary_is_online_distillation(out, run):
    """Forward and reverse KL (whose gradient uses the KL value, summed in online's order): every loss of
    every step and the final weights within 1e-6 relative; evaluated afterwards, the teacher's LM loss
    read from the cache is the online teacher's."""
    result = _runs(out)[run]
    assert len(result["cached"]) == len(result["online"]) == STEPS
    for step, (online, cached) in enumerate(zip(result["online"], result["cached"])):
        for key in online:
            assert cached[key] == pytest.approx(online[key], rel=1e-6), f"step {step + 1} {key}"
    assert result["online"][-1]["kd loss"] != result["online"][0]["kd loss"]  # the student moved
    # same sums in the same order on the student side: the same fp32 weights
    assert result["weight_diff"] <= 1e-6
    online, cached = result["online_eval"], result["cached_eval"]
    assert set(online) == set(cached) and online["teacher lm loss"] > 0
    for key in online:
        assert cached[key] == pytest.approx(online[key], rel=1e-6), key


def test_the_cached_kl_at_tp2_is_the_kl_on_the_whole_vocabulary(out):
    """K = 16 of a 1024 vocabulary split over two ranks (each holds some of every row's cached ids; the rest
    bin spans both): values and each rank's gradient slice as on the whole vocabulary, to fp32 rounding
    of the sums split over ranks; the targets written at TP2 are those of the whole vocabulary."""
    for rank in json.loads((out / "vocab_parallel.json").read_text()):
        assert rank["ids_equal"] and rank["targets"] <= 1e-5
        for loss in ("forward", "reverse"):
            # measured: losses 9e-7 (forward) and 4.6e-6 (reverse, smaller values), gradients <= 2e-7
            assert rank[loss]["loss"] <= 2e-5 and rank[loss]["grad"] <= 1e-5, (loss, rank)
            assert 0 < rank[loss]["ids_on_this_rank"] < 3 * 8 * 16


def test_a_cache_from_another_layout_stays_within_fp32_rounding(out):
    """A cache written at TP2 read at TP1 holds the TP2 teacher's logits, which differ from TP1's by fp32
    rounding."""
    result = _runs(out)["tp1_dp2_forward_cache_tp2"]
    assert result["cached"][0]["kd loss"] == pytest.approx(result["online"][0]["kd loss"], rel=2e-5)
    for online, cached in zip(result["online"], result["cached"]):
        for key in online:
            assert cached[key] == pytest.approx(online[key], rel=5e-5), key
    # Adam moves each weight by up to lr = 3e-3 a step whatever the gradient's size, so fp32 rounding of the
    # teacher's logits can shift a weight whose gradient is near zero by a fraction of a step: under 5e-5 on earlier
    # machines, 5.06e-5 on another CPU; the bound is 7% of one step.
    assert result["weight_diff"] <= 2e-4
    for key in result["online_eval"]:
        assert result["cached_eval"][key] == pytest.approx(result["online_eval"][key], rel=5e-5), key
