"""storage.all_finite (the NaN/infinity check of every tensor import-hf, export-hf and the pruner read)
agrees with torch.isfinite(t).all() wherever a bad value sits, in every float dtype."""

from __future__ import annotations

import pytest
import torch

from megatron_minitron.model.storage import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
@pytest.mark.parametrize("where", [0, 517, -1])
def test_agrees_with_isfinite(dtype, bad, where):
    t = (torch.randn(64, 33, generator=torch.Generator().manual_seed(0)) * 1e3).to(dtype)
    t.view(-1)[where] = torch.finfo(dtype).max if bad is None else bad  # the largest finite value is finite
    assert all_finite(t) == bool(torch.isfinite(t).all()) == (bad is None)


def test_non_float_and_empty_tensors_are_finite():
    assert all_finite(torch.arange(5)) and all_finite(torch.empty(0, 3)) and all_finite(torch.zeros(3, dtype=torch.bool))
