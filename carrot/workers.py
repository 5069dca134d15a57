"""Parallel study workers on one machine: ``carrot study --jobs n`` (``make study JOBS=n``).

The coordinating process opens the study once (its id, trial 0, the one parent run, the
stores' first use, all under the study's lock), then starts n ``carrot worker`` processes on it.
Each worker gets its own sampler seed and, on a machine with GPUs, its own GPU
(``CUDA_VISIBLE_DEVICES``). Together they run until the study holds the asked-for number of
finished trials; the coordinator shows one progress line for the whole study. Each worker's
output goes to ``studies/logs/<study>/worker-<i>.log``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import optuna

from carrot import contract, interrupt

POLL_S = 2.0


def gpu_assignment(jobs: int, gpus: int, nproc: int = 1) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` of each worker: its own ``nproc`` GPUs (one, or a DDP group),
    round robin when there are fewer than ``jobs * nproc``; None without GPUs."""
    if not gpus:
        return [None] * jobs
    if nproc > gpus:
        from carrot.config import ConfigError

        raise ConfigError(f"invalid nproc={nproc}: this machine has {gpus} GPU(s); expected at most {gpus}")
    groups = max(1, gpus // nproc)
    return [",".join(str((i % groups) * nproc + j) for j in range(nproc)) for i in range(jobs)]


def worker_env(env: dict[str, str], gpus: str | None, jobs: int, nproc: int = 1) -> dict[str, str]:
    """One worker's environment: its GPUs (``CUDA_VISIBLE_DEVICES``), and, where ``jobs x nproc``
    processes share the machine, an equal share of its cores (``OMP_NUM_THREADS``, unless
    set): oversubscribed OpenMP threads wait on each other."""
    if nproc * jobs > 1:
        from carrot.ddp import share_threads

        share_threads(env, nproc * jobs)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    return env


def run_workers(opened, storage: str | None, trials: int, jobs: int, log: Callable[[str], None] = print,
                keep_checkpoints: bool = False, nproc: int = 1) -> list[BaseException]:
    from carrot.study import DEFAULT_JOURNAL, _finished

    study = opened.study
    until = _finished(study) + trials
    folder = Path(DEFAULT_JOURNAL.parent, "logs", contract.file_name(opened.name))
    folder.mkdir(parents=True, exist_ok=True)
    import torch

    devices = gpu_assignment(jobs, torch.cuda.device_count() if torch.cuda.is_available() else 0, nproc)
    procs = []
    for i in range(jobs):
        command = ["carrot.cli", "worker", "--study-name", opened.name, "--until", str(until),
                   "--worker-index", str(i + 1), "--no-progress"]
        if nproc > 1:  # one torchrun group per worker: a DDP trial of nproc ranks at a time
            from carrot.ddp import torchrun_argv

            argv = torchrun_argv(nproc, command)
        else:
            argv = [sys.executable, "-m", *command]
        if storage:
            argv += ["--storage", storage]
        if keep_checkpoints:
            argv.append("--keep-checkpoints")
        env = worker_env(dict(os.environ), devices[i], jobs, nproc)
        logfile = open(folder / f"worker-{i + 1}.log", "w")
        procs.append((subprocess.Popen(argv, env=env, stdout=logfile, stderr=subprocess.STDOUT), logfile))
    log(f"study {opened.name}: {jobs} worker(s)" + (f" of {nproc} DDP processes" if nproc > 1 else "")
        + f" until {until} finished trials; logs in {folder}")
    shown = None
    stopping = False
    try:
        while any(p.poll() is None for p, _ in procs):
            if interrupt.requested() and not stopping:  # pass the stop on; each worker ends its trial cleanly
                stopping = True
                for p, _ in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            state = _progress(study)
            if state != shown:
                shown = state
                log(f"[study {opened.name}] {state[0]}/{until} trials finished ({state[1]} complete, "
                    f"{state[2]} pruned, {state[3]} failed, {state[4]} running)"
                    + (f" best {state[5]:.4f}" if state[5] is not None else ""))
            _pause(POLL_S, stopping)
    finally:
        for p, logfile in procs:
            p.wait()
            logfile.close()
    # a stopped worker exits 143 or 130; one that the signal reached while it was still starting
    # (before its handler was installed, so before any trial), -15 or -2
    stopped = (143, 130, -signal.SIGTERM, -signal.SIGINT) if stopping else (143, 130)
    failed = [(i + 1, p.returncode) for i, (p, _) in enumerate(procs) if p.returncode not in (0, *stopped)]
    for index, code in failed:
        tail = (folder / f"worker-{index}.log").read_text().strip().splitlines()[-1:] or [""]
        log(f"worker {index} exited with status {code}: {tail[0]}")
    if stopping or interrupt.requested():
        return [interrupt.Interrupted(interrupt.requested() or signal.SIGTERM)]
    return []


def _pause(seconds: float, stopping: bool) -> None:
    """Wait ``seconds`` before the next look at the study, returning within a tenth of a second
    of a stop request (unless already ``stopping``): the stop is passed on to the workers well
    inside the window in which they take it for the same request (carrot.interrupt.REPEAT_S)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (stopping or not interrupt.requested()):
        time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))


def _progress(study: optuna.Study) -> tuple:
    from carrot.study import retried_numbers

    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)  # a failed trial whose retry is queued counts as its retry does
    count = {s: sum(t.state == s and t.number not in retried for t in trials) for s in (S.COMPLETE, S.PRUNED,
                                                                                         S.FAIL, S.RUNNING)}
    best = max((t.value for t in trials if t.state == S.COMPLETE), default=None)
    return (count[S.COMPLETE] + count[S.PRUNED] + count[S.FAIL], count[S.COMPLETE], count[S.PRUNED],
            count[S.FAIL], count[S.RUNNING], best)


try:  # submitit requeues a Checkpointable callable when its Slurm job is pre-empted or times out
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # pragma: no cover - submitit is a dependency
    _Checkpointable = object


class StudyWorker(_Checkpointable):
    """One Slurm array task: ``carrot worker`` in-process. On pre-emption submitit requeues it
    (``checkpoint``); the requeued task finds the interrupted trial dead, fails and retries it
    from its last epoch checkpoint."""

    def __init__(self, storage: str | None, name: str, until: int, tracking_uri: str) -> None:
        self.storage, self.name, self.until, self.tracking_uri = storage, name, until, tracking_uri

    def __call__(self, index: int) -> int:
        from carrot.malloc import keep_freed_blocks
        from carrot.study import join_study

        keep_freed_blocks()  # as `carrot worker` does (carrot/malloc.py)
        os.environ.setdefault("MLFLOW_TRACKING_URI", self.tracking_uri)
        stopped = join_study(self.storage, self.name, until=self.until, worker=index,
                             overrides={"show_progress": False})
        return 1 if stopped else 0


def submit_workers(opened, storage: str | None, trials: int, jobs: int, executor,
                   log: Callable[[str], None] = print) -> list:
    """Submit ``jobs`` workers as one job array on a submitit executor (Slurm, or the local
    executor that runs the same code path here) and wait for them."""
    from carrot.study import _finished
    from carrot.tracking import tracking_uri

    from carrot.study import DEFAULT_JOURNAL

    until = _finished(opened.study) + trials
    if storage is None or "://" not in storage:  # the task may start in another folder
        storage = str(Path(storage or DEFAULT_JOURNAL).resolve())
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    worker = StudyWorker(storage, opened.name, until, uri)
    submitted = executor.map_array(worker, list(range(1, jobs + 1)))
    array = submitted[0].job_id.split("_")[0]
    log(f"study {opened.name}: {jobs} worker{'s' if jobs != 1 else ''} submitted as job array {array} "
        f"until {until} finished trials; logs in {executor.folder}")
    return [job.result() for job in submitted]


def slurm_executor(folder: Path, jobs: int, partition: str | None, gpus_per_task: int, time_min: int):
    """A submitit Slurm executor for a job array of ``jobs`` study workers."""
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    params = {"timeout_min": time_min, "gpus_per_node": gpus_per_task, "tasks_per_node": 1,
              "slurm_array_parallelism": jobs}
    if partition:
        params["slurm_partition"] = partition
    executor.update_parameters(**params)
    return executor
