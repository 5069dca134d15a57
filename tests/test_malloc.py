"""``carrot.malloc``: every ``carrot`` command keeps freed CPU memory, so a training step stops
page-faulting its buffers in again (counted with ``getrusage``, in fresh processes)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

# A bhattacharyya step of the bench's scale, run after `carrot variants` (the entry point), after
# a Slurm array task that found no study (submitit's entry point, not carrot's), or alone;
# prints the minor page faults per step over 50 steps, after 30 in which the heap grows to
# hold every buffer a step takes, and whether a 31 MiB block then comes from the heap.
PROBE = """
import json, resource, sys
if sys.argv[1] == "cli":
    from carrot.cli import main
    main(["variants"])
elif sys.argv[1] == "worker":
    import tempfile
    from carrot.config import UserError
    from carrot.workers import StudyWorker
    with tempfile.TemporaryDirectory() as tmp:
        try:
            StudyWorker("nosuch://storage", "none", 1, f"file:{tmp}/mlruns")(0)
        except UserError:  # a store it cannot open: it stops before any trial
            pass
elif sys.argv[1] == "user":
    from carrot.malloc import keep_freed_blocks
    print(json.dumps({"set": keep_freed_blocks()}))
    raise SystemExit
import torch
from carrot.bench import EmbeddingBench
step = EmbeddingBench(torch.device("cpu"), 64, 16, 200, 2048, ["bhattacharyya"]).steps[0]
for _ in range(30):  # until the heap holds every buffer a step takes (tens of steps)
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50
# where a 31 MiB block comes from now: the heap (below the program break) or a mapping of its own
# (under glibc's defaults, a mapping unless the process freed a mapped block that large before)
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
libc.free.argtypes = [ctypes.c_void_p]
block = libc.malloc(31 << 20)
heap = block < libc.sbrk(0)
libc.free(block)
print(json.dumps({"faults": faults, "heap": heap}))
"""

# glibc's starting thresholds (mmap and trim at 128 KiB), held: every block above them is mapped
# and unmapped again each step, as in a fresh process before glibc raises its mmap threshold to
# the largest block it has freed (how far it has raised it by a given step depends on what the
# process freed before, so glibc's own defaults give anything from 0 to 1,400 faults a step here).
STARTING_THRESHOLDS = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def probe(mode: str, env: dict[str, str] | None = None) -> dict:
    import os

    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_entry_point_stops_the_steps_page_faults():
    """After carrot's entry point (and after a Slurm task's worker that found no study) a 31 MiB
    block comes from the heap, where glibc's defaults map it on its own; and a step faults less
    than a tenth as often as with glibc's starting thresholds held."""
    assert probe("plain")["heap"] is False  # glibc's defaults: a block this size is mapped
    untuned = probe("plain", STARTING_THRESHOLDS)["faults"]
    assert untuned > 1000, f"glibc's starting thresholds should fault here ({untuned} per step)"
    for mode in ("cli", "worker"):
        tuned = probe(mode)
        assert tuned["heap"] is True, mode
        assert tuned["faults"] < untuned / 10, (mode, tuned, untuned)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_users_malloc_setting_is_kept():
    assert probe("user") == {"set": True}
    assert probe("user", {"MALLOC_TRIM_THRESHOLD_": "131072"}) == {"set": False}
    assert probe("user", {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}) == {"set": False}
