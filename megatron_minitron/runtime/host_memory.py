"""Host memory of CPU runs: keep freed heap memory in the process instead of handing it back to the
kernel, so a forward pass does not fault its activations' pages in again on every micro-batch.

glibc's malloc serves large blocks (above a threshold it moves between 128 KB and 32 MB as blocks are
freed) with their own mmap, unmaps them on free, and trims the top of the heap once enough of it is
free. A CPU forward pass allocates and frees activations of the same sizes on every micro-batch, so
whether each one costs a round of page faults depends on where those thresholds happen to stand,
which any other allocation can move. Measured on the `small` preset at TP2 with 512 tokens: the same
forward pass took 5 or 130,000-270,000 minor page faults (up to 0.75 s of system time in a 3 s pass),
depending on what the importance hooks had allocated before; with both thresholds fixed high, passes
with and without hooks faulted alike, 3 to 28,000 times (varying between runs of this VM).

This sets them once per process (`mallopt`, where the C library is glibc): blocks up to 1 GiB come
from the heap, and the heap keeps up to 1 GiB of free memory. The price is resident memory. Over 36
passes of that forward pass (half with hooks), the resident size grew with glibc's defaults too, to
a plateau of 2.1 GB while every pass kept faulting (220,000-290,000 times); with these settings it
reached 3.0 GB after 24 passes, and the passes after that faulted no page at all. With every large
block mapped (MALLOC_MMAP_THRESHOLD_=131072) it stays at 0.4 GB and faults 720,000 times a pass.
Variables that already set these thresholds (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, or their
GLIBC_TUNABLES names) or another allocator (LD_PRELOAD of jemalloc, tcmalloc or mimalloc) are left
alone.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
LIMIT = 1 << 30

_done: list[bool] = []


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds at 1 GiB, once per process; whether they were set (False
    without glibc's mallopt, under another allocator, or when the environment sets them)."""
    if _done:
        return _done[0]
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    user_set = (any(os.environ.get(name) for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
                or "malloc.mmap_threshold" in tunables or "malloc.trim_threshold" in tunables)
    other_allocator = any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc"))
    ok = False
    if not user_set and not other_allocator:
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):  # not glibc (musl, macOS)
            mallopt = None
        if mallopt is not None:
            ok = bool(mallopt(M_MMAP_THRESHOLD, LIMIT)) and bool(mallopt(M_TRIM_THRESHOLD, LIMIT))
    _done.append(ok)
    return ok


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss it does not carry over the
    parent's peak through fork+exec, which is how spawn starts workers)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
