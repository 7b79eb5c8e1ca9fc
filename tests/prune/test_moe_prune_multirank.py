"""MoE pruning at EP2 x TP2 (one 4-process torchrun launch, tests/multirank/moe_prune.py): the checkpoint
the four ranks write together equals the source's global tensors sliced independently (every tensor); it
loads at EP2 x TP2 and saves back bit-identical, and gives the same logits at EP2 x PP2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_minitron.model import checkpoint as ckpt
from tests.conftest import REPO, torchrun
from tests.multirank.moe_prune import ARCHS, plan_for
from tests.prune.moe_reference import sliced


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moe-prune-multirank")
    torchrun(REPO / "tests/multirank/moe_prune.py", out, nproc=4, timeout=900)
    return out


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_pruned_at_ep2_tp2_equals_the_independent_slicing(launched, name):
    plan = plan_for(name)
    assert any(len(set(layer)) > 1 for layer in plan.expert_ffn if layer)  # experts keep different neurons
    got = ckpt.read_tensors(ckpt.resolve(launched / f"pruned_{name}").path)
    want = sliced(ckpt.read_tensors(ckpt.resolve(launched / f"src_{name}").path), plan)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    resaved = ckpt.read_tensors(ckpt.resolve(launched / f"resaved_{name}").path)
    assert resaved.keys() == got.keys() and all(torch.equal(resaved[k], got[k]) for k in got)
    info = ckpt.resolve(launched / f"pruned_{name}")
    assert info.arch == plan.target.explicit() and info.metadata["plan"]["experts"] == [list(r) for r in plan.experts]


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_same_logits_at_ep2_tp2_and_ep2_pp2(launched, name):
    a, b = (torch.load(launched / f"logits_{name}_{layout}.pt") for layout in ("ep2_tp2", "ep2_pp2"))
    assert a.shape == b.shape == (2, 16, 1024)
    rel = (a - b).abs().max() / a.abs().max()
    assert rel <= 1e-5, f"{name}: {rel:.2e}"
