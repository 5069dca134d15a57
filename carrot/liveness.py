"""Dead workers: a trial whose worker died without cleaning up (SIGKILL, the OOM killer, a lost
node) is found, closed and retried.

Each running trial carries its worker (host, pid, the process's start time) and a heartbeat
timestamp in its user attrs, refreshed by a background thread. A trial is dead when its worker
ran on this host and that process is gone (or the pid now belongs to another process), or when
its heartbeat is older than the grace period. Journal storage has no heartbeat of its own, so
this record is the only one there; RDB storages also run Optuna's heartbeat. A dead trial is
set to FAIL with the reason, its MLflow run is closed as KILLED with the reason, and Optuna's
``RetryHeartbeatStaleTrialCallback`` enqueues its configuration again (at most ``MAX_RETRY``
times); the retry resumes from the dead trial's last checkpoint. Finished trials are never
touched.
"""
from __future__ import annotations

import copy
import os
import socket
import threading
import time
from typing import Callable

import warnings

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

# Optuna marks its retry callback and the RDB heartbeat experimental; the warning would repeat
# on every trial of every worker
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
from optuna.trial import FrozenTrial, TrialState

from carrot import contract

WORKER_ATTR = "carrot.worker"
HEARTBEAT_ATTR = "carrot.heartbeat"
ERROR_ATTR = "error"
HEARTBEAT_INTERVAL_S = float(os.environ.get("CARROT_HEARTBEAT_S", 30))
# a worker on another host is dead after this long without a heartbeat
GRACE_PERIOD_S = float(os.environ.get("CARROT_GRACE_S", 300))
MAX_RETRY = 2
# a worker records itself on its trial within milliseconds of the trial's start: a running trial
# without that record this long after its start lost its worker before it could (a kill then)
UNCLAIMED_S = 60.0


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/<pid>/stat), None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_worker() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start_time(os.getpid())}


def is_dead(trial: FrozenTrial, now: float | None = None, grace: float | None = None) -> str | None:
    """Why ``trial`` (RUNNING) has no live worker, or None while it may be alive."""
    now = time.time() if now is None else now
    grace = GRACE_PERIOD_S if grace is None else grace
    worker = trial.user_attrs.get(WORKER_ATTR)
    if isinstance(worker, dict) and worker.get("host") == socket.gethostname():
        reason = gone(worker)
        return None if reason is None else f"worker {reason}"
    if worker is None and trial.datetime_start is not None and now - trial.datetime_start.timestamp() > UNCLAIMED_S:
        return f"no worker recorded itself on it in the {now - trial.datetime_start.timestamp():.0f} s since it started"
    beat = trial.user_attrs.get(HEARTBEAT_ATTR)
    if beat is None and trial.datetime_start is not None:
        beat = trial.datetime_start.timestamp()
    if beat is not None and now - float(beat) > grace:
        where = f" on {worker['host']}" if isinstance(worker, dict) else ""
        return f"no heartbeat from its worker{where} for {now - float(beat):.0f} s"
    return None


class Heartbeat:
    """Records this worker on a trial and refreshes its heartbeat until stopped."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, interval: float | None = None) -> None:
        self.storage, self.trial_id = study._storage, trial._trial_id
        self.interval = HEARTBEAT_INTERVAL_S if interval is None else interval
        self._stop = threading.Event()
        trial.set_user_attr(WORKER_ATTR, this_worker())
        trial.set_user_attr(HEARTBEAT_ATTR, time.time())
        self._thread = threading.Thread(target=self._beat, name="carrot-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.set_trial_user_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
            except Exception:  # a finished trial, or a storage hiccup: the next beat tries again
                pass

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def close_run(run_id: str | None, reason: str) -> None:
    """End a trial's MLflow run as KILLED with the reason, unless it already ended."""
    if not run_id:
        return
    from carrot.tracking import client

    mlf = client()
    try:
        run = mlf.get_run(run_id)
    except Exception:
        return
    if run.info.status in ("RUNNING", "SCHEDULED"):
        mlf.set_tag(run_id, contract.TAG_ERROR, reason)
        mlf.set_tag(run_id, contract.MLFLOW_NOTE, f"killed: {reason}")
        mlf.set_tag(run_id, contract.TAG_STATUS, "killed")
        mlf.set_terminated(run_id, "KILLED")


def gone(worker: object) -> str | None:
    """Why the process of a worker record (:func:`this_worker`) is gone, or None while it may
    be alive: a record of another host, or of an unknown shape, may be."""
    if not isinstance(worker, dict) or worker.get("host") != socket.gethostname():
        return None
    pid = int(worker.get("pid", -1))
    if pid == os.getpid():
        return None
    if not os.path.isdir("/proc"):  # no start times to compare (macOS): the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"process {pid} on {worker['host']} is gone"
        except OSError:  # alive, another user's
            pass
        return None
    started = process_start_time(pid)
    if started is None or (worker.get("start") is not None and started != worker["start"]):
        return f"process {pid} on {worker['host']} is gone"
    return None


def close_dead_runs(experiment: str, role: str, log: Callable[[str], None] = print) -> list[str]:
    """Close as KILLED, with the reason, the RUNNING runs of ``role`` (final or train runs, which
    no trial tracks) in ``experiment`` whose process on this host is gone (SIGKILL, the OOM
    killer); the ids of those closed. A run of another host, or without a worker record, is
    left as it is."""
    import json

    from carrot.tracking import client, find_runs

    closed = []
    for run in find_runs(client(), experiment, f"tags.`{contract.TAG_ROLE}` = '{role}' and "
                                               "attributes.status = 'RUNNING'"):
        try:
            worker = json.loads(run.data.tags.get(contract.TAG_WORKER, "null"))
        except ValueError:
            continue
        reason = gone(worker)
        if reason is None:
            continue
        close_run(run.info.run_id, f"its {reason}")
        log(f"closed {role} run {run.info.run_id} ({run.info.run_name}) as KILLED: its {reason}")
        closed.append(run.info.run_id)
    return closed


def unrecorded_runs(study: optuna.Study, trial: FrozenTrial) -> list[str]:
    """The RUNNING MLflow runs of ``trial`` that it holds no record of: its worker was killed
    after starting the run and before recording the run's id on the trial. Found by the study id
    and trial number its runs are tagged with."""
    study_id = study.user_attrs.get(contract.STUDY_ID_ATTR)
    if not study_id:
        return []
    from carrot.tracking import client

    try:
        mlf = client()
        experiments = [e.experiment_id for e in mlf.search_experiments()]
        found = mlf.search_runs(experiments, filter_string=(
            f"tags.`{contract.TAG_STUDY_ID}` = '{study_id}' AND tags.`{contract.TAG_TRIAL}` = '{trial.number}' "
            f"AND tags.`{contract.TAG_ROLE}` = '{contract.ROLE_TRIAL}' AND attributes.status = 'RUNNING'"))
    except Exception:  # the store unreachable now: the run stays open, as before
        return []
    return [r.info.run_id for r in found]


# what belongs to one attempt, not to the configuration a retry runs again: its worker and
# heartbeat (a retry that inherited them would look dead until it stamps its own), its error
# and its MLflow run
ATTEMPT_ATTRS = (WORKER_ATTR, HEARTBEAT_ATTR, ERROR_ATTR, contract.TRIAL_RUN_ID_ATTR, contract.TRIAL_RUN_URL_ATTR)


INTERRUPTED = "interrupted by "  # how the error of a trial that a signal stopped begins


def failures_counted(study: optuna.Study, trial: FrozenTrial) -> int:
    """How many times the configuration of ``trial`` (failed) has failed, itself included, not
    counting the attempts that a signal stopped (a pre-emption is not the configuration's fault)."""
    errors = {t.number: str(t.user_attrs.get(ERROR_ATTR) or "") for t in study.get_trials(deepcopy=False)}
    errors[trial.number] = str(trial.user_attrs.get(ERROR_ATTR) or "")
    history = [*trial.system_attrs.get("retry_history", ()), trial.number]
    return sum(not errors.get(number, "").startswith(INTERRUPTED) for number in history)


class RetryDeadTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a stale trial, which also closes the trial's MLflow run; the retry
    keeps the trial's user attrs but those of the attempt (:data:`ATTEMPT_ATTRS`). ``max_retry``
    counts the failures of the configuration (:func:`failures_counted`), not its interruptions."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        reason = trial.user_attrs.get(ERROR_ATTR) or "worker stopped sending heartbeats"
        run_id = trial.user_attrs.get(contract.TRIAL_RUN_ID_ATTR)
        for run in [run_id] if run_id else unrecorded_runs(study, trial):
            close_run(run, reason)
        if self._max_retry is not None and failures_counted(study, trial) > self._max_retry:
            return
        trial = copy.copy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in ATTEMPT_ATTRS}
        budget, self._max_retry = self._max_retry, None  # counted above: Optuna would count every attempt
        try:
            super().__call__(study, trial)
        finally:
            self._max_retry = budget


def reap(study: optuna.Study, log: Callable[[str], None] = print, grace: float | None = None,
         max_retry: int = MAX_RETRY) -> list[int]:
    """Fail every RUNNING trial of ``study`` whose worker is dead, close its run, enqueue a
    retry; returns the numbers of the trials it failed."""
    reaped = []
    retry = RetryDeadTrial(max_retry=max_retry)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = is_dead(trial, grace=GRACE_PERIOD_S if grace is None else grace)
        if reason is None:
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, ERROR_ATTR, reason)
            if not study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
        except Exception:  # another worker reaped it first
            continue
        reaped.append(trial.number)
        frozen = study._storage.get_trial(trial._trial_id)
        retries = failures_counted(study, frozen) - 1  # retries of this configuration's failures so far
        log(f"trial {trial.number}: {reason}; marked failed" +
            (", its configuration is queued again" if retries < max_retry else ", retried too often already"))
        retry(study, frozen)
    return reaped
