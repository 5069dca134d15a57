"""Per-epoch checkpoints of a run, written atomically, and the resume from one.

A checkpoint holds everything the next epoch depends on: the model, the variant's state
(prototype EMA buffers, confusion matrices), the optimiser, the LR schedule, the sampler's
position, every random generator, the epoch, the metrics so far and the evaluator's record.
On a CPU a run resumed from it ends with the same metrics as the run that was never stopped.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carrot import contract

CHECKPOINT_FILE = "last.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sampler_state(loader: torch.utils.data.DataLoader) -> dict[str, Any]:
    """Where the training loader's sampling stands: the shuffling generator, or the P x K
    sampler's epoch counter."""
    state: dict[str, Any] = {}
    if loader.generator is not None:
        state["generator"] = loader.generator.get_state()
    if hasattr(loader.sampler, "labels"):  # MPerClassSampler also shuffles its class list in place
        # (a DistributedSampler needs nothing: set_epoch re-seeds it every epoch)
        state["pk_epoch"] = loader.sampler.epoch
        state["pk_labels"] = list(loader.sampler.labels)
    return state


def set_sampler_state(loader: torch.utils.data.DataLoader, state: dict[str, Any]) -> None:
    if "generator" in state and loader.generator is not None:
        loader.generator.set_state(state["generator"])
    if "pk_epoch" in state:
        loader.sampler.epoch = state["pk_epoch"]
        loader.sampler.labels[:] = state["pk_labels"]


class CheckpointError(OSError):
    """A checkpoint could not be written; the message names the file and the free space."""


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a reader never sees half a file. The file gets the
    permissions of any new file (the umask's), so workers of other users can resume from it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(exc, Exception):
            raise
        # torch reports a full disk as "unexpected pos ..." from its zip writer
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free on its disk"
        except OSError:
            free = "its disk unreadable"
        raise CheckpointError(f"cannot write checkpoint {path} ({free}): {contract.first_line(exc)}") from None


def _umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, for every thread)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)  # no /proc: read it by setting it (briefly strict, never lax)
    os.umask(umask)
    return umask


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def remove(folder: Path, keep_last: bool = False) -> None:
    """Delete a finished run's checkpoint folder (or everything in it but ``last.pt``)."""
    if not folder.exists():
        return
    if not keep_last:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for item in folder.iterdir():
        if item.name != CHECKPOINT_FILE:
            item.unlink(missing_ok=True)
