"""Multi-process trials (``--nproc k``): PyTorch DDP launched through ``torch.distributed.run``.

A trial of k processes is one torchrun job: every rank trains on its slice of each global
batch (:func:`carrot.loaders.make_loader`), DDP averages the gradients, and the variants gather
their batch statistics (:mod:`carrot.geometry.distributed`), so a step equals one process on
the whole global batch. Rank 0 alone evaluates, logs to MLflow, reports to Optuna and writes
checkpoints; what it decides (go on, pruned, failed) is broadcast with :func:`on_main`, so every
rank leaves a trial at the same epoch.

In a study, a torchrun group is one worker: rank 0 runs the Optuna loop and broadcasts each
trial's configuration before training it; the other ranks :func:`follow` until it broadcasts
the end. NCCL on CUDA (one GPU per rank, ``LOCAL_RANK``), gloo on CPU. A collective that waits
longer than ``CARROT_DDP_TIMEOUT_S`` seconds (default 1800) fails the trial.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

TIMEOUT_S = float(os.environ.get("CARROT_DDP_TIMEOUT_S", "1800"))
STATUS_ENV = "CARROT_DDP_STATUS_FILE"  # where rank 0 leaves the command's exit status (see relaunch)
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """This process was started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> None:
    """Join the process group torchrun set up (NCCL when CUDA is present, else gloo)."""
    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))


def shutdown(wait: bool = True) -> None:
    """Leave the process group (``wait``: once every rank is done), before the interpreter
    exits: gloo's threads abort a process that exits with the group still open."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """Rank's own GPU under DDP on CUDA; ``device`` otherwise."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def broadcast(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object); ``obj`` itself when not distributed."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


class RemoteFailure(RuntimeError):
    """Raised on the other ranks when rank 0 failed (its own exception is re-raised there)."""


def on_main(fn: Callable[[], Any], pruned: type[BaseException] | None = None) -> Any:
    """Run ``fn`` on rank 0 only and make every rank leave together: when it raises,
    rank 0 re-raises it and the others raise ``pruned`` (for a ``pruned``) or
    :class:`RemoteFailure`. Returns ``fn``'s result on rank 0, None elsewhere."""
    if not active():
        return fn()
    outcome: tuple[str, str] = ("ok", "")
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as exc:  # told to the other ranks before it propagates
            error = exc
            outcome = ("pruned" if pruned and isinstance(exc, pruned) else "failed", str(exc))
    outcome = broadcast(outcome)
    if error is not None:
        raise error
    if outcome[0] == "pruned" and pruned is not None:
        raise pruned(outcome[1])
    if outcome[0] == "failed":
        raise RemoteFailure(f"rank 0 failed: {outcome[1]}")
    return result


def torchrun_argv(nproc: int, module_argv: list[str]) -> list[str]:
    """The command that runs ``python -m <module_argv>`` as ``nproc`` ranks on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", *module_argv]


def share_threads(env: dict[str, str], processes: int) -> dict[str, str]:
    """``env`` with ``OMP_NUM_THREADS`` (unless set) giving each of ``processes`` concurrent
    ranks an equal share of this machine's cores, so they do not oversubscribe it."""
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return env


def _die_with_parent() -> None:
    """In the torchrun child, before it starts: SIGTERM when the launching command dies (Linux),
    so that a killed command takes its ranks with it although they run in a session of their own."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux ``/proc``; empty elsewhere)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``carrot <argv>`` as ``nproc`` DDP ranks through torchrun and return its exit status.

    torchrun runs in a session of its own, so that a Ctrl-C to the terminal's process group
    reaches only this command, which passes a stop request (SIGTERM or SIGINT, also one sent to
    this process alone, as a scheduler does) on to the ranks themselves: each ends its step and
    its run as a single process does, and torchrun never turns the signal into a traceback."""
    import subprocess
    import tempfile

    from carrot import interrupt

    env = share_threads(dict(os.environ), nproc)
    fd, status_file = tempfile.mkstemp(prefix="carrot-ddp-", suffix=".status")
    os.close(fd)
    env[STATUS_ENV] = status_file
    try:
        proc = subprocess.Popen(torchrun_argv(nproc, ["carrot.cli", *argv]), env=env, start_new_session=True,
                                preexec_fn=_die_with_parent)
        passed_on = False
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            signum = interrupt.requested()
            if signum is not None and not passed_on:
                passed_on = True
                for pid in _child_pids(proc.pid) or [proc.pid]:
                    try:
                        os.kill(pid, signum)
                    except ProcessLookupError:
                        pass
        text = Path(status_file).read_text().strip()
        return int(text) if text else code
    finally:
        os.unlink(status_file)


def exit_status(code: int) -> int:
    """A rank's exit status. Under :func:`relaunch` rank 0 writes the command's status for
    the launcher and every rank exits 0, so that an error already reported in one line is
    not reported again by torchrun as a failed child with its traceback."""
    path = os.environ.get(STATUS_ENV)
    if not path or not launched():
        return code
    if int(os.environ.get("RANK", "0")) == 0:
        Path(path).write_text(str(code))
    return 0
