"""Where a process sits in the job, from torchrun's or Slurm's environment."""

from __future__ import annotations

import pytest

from megatron_minitron.config import ConfigError
from megatron_minitron.runtime import LaunchEnv, ParallelConfig


def test_torchrun_environment():
    env = LaunchEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
                                  "MASTER_PORT": "29400"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 4, 1, "node7", 29400)


def test_slurm_environment_without_torchrun():
    env = LaunchEnv.from_environ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                                  "MASTER_ADDR": "head", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "head")
    assert env.master_port == 20000 + 123456 % 20000  # the same on every task of the job


def test_single_process_gets_a_free_port():
    env = LaunchEnv.from_environ({})
    assert (env.rank, env.world_size) == (0, 1) and env.master_port > 0


def test_multi_process_without_port_is_an_error():
    with pytest.raises(ConfigError, match="MASTER_PORT is not set"):
        LaunchEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2"})


def test_world_must_hold_whole_model_copies():
    with pytest.raises(ConfigError, match="world size 6 is not divisible by TP x PP = 2 x 2"):
        ParallelConfig(tensor_parallel=2, pipeline_parallel=2).data_parallel(6)
    assert ParallelConfig(tensor_parallel=2).data_parallel(8) == 4
    with pytest.raises(ConfigError, match="sequence_parallel needs tensor_parallel > 1"):
        ParallelConfig(sequence_parallel=True)
