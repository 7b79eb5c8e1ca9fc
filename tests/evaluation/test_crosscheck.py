"""Our megatron model under lm-eval against lm-eval's own `hf` backend on the same model exported with export-hf:
the same per-document log-likelihoods (<= 1e-4 relative, fp32) and the same accuracy on the built-in tasks'
documents, and greedy generation equal to transformers' generate token for token (and to the hf backend's
generate_until with stop strings), at TP1 (in this process) and at TP2 (x DP2) and TP2xPP2 (one torchrun launch);
for a Mixtral-family model too, at EP1 (in this process) and at EP2 (x DP4) and TP2+SP x EP2 in the same launch."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, torchrun
from tests.evaluation import models
from tests.evaluation.conftest import OFFLINE
from tests.multirank.eval_layouts import LAYOUTS, MOE_LAYOUTS


def check_against_reference(ours: dict, reference: dict) -> None:
    for task in models.TASKS:
        assert len(ours["samples"][task]) == models.LIMIT
        assert models.worst_relative_gap(ours["samples"][task], reference["samples"][task]) <= 1e-4, task
    for metric in ("acc,none", "acc_norm,none", "acc_mutual_info,none"):
        assert ours["results"]["minitron_continuation"][metric] == reference["results"]["minitron_continuation"][metric]
    assert ours["generate"] == reference["generate"]
    assert all(len(tokens) == models.MAX_NEW_TOKENS for tokens in ours["generate"])
    assert ours["generate_until"] == reference["generate_until"]


def test_tp1_equals_hf_backend(bpe_case, hf_reference, single_rank_runtime, data_cache):
    from tests.evaluation.layouts import evaluate_and_generate

    prompts = json.loads(bpe_case["prompts"].read_text())
    ours = evaluate_and_generate(single_rank_runtime, bpe_case["ckpt"], data_cache, prompts, batch_size=4)
    check_against_reference(ours, hf_reference)


def test_moe_ep1_equals_hf_backend(moe_case, moe_hf_reference, single_rank_runtime, data_cache):
    from tests.evaluation.layouts import evaluate_and_generate

    prompts = json.loads(moe_case["prompts"].read_text())
    ours = evaluate_and_generate(single_rank_runtime, moe_case["ckpt"], data_cache, prompts, batch_size=4)
    check_against_reference(ours, moe_hf_reference)


@pytest.fixture(scope="module")
def launched(bpe_case, moe_case, data_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-multirank")
    torchrun(REPO / "tests/multirank/eval_layouts.py", out, bpe_case["ckpt"], bpe_case["prompts"], moe_case["ckpt"],
             moe_case["prompts"], data_cache, nproc=4, timeout=1200, env=OFFLINE)
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_multirank_equals_hf_backend(launched, hf_reference, layout):
    check_against_reference(json.loads((launched / f"{layout}.json").read_text()), hf_reference)


@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
def test_moe_multirank_equals_hf_backend(launched, moe_hf_reference, layout):
    """Expert-parallel ranks exchange tokens, so each EP group must run the same batches (a replica is a whole
    EP group): with rows shared by data-parallel rank instead, the first uneven share hangs or aborts."""
    check_against_reference(json.loads((launched / f"{layout}.json").read_text()), moe_hf_reference)
