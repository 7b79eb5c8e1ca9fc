"""Mixture-of-Experts models across parallel layouts: two torchrun launches (4 then 2 processes,
tests/multirank/moe_layouts.py) compute, these tests compare. The DP1 x EP1 reference step runs here,
in-process."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_minitron.model.checkpoint import read_tensors, resolve
from tests.conftest import REPO, torchrun

SCRIPT = REPO / "tests/multirank/moe_layouts.py"
LAYOUTS = ["ep2", "ep4", "tp2_sp", "tp2_sp_ep2", "pp2", "ep2_pp2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe")
    torchrun(SCRIPT, out, "reference,logits", nproc=4, timeout=900)
    torchrun(SCRIPT, out, "step,resume", nproc=2, timeout=900)
    return out


def _model_keys(tensors: dict) -> list[str]:
    return sorted(k for k in tensors if "optimizer." not in k)  # MoE optimizers are chained: chained_N.optimizer.…


@pytest.mark.parametrize("arch", ["stacked", "mixed"])
def test_same_logits_at_every_layout(results, arch):
    reference = torch.load(results / f"logits_{arch}_ep1.pt")
    assert reference.shape == (2, 32, 1024)
    for layout in LAYOUTS:
        logits = torch.load(results / f"logits_{arch}_{layout}.pt")
        # fp32; EP and PP move whole experts/layers and agree exactly, TP splits the matmuls (seen 3.6e-7).
        rel = (logits - reference).abs().max() / reference.abs().max()
        assert rel <= 1e-5, f"{arch} {layout}: logits differ from EP1 by {rel:.2e} (relative)"


@pytest.mark.parametrize("arch", ["stacked", "mixed"])
def test_saved_at_ep2_reloads_bit_identical_at_ep1_tp2(results, arch):
    saved = read_tensors(resolve(results / f"reference_{arch}").path)
    resaved = read_tensors(resolve(results / f"resaved_{arch}_tp2").path)
    keys = _model_keys(saved)
    assert any(".experts.experts.linear_fc1.weight" in k for k in keys)
    assert sorted(resaved) == keys
    for key in keys:
        assert torch.equal(saved[key], resaved[key]), key


def test_resume_is_exact_with_expert_parallelism(results):
    """6 steps straight == 3 steps, stop, resume 3, at DP2 x EP2 with the distributed optimizer: losses,
    router statistics and every tensor (weights and optimizer state)."""
    records = json.loads((results / "resume_ep2.json").read_text())
    assert len(records["full"]) == 6
    assert records["split"] == records["full"]
    assert all(r["moe aux loss"] > 0 for r in records["full"])
    full = read_tensors(resolve(results / "full_ep2").path)
    split = read_tensors(resolve(results / "split_ep2").path)
    assert sorted(full) == sorted(split)
    assert any("optimizer." in key for key in full)
    for key in full:
        assert torch.equal(full[key], split[key]), key


def test_one_dp2_ep2_step_equals_the_dp1_ep1_step(results, single_rank_runtime):
    """The same global batch (4 micro-batches of 2) from the same weights, at DP1 x EP1 here and at
    DP2 x EP2 under torchrun. Losses and router statistics are sums over the same tokens in another
    order (fp32: 1e-6). Adam's first step is about lr*sign(g), so weights whose gradient is at rounding
    level may flip sign; updates are therefore compared in norm, as in the dense layouts test (2e-4)."""
    from megatron_minitron.model import checkpoint as ckpt
    from megatron_minitron.training.loop import build_trainer, init_from, lm_task, train_step
    from tests.multirank import moe_layouts as m

    rt = single_rank_runtime
    trainer = build_trainer(m.ARCHS["mixed"], rt, m.train_cfg(lr_warmup_iters=0, train_iters=2))
    init_from(trainer, results / "reference_mixed")
    mine = train_step(trainer, lm_task(rt.device), m.batches_for(rt, m.ARCHS["mixed"], seed=3))
    ckpt.save_checkpoint(results / "step_dp1_ep1", model=trainer.model[0], arch=m.ARCHS["mixed"], runtime=rt,
                         iteration=1)
    theirs = json.loads((results / "step_dp2_ep2.json").read_text())
    for name in ("lm loss", "moe aux loss", "moe load-balancing loss"):
        assert theirs[name] == pytest.approx(mine[name], rel=1e-6), name
    assert theirs["grad_norm"] == pytest.approx(mine["grad_norm"], rel=1e-5)
    assert theirs["moe expert load"] == mine["moe expert load"]
    start = read_tensors(resolve(results / "reference_mixed").path)
    ours = read_tensors(resolve(results / "step_dp1_ep1").path)
    other = read_tensors(resolve(results / "step_dp2_ep2").path)
    for key in _model_keys(ours):
        update, base_update = other[key] - start[key], ours[key] - start[key]
        assert base_update.norm() > 0, f"{key} did not change"
        rel = (update - base_update).norm() / base_update.norm()
        assert rel <= 2e-4, f"update of {key} differs between DP2 x EP2 and DP1 x EP1 by {rel:.2e}"
