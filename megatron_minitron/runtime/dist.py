"""Process groups: from torchrun's (or Slurm's) environment to megatron-core's parallel state.

This is the only module that touches megatron's `parallel_state` globals. Everything else receives a
`Runtime` and takes the process groups it needs from it, by name.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import socket
import subprocess
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from megatron_minitron.config import ConfigError, stage_layers


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How a model is split over the ranks; data-parallel size is what remains of the world."""

    tensor_parallel: int = 1
    """Tensor-parallel size (splits heads, query groups, MLP neurons and vocabulary)."""

    pipeline_parallel: int = 1
    """Pipeline-parallel size (splits the layers into stages)."""

    sequence_parallel: bool = False
    """Split activations outside attention/MLP along the sequence over the tensor-parallel group."""

    first_stage_layers: Optional[int] = None
    """Layers on the first pipeline stage, for an uneven layout (None: even split)."""

    last_stage_layers: Optional[int] = None
    """Layers on the last pipeline stage, for an uneven layout (None: even split)."""

    expert_parallel: int = 1
    """Expert-parallel size: MoE layers split their routed experts over this many ranks, taken from the
    tensor x data-parallel ranks of a pipeline stage (experts are also split over TP: expert TP = TP),
    so it must divide the data-parallel size and the number of experts."""

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1 or self.expert_parallel < 1:
            raise ConfigError(f"tensor/pipeline/expert parallel sizes must be >= 1, got TP={self.tensor_parallel}, "
                              f"PP={self.pipeline_parallel}, EP={self.expert_parallel}")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ConfigError("sequence_parallel needs tensor_parallel > 1")

    @property
    def model_parallel(self) -> int:
        """Ranks holding one copy of the model."""
        return self.tensor_parallel * self.pipeline_parallel

    def data_parallel(self, world_size: int) -> int:
        """Data-parallel size for a world; a clear error if the world cannot hold whole model copies."""
        if world_size % self.model_parallel:
            raise ConfigError(f"world size {world_size} is not divisible by TP x PP = {self.tensor_parallel} x "
                              f"{self.pipeline_parallel}; launch a multiple of {self.model_parallel} processes")
        dp = world_size // self.model_parallel
        if dp % self.expert_parallel:
            raise ConfigError(f"expert-parallel size {self.expert_parallel} does not divide the data-parallel size "
                              f"{dp} (world size {world_size} / (TP x PP)): expert-parallel ranks are data-parallel "
                              f"ranks of each stage; launch a multiple of "
                              f"{self.model_parallel * self.expert_parallel} processes or lower --ep")
        return dp

    def check_arch(self, arch) -> None:
        """Raise ConfigError if this layout cannot hold the model (sizes that must divide, and
        megatron-core's rule that MoE layers under tensor parallelism need sequence parallelism)."""
        arch.check_parallel(tensor_parallel=self.tensor_parallel, pipeline_parallel=self.pipeline_parallel,
                            expert_parallel=self.expert_parallel, first_stage_layers=self.first_stage_layers,
                            last_stage_layers=self.last_stage_layers)
        if arch.is_moe and self.tensor_parallel > 1 and not self.sequence_parallel:
            raise ConfigError(f"a Mixture-of-Experts model at tensor-parallel size {self.tensor_parallel} needs "
                              f"sequence parallelism (megatron-core requires it for MoE layers): add "
                              f"--sequence-parallel")

    def layers_per_stage(self, num_layers: int) -> list[int]:
        """Layers on each pipeline stage for a model of num_layers."""
        return stage_layers(num_layers, self.pipeline_parallel, self.first_stage_layers, self.last_stage_layers)


@dataclass(frozen=True, kw_only=True)
class LaunchEnv:
    """Where this process sits in the job, read from torchrun's or Slurm's environment."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    master_addr: str
    """Rendezvous host."""
    master_port: int
    """Rendezvous port."""

    @classmethod
    def from_environ(cls, environ: Optional[dict[str, str]] = None) -> "LaunchEnv":
        """torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else Slurm's SLURM_PROCID/..., else a single process."""
        env = dict(os.environ if environ is None else environ)
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        else:
            rank, world, local = 0, 1, 0
        addr = env.get("MASTER_ADDR") or (_first_slurm_host(env) if "SLURM_JOB_NODELIST" in env else "127.0.0.1")
        if "MASTER_PORT" in env:
            port = int(env["MASTER_PORT"])
        elif "SLURM_JOB_ID" in env:
            port = 20000 + int(env["SLURM_JOB_ID"]) % 20000
        elif world == 1:
            port = free_port()
        else:
            raise ConfigError("MASTER_PORT is not set: launch with torchrun, srun under Slurm, or export "
                              "MASTER_ADDR and MASTER_PORT")
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is outside world size {world}")
        return cls(rank=rank, world_size=world, local_rank=local, master_addr=addr, master_port=port)


def _first_slurm_host(env: dict[str, str]) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0]


def free_port() -> int:
    """A TCP port free on this host right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """This rank's place in the parallel layout, with the process groups by name."""

    env: LaunchEnv
    """Launch environment."""
    parallel: ParallelConfig
    """Requested layout."""
    device: torch.device
    """cuda:LOCAL_RANK or cpu."""
    backend: str
    """nccl or gloo."""
    cpu_patches: tuple[str, ...]
    """CPU runtime patches installed (empty on GPU)."""

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def data_parallel(self) -> int:
        return self.parallel.data_parallel(self.world_size)

    # The group accessors below read megatron's parallel_state, which this module initialised.
    @property
    def tp_group(self):
        return _ps().get_tensor_model_parallel_group()

    @property
    def pp_group(self):
        return _ps().get_pipeline_model_parallel_group()

    @property
    def dp_group(self):
        return _ps().get_data_parallel_group()

    @property
    def ep_group(self):
        return _ps().get_expert_model_parallel_group()

    @property
    def ep_rank(self) -> int:
        return _ps().get_expert_model_parallel_rank()

    @property
    def replicas(self) -> int:
        """Model replicas that may run different inputs of different shapes (evaluation, generation). A
        Mixture-of-Experts token dispatcher exchanges tokens within an expert-parallel group, so with EP > 1
        the ranks of one group must run the same forward passes: a replica is then a whole EP group
        (megatron's expert-data-parallel size, data_parallel / EP)."""
        return self.data_parallel // self.parallel.expert_parallel

    @property
    def replica_rank(self) -> int:
        """This rank's replica, 0 .. replicas - 1 (equal over an expert-parallel group)."""
        if self.parallel.expert_parallel == 1:
            return self.dp_rank
        return _ps().get_expert_data_parallel_rank()

    @property
    def tp_rank(self) -> int:
        return _ps().get_tensor_model_parallel_rank()

    @property
    def pp_rank(self) -> int:
        return _ps().get_pipeline_model_parallel_rank()

    @property
    def dp_rank(self) -> int:
        return _ps().get_data_parallel_rank()

    @property
    def is_first_stage(self) -> bool:
        return _ps().is_pipeline_first_stage(ignore_virtual=True)

    @property
    def is_last_stage(self) -> bool:
        return _ps().is_pipeline_last_stage(ignore_virtual=True)

    @property
    def last_stage_rank(self) -> int:
        """Global rank of this rank's peer on the last pipeline stage (same TP and DP position): the
        source of what only the last stage computes, such as losses."""
        return _ps().get_pipeline_model_parallel_last_rank()

    @property
    def is_logging_rank(self) -> bool:
        """The rank that prints: last pipeline stage, first tensor- and data-parallel rank."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0

    def barrier(self) -> None:
        torch.distributed.barrier()

    def new_control_group(self):
        """A new gloo group over every rank, for Python-object messages (broadcast_object_list,
        gather_object) beside the model's NCCL groups; every rank must call this, in the same order."""
        return torch.distributed.new_group(backend="gloo")


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def use_cuda() -> bool:
    """Whether this process runs on GPUs (NCCL) rather than CPUs (gloo + CPU runtime)."""
    return torch.cuda.is_available()


def moe_token_dispatcher(backend: str) -> str:
    """megatron's MoE token dispatcher for a backend, chosen here only: "alltoall" on NCCL (GPUs),
    "allgather" on gloo, whose all_to_all_single megatron's all-to-all dispatcher cannot use."""
    return "alltoall" if backend == "nccl" else "allgather"


def init_process_group(env: LaunchEnv, timeout_minutes: int = 30) -> tuple[torch.device, str, tuple[str, ...]]:
    """torch.distributed from the environment: NCCL on GPU, gloo (and the CPU runtime) on CPU."""
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    if use_cuda():
        device, backend, patches = torch.device("cuda", env.local_rank), "nccl", ()
        torch.cuda.set_device(device)
    else:
        from megatron_minitron.runtime import cpu
        from megatron_minitron.runtime.host_memory import keep_freed_memory

        device, backend, patches = torch.device("cpu"), "gloo", cpu.install()
        keep_freed_memory()
    if not torch.distributed.is_initialized():
        # init_method="env://" (not an explicit tcp:// address, which hangs under torchrun).
        torch.distributed.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                             timeout=datetime.timedelta(minutes=timeout_minutes))
    return device, backend, patches


def initialize(parallel: ParallelConfig, *, seed: int = 1234, env: Optional[LaunchEnv] = None) -> Runtime:
    """Initialise torch.distributed and megatron's model-parallel state; seed every RNG."""
    env = env or LaunchEnv.from_environ()
    parallel.data_parallel(env.world_size)  # clear error before any group is created
    device, backend, patches = init_process_group(env)
    ps = _ps()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=parallel.tensor_parallel,
                                 pipeline_model_parallel_size=parallel.pipeline_parallel,
                                 expert_model_parallel_size=parallel.expert_parallel)
    runtime = Runtime(env=env, parallel=parallel, device=device, backend=backend, cpu_patches=patches)
    set_seed(seed)
    return runtime


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron's tensor-parallel RNG tracker (same seed on every rank;
    megatron offsets the tensor-parallel stream by the TP rank)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Tear down megatron's groups, then torch.distributed (in that order: 4-process gloo runs can
    abort at exit otherwise)."""
    ps = _ps()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def host_group() -> Iterator[Optional["torch.distributed.ProcessGroup"]]:
    """The world of a CPU-only multi-process job that needs no model parallelism (the offline pruner under
    torchrun or srun): a gloo group over every launched process, or None when only one was launched.
    An already initialised world is reused and left as it was."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    created = not torch.distributed.is_initialized()
    if created:
        torch.distributed.init_process_group("gloo")  # from the environment (an explicit tcp URL hangs)
    try:
        yield torch.distributed.group.WORLD
    finally:
        if created:
            torch.distributed.destroy_process_group()


@contextlib.contextmanager
def private_world() -> Iterator[None]:
    """A one-process gloo world (in-memory store, no network) for library code that calls
    torch.distributed.get_rank() without checking is_initialized() (megatron-core 0.16.1's BlendedDataset
    on an index cache miss), destroyed right after; an existing process group is left untouched."""
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def session(parallel: ParallelConfig, *, seed: int = 1234, env: Optional[LaunchEnv] = None) -> Iterator[Runtime]:
    """initialize() ... shutdown() as a context manager."""
    runtime = initialize(parallel, seed=seed, env=env)
    try:
        yield runtime
    finally:
        shutdown()
