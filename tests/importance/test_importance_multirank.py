"""Layout invariance: one checkpoint, one calibration set, the same scores at DP4, TP2, PP2, TP2xPP2,
TP2 with sequence parallelism and uneven pipeline stages (one torchrun launch of 4 processes)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO, torchrun
from tests.multirank.importance_layouts import LAYOUTS


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("importance-layouts")
    torchrun(REPO / "tests/multirank/importance_layouts.py", out, nproc=4, timeout=900)
    return {name: torch.load(out / f"scores_{name}.pt") for name in LAYOUTS}


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> float:
    """Largest difference relative to the largest magnitude of the reference."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "dp4"])
def test_scores_do_not_depend_on_the_layout(results, layout):
    reference, other = results["dp4"], results[layout]
    assert set(other) == set(reference)
    for key in reference:
        assert other[key].shape == reference[key].shape, key
        if key == "blocks_lm_loss":  # NaN where a block runs past the last layer, in every layout
            assert torch.equal(other[key].isnan(), reference[key].isnan())
            other_key, reference_key = other[key].nan_to_num(), reference[key].nan_to_num()
        else:
            other_key, reference_key = other[key], reference[key]
        # 1e-5 of the largest value: partial sums are added in another order at every layout (fp32
        # matmuls split over TP, samples over DP), which moves results by ~1e-7 relative.
        assert close(other_key, reference_key) <= 1e-5, f"{key} at {layout} differs by {close(other_key, reference_key)}"


def test_every_axis_is_scored(results):
    scores = results["dp4"]
    assert scores["heads"].shape == (4, 4) and scores["query_groups"].shape == (4, 2)
    assert scores["ffn"].shape == (4, 192) and scores["hidden"].shape == (64,)
    assert scores["ffn_pre_gate"].shape == scores["ffn_pre_up"].shape == (4, 192)
    assert scores["raw.hidden"].shape == (9, 64, 6)  # two norms per layer and the final norm
    assert (scores["layers_bi"] > 0).all() and (scores["layers_bi"] < 2).all()
    assert scores["blocks_lm_loss"].shape == (2, 4) and scores["blocks_lm_loss"][0, :3].isfinite().all()
    assert scores["blocks_lm_loss"][1, 2:].isnan().all()
    # removing a layer changes the loss (the layers of a random model are not identities)
    assert (scores["layers_lm_loss"] - scores["lm_loss"]).abs().min() > 1e-4
