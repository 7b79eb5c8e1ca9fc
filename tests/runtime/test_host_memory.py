"""The CPU runtime's malloc settings: freed activation memory stays in the process, so allocating the
same size again does not fault its pages in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROGRAM = r"""
import resource, sys
import torch
from megatron_minitron.runtime.host_memory import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    print("unsupported"); sys.exit(0)
def faults_filling(n):
    x = torch.empty(n, dtype=torch.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x.fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_filling(64 << 20)  # an activation-sized block, freed
print(faults_filling(64 << 20))  # the same size again
"""


def faults_of_second_fill(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_freed_blocks_are_reused_without_page_faults():
    kept = faults_of_second_fill("keep")
    if kept == "unsupported":
        pytest.skip("no glibc mallopt here (or the environment sets the malloc thresholds)")
    # 64 MiB is 16,384 pages: glibc's default unmaps such a block on free, so the second fill faults
    # every page in again; kept in the heap, it faults none
    assert int(faults_of_second_fill("default")) > 10_000
    assert int(kept) < 1_000


def test_thresholds_set_by_the_environment_are_left_alone():
    program = "from megatron_minitron.runtime.host_memory import keep_freed_memory; print(keep_freed_memory())"
    for env in ({"MALLOC_MMAP_THRESHOLD_": "131072"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
                {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}):
        out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}).stdout.strip()
        assert out == "False", env
