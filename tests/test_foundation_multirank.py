"""Foundation across parallel layouts: one 4-process torchrun launch (tests/multirank/foundation.py)
computes, these tests compare. Layouts: TP1 (DP4), TP2 (DP2), PP2 (DP2), TP2xPP2 (DP1), and for logits
also TP2 with sequence parallelism and PP2 with uneven stages (1 + 3 layers)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_minitron.model.checkpoint import read_tensors, resolve
from tests.conftest import REPO, torchrun

LAYOUTS = ["tp1_pp1", "tp2_pp1", "tp1_pp2", "tp2_pp2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("foundation")
    torchrun(REPO / "tests/multirank/foundation.py", out, nproc=4, timeout=900)
    return out


def test_same_logits_at_every_layout(results):
    reference = torch.load(results / "logits_tp1_pp1.pt")
    assert reference.shape == (2, 32, 1024)
    for layout in LAYOUTS[1:] + ["tp2_sp", "pp2_uneven"]:
        logits = torch.load(results / f"logits_{layout}.pt")
        # fp32 with different reduction orders (TP splits the matmuls): ~1e-7 relative seen; 1e-5 bound.
        rel = (logits - reference).abs().max() / reference.abs().max()
        assert rel <= 1e-5, f"{layout}: logits differ from TP1 by {rel:.2e} (relative)"


def test_checkpoint_saved_at_tp2_reloads_bit_identical_at_tp1_pp2(results):
    saved = read_tensors(resolve(results / "reference").path)
    resaved = read_tensors(resolve(results / "resaved_tp1pp2").path)
    model_keys = sorted(k for k in saved if not k.startswith("optimizer."))
    assert sorted(resaved) == model_keys
    for key in model_keys:
        assert torch.equal(saved[key], resaved[key]), key


def test_one_step_is_the_same_at_every_data_parallel_size(results):
    """DP4 (TP1), DP2 (TP2 and PP2) and DP1 (TP2xPP2) on the same global batch.

    Adam's first step is about lr*sign(g), so elements whose gradient is at rounding level may flip;
    updates are compared in norm (seen: 3.5e-5 at TP2, 3e-6 between DP4 and DP2 at PP2)."""
    start = read_tensors(resolve(results / "reference").path)
    steps = {layout: read_tensors(resolve(results / f"step_{layout}").path) for layout in LAYOUTS}
    reports = {layout: json.loads((results / f"step_{layout}.json").read_text()) for layout in LAYOUTS}
    base = steps["tp1_pp1"]
    for layout in LAYOUTS[1:]:
        assert reports[layout]["lm loss"] == pytest.approx(reports["tp1_pp1"]["lm loss"], rel=1e-6)
        assert reports[layout]["grad_norm"] == pytest.approx(reports["tp1_pp1"]["grad_norm"], rel=1e-5)
        for key, value in steps[layout].items():
            update, base_update = value - start[key], base[key] - start[key]
            assert base_update.norm() > 0, f"{key} did not change"
            rel = (update - base_update).norm() / base_update.norm()
            assert rel <= 2e-4, f"{layout}: update of {key} differs from DP4 by {rel:.2e}"


@pytest.mark.parametrize("name", ["do_tp2", "pp2"])
def test_resume_is_exact(results, name):
    """6 steps straight == 3 steps, stop, resume 3 (distributed optimizer at TP2; plain at PP2)."""
    losses = json.loads((results / f"resume_{name}.json").read_text())
    assert len(losses["full"]) == 6
    assert losses["split"] == losses["full"]
    full = read_tensors(resolve(results / f"full_{name}").path)
    split = read_tensors(resolve(results / f"split_{name}").path)
    assert sorted(full) == sorted(split)
    assert any(key.startswith("optimizer.") for key in full)
    for key in full:
        assert torch.equal(full[key], split[key]), key
