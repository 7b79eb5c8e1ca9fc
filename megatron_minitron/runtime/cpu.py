"""The CPU runtime: the few patches that let real megatron-core run on a CPU-only PyTorch with gloo.

megatron-core assumes CUDA in a handful of places (see DESIGN.md §2). On a machine without CUDA,
`install()` covers exactly these, and nothing else:

1. `cuda_api`     - `torch.cuda.current_device()` (passed as `device=` everywhere) returns "cpu",
                    `torch.cuda.synchronize()` is a no-op;
2. `factories`    - tensor factories called with a literal `device="cuda"` (pipeline schedules, the
                    optimizer, grad clipping, dist-checkpoint exchange) allocate on the CPU instead;
3. `tensor_cuda`  - `Tensor.cuda()` returns the tensor itself;
4. `tensor_type`  - `Tensor.type()` reports CPU tensors as `torch.cuda.*` types, which the optimizer
                    and grad clipping assert on;
5. `rng_tracker`  - the CUDA RNG-states tracker of `tensor_parallel.random` is replaced by one that
                    forks CPU generator states;
6. `distopt_ckpt` - distributed-optimizer checkpoints with the torch Adam fallback: building the load
                    state dict on an optimizer with empty state asserts, and loading leaves one `step`
                    tensor shared by all parameters (Adam then drifts after resume), so it is cloned;
7. `cuda_streams` - `torch.cuda.Stream`, `current_stream` and `stream`: MoE's all-to-all token dispatcher
                    and shared-expert overlap create side streams and wait on events recorded on them
                    (`record_event().synchronize()`); on a CPU every operation is already in order,
                    so streams and events are stubs that do nothing;
8. `moe_te_gemm`  - `moe_utils.te_general_gemm` is only defined when Transformer Engine imports, but the
                    router's GEMM tests it for None: without TE it is set to None (the torch matmul path).

WrappedTorchNorm's refusal of sequence parallelism is not patched: our local layer spec uses its own
norm module instead (`model/norm.py`). On a machine with CUDA nothing is patched. The patches were
written against one megatron-core version; any other version is refused with a clear error.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch

SUPPORTED_MEGATRON_CORE = ("0.16.1",)
PATCHES = ("cuda_api", "factories", "tensor_cuda", "tensor_type", "rng_tracker", "distopt_ckpt", "cuda_streams",
           "moe_te_gemm")
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "as_tensor", "zeros_like", "ones_like",
              "empty_like", "full_like", "rand", "randn", "randint")

_installed: list[str] = []


class UnsupportedMegatronVersion(RuntimeError):
    """The installed megatron-core is not the version the CPU runtime was written and tested for."""


def megatron_core_version() -> str:
    """Version string of the installed megatron-core."""
    from megatron.core import package_info

    return package_info.__version__


def check_version(version: str | None = None) -> None:
    """Refuse a megatron-core version the CPU patches were not written for."""
    version = version or megatron_core_version()
    if version not in SUPPORTED_MEGATRON_CORE:
        raise UnsupportedMegatronVersion(
            f"megatron-core {version} is installed, but the CPU runtime of megatron-minitron was written and "
            f"tested for megatron-core {', '.join(SUPPORTED_MEGATRON_CORE)}. Install that version "
            f"(pip install megatron-core=={SUPPORTED_MEGATRON_CORE[-1]}) or run on a machine with CUDA, "
            f"where no patch is needed.")


def installed() -> tuple[str, ...]:
    """Names of the patches currently installed (empty with CUDA)."""
    return tuple(_installed)


def install() -> tuple[str, ...]:
    """Install every CPU patch once; a no-op when CUDA is available. Returns the patch names."""
    if torch.cuda.is_available():
        return ()
    if _installed:
        return tuple(_installed)
    check_version()
    _patch_cuda_api()
    _patch_factories()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    _patch_tensor_type()
    _patch_rng_tracker()
    _patch_distopt_checkpoint()
    _patch_cuda_streams()
    _patch_moe_te_gemm()
    _installed.extend(PATCHES)
    return tuple(_installed)


def _on_cpu(device: Any) -> Any:
    return "cpu" if device is not None and str(device).startswith("cuda") else device


def _patch_cuda_api() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _patch_factories() -> None:
    for name in _FACTORIES:
        original = getattr(torch, name)

        @functools.wraps(original)
        def factory(*args: Any, _original: Callable = original, **kwargs: Any) -> torch.Tensor:
            if "device" in kwargs:
                kwargs["device"] = _on_cpu(kwargs["device"])
            return _original(*args, **kwargs)

        setattr(torch, name, factory)


def _patch_tensor_type() -> None:
    original = torch.Tensor.type

    def tensor_type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        if dtype is None:
            name = original(self)
            return name if self.is_cuda else name.replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's named RNG states, held as CPU generator states."""

        def add(self, name: str, seed: int) -> None:
            if seed in self.seeds_:
                raise RuntimeError(f"RNG seed {seed} is already tracked")
            if name in self.states_:
                raise RuntimeError(f"RNG state {name!r} is already tracked")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise RuntimeError(f"RNG state {name!r} is not tracked")
            outside = torch.random.get_rng_state()
            torch.random.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.random.get_rng_state()
                torch.random.set_rng_state(outside)

    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # model_parallel_cuda_manual_seed() calls initialize_rng_tracker(); keep it from replacing ours.
    mrandom.initialize_rng_tracker = lambda *args, **kwargs: None


def _patch_distopt_checkpoint() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original_sharded_state_dict = DistributedOptimizer.sharded_state_dict
    original_load_state_dict = DistributedOptimizer.load_state_dict

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading: bool = False, *args, **kwargs):
        if is_loading and not self.optimizer.state:
            self._init_optimizer_states_with_dummy_values()
        return original_sharded_state_dict(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    def load_state_dict(self, state_dict):
        original_load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def set_main_param_and_optimizer_states(self, model_param, tensors):
        group_index, order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][order]
        targets = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, target in targets.items():
                if key != "step" and key in tensors and torch.is_tensor(target):
                    target.copy_(tensors[key])

    DistributedOptimizer.sharded_state_dict = sharded_state_dict
    DistributedOptimizer.load_state_dict = load_state_dict
    DistributedOptimizer._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states


class CPUEvent:
    """A recorded point on a CPU "stream": everything before it has already happened."""

    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True


class CPUStream:
    """Stands in for torch.cuda.Stream: CPU operations run in program order, so there is nothing to
    order between streams."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def record_event(self, event: Any = None) -> CPUEvent:
        return event if event is not None else CPUEvent()

    def synchronize(self) -> None:
        return None


_DEFAULT_STREAM = CPUStream()


def _patch_cuda_streams() -> None:
    torch.cuda.Stream = CPUStream
    torch.cuda.current_stream = lambda *args, **kwargs: _DEFAULT_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()


def _patch_moe_te_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not moe_utils.HAVE_TE:
        moe_utils.te_general_gemm = None
