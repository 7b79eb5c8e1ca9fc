"""Each CPU-runtime patch does what megatron-core needs of it (run in-process; CUDA is absent here)."""

from __future__ import annotations

import pytest
import torch

from megatron_minitron.runtime import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runtime is inactive with CUDA")


@pytest.fixture(scope="module", autouse=True)
def patches():
    return cpu.install()


def test_all_patches_installed_once(patches):
    assert patches == cpu.PATCHES
    assert cpu.install() == cpu.PATCHES  # idempotent


def test_current_device_and_synchronize():
    assert torch.cuda.current_device() == "cpu"
    torch.cuda.synchronize()  # would raise "Torch not compiled with CUDA enabled" unpatched
    x = torch.ones(2, device=torch.cuda.current_device())
    assert x.device.type == "cpu"


@pytest.mark.parametrize("make", [
    lambda: torch.zeros(3, device="cuda"), lambda: torch.empty(3, device="cuda"),
    lambda: torch.tensor([1.0], device="cuda"), lambda: torch.full((2,), 1.0, device="cuda"),
    lambda: torch.arange(3, device="cuda"), lambda: torch.zeros_like(torch.ones(2), device="cuda"),
    lambda: torch.empty_like(torch.ones(2), device="cuda"), lambda: torch.randn(2, device="cuda"),
])
def test_literal_cuda_factories_allocate_on_cpu(make):
    assert make().device.type == "cpu"


def test_factories_keep_other_devices_and_values():
    assert torch.zeros(2, device="meta").device.type == "meta"
    assert torch.arange(4).tolist() == [0, 1, 2, 3]


def test_tensor_cuda_and_type():
    x = torch.ones(2)
    assert x.cuda() is x
    assert x.type() == "torch.cuda.FloatTensor"
    assert x.type(torch.float64).dtype == torch.float64  # conversion still works


def test_rng_tracker_forks_independent_reproducible_streams():
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert type(tracker).__name__ == "CPURNGStatesTracker"
    torch.manual_seed(0)
    outside_before = torch.random.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.random.get_rng_state(), outside_before)  # default stream untouched
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the forked stream advanced
    tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=0, ep_rank=0, etp_rank=0)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a)  # same seed, same stream
    tensor_parallel.model_parallel_cuda_manual_seed(5, tp_rank=1, ep_rank=0, etp_rank=0)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        assert not torch.equal(torch.rand(4), a)  # another TP rank, another stream


def test_distopt_patch_is_installed():
    # Behaviour (exact resume with the distributed optimizer) is tested in test_foundation_multirank.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    assert DistributedOptimizer.load_state_dict.__module__ == cpu.__name__
    assert DistributedOptimizer.sharded_state_dict.__module__ == cpu.__name__


def test_unknown_megatron_version_is_refused_with_the_fix():
    with pytest.raises(cpu.UnsupportedMegatronVersion, match=r"megatron-core 0\.15\.0 is installed.*0\.16\.1"):
        cpu.check_version("0.15.0")
    cpu.check_version(cpu.megatron_core_version())  # the installed one is supported


def test_cuda_streams_are_ordered_stubs():
    """What megatron's all-to-all dispatcher does with its device-to-host stream (token_dispatcher.py,
    _maybe_dtoh_and_synchronize): each call raises "requires CUDA support" unpatched."""
    side = torch.cuda.Stream()
    on_side = torch.cuda.current_stream() != side
    assert on_side
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        moved = torch.ones(3, device="cuda").to("cpu", non_blocking=True)
    side.record_event().synchronize()
    assert moved.tolist() == [1.0, 1.0, 1.0]


def test_moe_router_gemm_runs_without_transformer_engine():
    """The router's GEMM reads moe_utils.te_general_gemm, which megatron defines only when TE imports
    (NameError otherwise); with the patch it takes the torch path and matches a plain matmul."""
    from megatron.core.transformer.moe import moe_utils

    assert not moe_utils.HAVE_TE and moe_utils.te_general_gemm is None
    inp = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(4, 8, requires_grad=True)
    out = moe_utils.router_gating_linear(inp, weight, None, torch.float32)
    torch.testing.assert_close(out, inp @ weight.t())
    out.sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones(5, 4).t() @ inp.detach())
