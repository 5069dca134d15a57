"""Keep freed CPU memory in the process, so a training step does not page-fault its buffers in again.

A CPU training step allocates and frees the same few MiB-sized buffers every step. glibc's
malloc serves a block above its mmap threshold (128 KiB at first, raised only to the
largest block freed so far) with a fresh ``mmap`` and returns free memory at the top of the
heap beyond its trim threshold to the system, so each step touches new pages again: one
minor page fault per 4 KiB, about a thousand per step for ``bhattacharyya`` at B=64,
D=3584, which cost it a quarter of its step. Whether a step faults therefore depends on
what the process happened to free before it: the same step faults about 500 times a step
after a failed attempt to open a store and twice after opening an SQLite one.
:func:`keep_freed_blocks` fixes both thresholds (blocks up to 32 MiB from the heap, 256 MiB
of free heap kept), so every process trains the same way; the memory a process holds then
stays at its peak instead of shrinking between steps. It is what every ``carrot`` command
(and a Slurm array task of ``carrot study --launcher slurm``) does first. A user's own
``MALLOC_*_`` or ``GLIBC_TUNABLES`` malloc setting is left as it is; other C libraries are
left alone.
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 256 << 20


def user_chose() -> bool:
    """Whether the environment already sets glibc's malloc thresholds."""
    return any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) or \
        "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


def keep_freed_blocks() -> bool:
    """Set glibc's mmap and trim thresholds (module doc); True when both were set."""
    if user_chose():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: no library search at start-up
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
