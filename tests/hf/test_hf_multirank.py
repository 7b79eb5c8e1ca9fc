"""Every family's imported model gives transformers' logits at TP2 (x DP2) and TP2xPP2, the MoE families at
EP2, TP2+SP and TP2xPP2+SP: one 4-process torchrun launch (tests/multirank/hf_layouts.py) loads each
checkpoint at each of its layouts."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO, torchrun
from tests.hf import models
from tests.multirank.hf_layouts import layouts

pytest.importorskip("transformers", reason="the Hugging Face tests need transformers (pip install -e .[test])")


@pytest.fixture(scope="module")
def launched(hf_cases, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf-multirank")
    torchrun(REPO / "tests/multirank/hf_layouts.py", out, *(f"{n}={c['ckpt']}" for n, c in hf_cases.items()),
             nproc=4, timeout=600)
    return out


@pytest.mark.parametrize("name, layout", [(name, layout) for name in models.CASES for layout in layouts(name)])
def test_logits_equal_transformers(launched, hf_cases, name, layout):
    logits = torch.load(launched / f"{name}_{layout}.pt")
    assert logits.shape == hf_cases[name]["logits"].shape
    assert models.rel_error(logits, hf_cases[name]["logits"]) <= 1e-4
