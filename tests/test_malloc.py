"""``carrot.malloc``: every ``carrot`` command keeps freed CPU memory, so a training step stops
page-faulting its buffers in again (counted with ``getrusage``, in fresh processes)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

# A bhattacharyya step of the bench's scale, run after `carrot variants` (the entry point), after
# a Slurm array task that found no study (submitit's entry point, not carrot's), or alone;
# prints the minor page faults per step over 50 steps, after 100 in which the heap grows to
# hold every buffer a step takes.
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
for _ in range(100):  # until the heap holds every buffer a step takes (tens of steps)
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    step()
print(json.dumps({"faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50}))
"""


def probe(mode: str, env: dict[str, str] | None = None) -> dict:
    import os

    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_entry_point_stops_the_steps_page_faults():
    untuned, tuned = probe("plain")["faults"], probe("cli")["faults"]
    assert untuned > 100, f"glibc's defaults should fault here ({untuned} per step)"
    assert tuned < untuned / 10, (tuned, untuned)
    worker = probe("worker")["faults"]
    assert worker < untuned / 10, (worker, untuned)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_users_malloc_setting_is_kept():
    assert probe("user") == {"set": True}
    assert probe("user", {"MALLOC_TRIM_THRESHOLD_": "131072"}) == {"set": False}
    assert probe("user", {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}) == {"set": False}
