"""Process groups, device and backend choice, and the CPU runtime."""

from megatron_minitron.runtime.dist import (LaunchEnv, ParallelConfig, Runtime, initialize, session, set_seed,
                                            shutdown, use_cuda)

__all__ = ["LaunchEnv", "ParallelConfig", "Runtime", "initialize", "session", "set_seed", "shutdown", "use_cuda"]
