"""Clean interrupts: SIGTERM (a scheduler's pre-emption) and SIGINT stop the run at the next
step boundary; a second signal exits at once.

A second signal counts only when it comes more than :data:`REPEAT_S` after the first. One stop
request often arrives more than once: a signal sent to a process group reaches every process in
it, and the parents in it pass it on too (GNU make forwards SIGTERM to the command it runs, the
study's coordinator forwards a stop to its workers, ``carrot --nproc`` to its ranks). Those
copies come within milliseconds; a person who wants out now sends the second one later.

The first signal only sets a flag; the training and evaluation loops call :func:`check` between
steps, which raises :class:`Interrupted`. The run then closes its MLflow run as KILLED and its
trial as FAIL, both with the reason, and the command exits with 128 + the signal number.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

REPEAT_S = 3.0  # a signal within this many seconds of the first is the same request

_received: list[int] = []
_first_at: list[float] = []
_stores_opened: list[bool] = []  # a store was opened since the handlers were installed


class Interrupted(Exception):
    """A stop was requested by a signal; the message names it."""

    def __init__(self, signum: int, before_stores: bool = False) -> None:
        self.signum = signum
        self.before_stores = before_stores  # no store, hence no run, was made yet
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def relaunched_rank() -> bool:
    """A DDP rank that ``carrot --nproc k`` started (:func:`carrot.ddp.relaunch`): the command
    that started it tells the user about signals and their outcome, and its rank 0 about the run."""
    return "CARROT_DDP_STATUS_FILE" in os.environ and "RANK" in os.environ


def _handler(signum, frame) -> None:
    if _received:
        if time.monotonic() - _first_at[0] < REPEAT_S:  # a copy of the first request (see above)
            return
        # the second signal: no more waiting for a step boundary
        sys.stderr.write(f"carrot: {signal.Signals(signum).name} again: exiting now\n")
        sys.stderr.flush()
        os._exit(128 + signum)
    _received.append(signum)
    _first_at[:] = [time.monotonic()]
    if not relaunched_rank():
        sys.stderr.write(f"carrot: {signal.Signals(signum).name} received: stopping at the next step "
                         f"(send it again, {REPEAT_S:g} s or more later, to exit at once)\n")
        sys.stderr.flush()


def requested() -> int | None:
    """The signal number of a pending stop request, else None."""
    return _received[0] if _received else None


def check() -> None:
    """Raise :class:`Interrupted` when a stop was requested (call between steps)."""
    if _received:
        raise Interrupted(_received[0])


def before_store() -> None:
    """Call before opening a store (MLflow's, Optuna's): a stop requested before the command's
    first store raises :class:`Interrupted` there, so nothing is made; after it, this checks
    nothing (a run being closed after a stop opens stores too)."""
    if not _stores_opened:
        if _received:
            raise Interrupted(_received[0], before_stores=True)
        _stores_opened.append(True)


@contextlib.contextmanager
def graceful():
    """Install the SIGTERM/SIGINT handlers for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _stores_opened.clear()  # this command has opened none yet
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _received.clear()
        _first_at.clear()
        _stores_opened.clear()
