"""Layout invariance of Mixture-of-Experts importance: one checkpoint, one calibration set, the same
scores at EP1, EP2, EP4, TP2+SP, TP2+SP x EP2 and EP2 x PP2, on every rank (one torchrun launch of 4
processes: tests/multirank/moe_importance_layouts.py). Tokens routed to experts on other ranks must be
counted once: a token counted twice or missed changes experts, expert_ffn and experts_router_mass."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO, torchrun
from tests.multirank.moe_importance_layouts import LAYOUTS

KEYS = ("experts", "experts_router_mass", "expert_ffn", "shared_ffn", "heads", "hidden", "layers_bi",
        "layers_lm_loss", "blocks_lm_loss", "raw.experts", "raw.expert_ffn", "raw.shared_ffn")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe-importance-layouts")
    torchrun(REPO / "tests/multirank/moe_importance_layouts.py", out, nproc=4, timeout=900)
    return {(name, rank): torch.load(out / f"scores_{name}_rank{rank}.pt") for name in LAYOUTS for rank in range(4)}


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of the reference (NaN where it is NaN)."""
    assert torch.equal(a.isnan(), b.isnan())
    return float((a.double() - b.double()).nan_to_num().abs().max() / b.double().nan_to_num().abs().max())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_scores_do_not_depend_on_the_layout_or_the_rank(results, layout):
    reference = results["ep1", 0]
    for rank in range(4):
        other = results[layout, rank]
        assert set(other) == set(reference)
        for key in KEYS:
            assert other[key].shape == reference[key].shape, key
            # 1e-5 of the largest value: sums are added in another order at every layout
            assert close(other[key], reference[key]) <= 1e-5, f"{key} at {layout} rank {rank}: {close(other[key], reference[key])}"


def test_every_moe_axis_is_scored(results):
    scores = results["ep1", 0]
    assert "ffn" not in scores and "raw.ffn" not in scores  # every layer is MoE
    assert scores["experts"].shape == (4, 4) and scores["expert_ffn"].shape == (4, 4, 64)
    assert scores["shared_ffn"].shape == (4, 32) and scores["raw.hidden"].shape == (9, 64, 6)
    assert scores["experts"].isfinite().all() and (scores["experts"] > 0).all()
    assert scores["blocks_lm_loss"][0, :3].isfinite().all() and scores["blocks_lm_loss"][0, 3].isnan()
    torch.testing.assert_close(scores["experts_router_mass"].sum(-1), torch.ones(4))  # top-k renormalised
    # the sharpened router sends tokens unevenly: the mass differs between experts
    assert (scores["experts_router_mass"].max(-1).values - scores["experts_router_mass"].min(-1).values).min() > 0.01
