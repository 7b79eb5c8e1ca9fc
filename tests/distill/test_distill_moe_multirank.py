"""Distillation with MoE teachers and students under expert parallelism (one 2-process torchrun launch,
tests/multirank/distill_moe.py): MoE -> MoE, dense -> MoE and MoE -> dense give the same losses, aux loss
and expert load at EP2 as at EP1; and 6 steps at EP2 equal 3, stop, resume 3 (losses and weights)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REPO, torchrun
from tests.multirank.distill_moe import COMBOS, STEPS


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill-moe")
    torchrun(REPO / "tests/multirank/distill_moe.py", out, nproc=2, timeout=900)
    return out


@pytest.mark.parametrize("combo", list(COMBOS))
def test_expert_parallel_distillation_equals_ep1(out, combo):
    runs = json.loads((out / "layouts.json").read_text())
    ep1, ep2 = runs[f"{combo}_ep1"], runs[f"{combo}_ep2"]
    assert len(ep1) == len(ep2) == STEPS
    student_moe = combo.endswith("_moe")
    for step, (a, b) in enumerate(zip(ep2, ep1)):
        assert ("moe aux loss" in a) == student_moe, "the aux loss is the MoE student's, and only a student's"
        for key in ("loss", "kd loss", "lm loss", "grad_norm") + (("moe aux loss",) if student_moe else ()):
            # the same sums, split differently over the ranks holding the experts: fp32 reordering only
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), f"{combo} step {step + 1} {key}"
        if student_moe:
            assert a["moe expert load"] == b["moe expert load"]
    assert ep1[-1]["kd loss"] < ep1[0]["kd loss"]


def test_resume_at_ep2_reproduces_the_uninterrupted_run(out):
    from megatron_minitron.model.checkpoint import read_tensors, resolve

    runs = json.loads((out / "resume.json").read_text())
    assert len(runs["full"]) == 6 and runs["split"] == runs["full"]
    full, split = (read_tensors(resolve(out / f"resume_{name}").path) for name in ("full", "split"))
    assert resolve(out / "resume_split").iteration == 6 and sorted(full) == sorted(split)
    assert any(".experts." in key for key in full)
    for key, tensor in full.items():
        assert torch.equal(tensor, split[key]), key
