"""The Optuna study orchestrator: one study per (dataset, backbone, variant).

Trial 0 is the variant's recommended setting; TPE (seeded) proposes the rest; a median
pruner stops weak trials on per-epoch validation accuracy. Every trial is one MLflow run
under one parent run per study. Running the same study again continues it.

Storage: a journal file under ``studies/`` by default (safe for several processes on one
machine, unlike SQLite), or any URL given with ``--storage`` (PostgreSQL for several
machines).
"""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from carrot import checkpoint, contract, ddp, interrupt, liveness
from carrot.config import ConfigError, RunConfig, set_dotted
from carrot.contract import redact
from carrot.progress import Progress
from carrot.tracking import RunLogger, StoreError, check_writable, client, find_runs, flatten, tracking_uri
from carrot.variants import get_variant_class

DEFAULT_JOURNAL = Path(contract.DEFAULT_STORAGE)
DEFAULT_CHECKPOINTS = DEFAULT_JOURNAL.parent / "checkpoints"
BASE_CONFIG_ATTR = "base_config"  # the whole configuration a study was created with (workers read it)
PK_M_CHOICES = [2, 4, 8]  # samples per class in a P x K batch: divisors of the usual batch sizes


def train_space(cfg: RunConfig) -> dict[str, BaseDistribution]:
    """Searched for every variant, so the baseline is tuned as fairly as the regularizers:
    the learning rate (and weight decay, when it is not 0), with ranges centred on the
    configured values that trial 0 uses, and the sampler (unless the config pins it)."""
    space: dict[str, BaseDistribution] = {
        "optim.lr": FloatDistribution(cfg.optim.lr / 10, cfg.optim.lr * 3, log=True)}
    if cfg.optim.weight_decay > 0:
        space["optim.weight_decay"] = FloatDistribution(cfg.optim.weight_decay / 10, cfg.optim.weight_decay * 3,
                                                        log=True)
    if cfg.data.sampler == "auto":
        space["data.sampler"] = CategoricalDistribution(["pk", "random"])
        space["data.m_per_class"] = CategoricalDistribution(PK_M_CHOICES)
    return space


def study_name(cfg: RunConfig) -> str:
    return contract.study_name(cfg.data.dataset_id, cfg.model.backbone, cfg.variant.name)


def fixed_config(cfg: RunConfig) -> dict[str, Any]:
    """The part of the configuration a study does not search: it must not change when a study
    is continued, or trials trained under different budgets would be compared."""
    return cfg.experiment_dict(searched=False)


def suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    """Draw ``name`` from ``trial`` with the distribution ``dist``."""
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    raise TypeError(f"unsupported distribution for {name!r}: {dist!r}")


def contains(dist: BaseDistribution, value: Any) -> bool:
    """Whether ``value`` is a point of ``dist`` (a recommended setting must be one)."""
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(dist, IntDistribution) and not isinstance(value, int):
        return False
    return dist.low <= value <= dist.high


class StorageMissing(ConfigError):
    """The Optuna storage named does not exist (and was not to be created)."""


def open_storage(url: str | None, create: bool = True):
    """A journal file (default, or a path), or an RDB URL such as postgresql://... With
    ``create=False`` (joining a study) a journal file or SQLite database that does not exist is
    an error instead of a new, empty storage. An in-memory SQLite storage is refused: a study
    there ends with the process."""
    interrupt.before_store()
    if url is None or "://" not in url:
        path = Path(url) if url else DEFAULT_JOURNAL
        if path.is_dir():
            raise ConfigError(f"--storage {path} is a folder; expected the path of a journal file (for example "
                              f"{path / 'optuna.journal'}) or a database URL")
        if not create and not path.is_file():
            raise StorageMissing(f"no Optuna storage at {path}; expected the journal file of a study "
                                 "started with `carrot study` (--storage)")
        check_writable(path.parent if str(path.parent) else Path("."), "Optuna study storage")
        path.parent.mkdir(parents=True, exist_ok=True)
        return open_journal(path)
    given = url
    db = contract.sqlite_file(url)
    if db is not None:
        if not db:
            raise ConfigError(f"--storage {url}: no SQLite file named (an in-memory database ends with the "
                              "process); expected sqlite:///path/to/file.db, three slashes before a relative path")
        if not create and not Path(db).is_file():
            raise StorageMissing(f"no Optuna storage at {url}; expected the database of a study started with "
                                 "`carrot study` (--storage)")
    if url.startswith("postgresql://"):  # SQLAlchemy's default driver for it is psycopg2; ours is psycopg 3
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    for attempt in range(3):  # two workers creating the tables of an empty database: one may lose
        try:  # Optuna's heartbeat fails the trials of dead workers; the callback retries them
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=max(1, int(liveness.HEARTBEAT_INTERVAL_S)),
                grace_period=max(1, int(liveness.GRACE_PERIOD_S)),
                heartbeat_stale_trial_callback=liveness.RetryDeadTrial(max_retry=liveness.MAX_RETRY))
        except Exception as exc:
            error = exc
            if "import" in str(exc).lower():  # a missing driver will not appear by waiting
                break
            time.sleep(1.0 + attempt)
    raise StoreError(redact(f"cannot open Optuna storage {given}: {contract.first_line(error)}", url)) from None


def open_journal(path: Path):
    """The Optuna journal storage in the file ``path``. A last record cut short (a write that a
    kill or a full disk interrupted) is removed first, with a line on stderr, under Optuna's own
    lock of the file, so no append is under way then: Optuna would otherwise append the next
    record onto it, and the journal could not be read again. A record damaged anywhere else is
    one error line naming the file and the line."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

    # Optuna's lock is a symbolic link to the journal, written as the path it is given: a relative
    # path made a link that points nowhere (relative to its own folder), which Optuna can never
    # free when its holder is killed (it waits for ever). Optuna gets the absolute path; a link
    # that points nowhere and is older than Optuna's grace period is removed here.
    target = str(path.absolute())
    _free_dangling_lock(Path(target + ".lock"), path)
    if _cut_short(path) and os.access(path, os.W_OK):
        lock = JournalFileSymlinkLock(target)  # the lock Optuna's appends take
        if os.path.lexists(target + ".lock"):  # perhaps left by the process killed mid-append
            print(f"carrot: {path}: waiting for Optuna's lock of the file (one left by a killed process is "
                  "freed after 30 s)", file=sys.stderr)
        lock.acquire()
        try:
            with open(path, "rb+") as fh:
                data = fh.read()
                end = data.rfind(b"\n") + 1
                if end < len(data):  # still cut short under the lock: not an append under way
                    fh.truncate(end)
                    fh.flush()
                    os.fsync(fh.fileno())
                    print(f"carrot: {path}: its last record was cut short (a write interrupted by a kill or a "
                          f"full disk); removed its {len(data) - end} bytes", file=sys.stderr)
        finally:
            lock.release()
    try:
        return JournalStorage(JournalFileBackend(target))
    except ValueError as exc:  # json.JSONDecodeError is one; Optuna's "Invalid log format." another
        raise StoreError(f"the Optuna journal {path} is damaged: {journal_damage(path) or exc}; expected one "
                         "JSON record per line (keep a copy of the file, and continue in another --storage "
                         "or cut the file before that line, losing what was recorded after it)") from None


LOCK_GRACE_S = 30.0  # Optuna's grace period for a journal lock (JournalFileSymlinkLock)


def _free_dangling_lock(lock: Path, journal: Path) -> None:
    """Remove a lock link of the journal that points nowhere and is older than Optuna's grace
    period (a lock is held for milliseconds), with a line on stderr."""
    try:
        if os.path.exists(lock) or time.time() - os.lstat(lock).st_mtime <= LOCK_GRACE_S:
            return
        os.unlink(lock)
    except OSError:  # no such link, or another process removed it first
        return
    print(f"carrot: {journal}: removed a stale lock of the file ({lock.name}, left by a killed process)",
          file=sys.stderr)


def _cut_short(path: Path) -> bool:
    """The file's last byte is not the end of a record (read without any lock: a hint)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"
    except OSError:
        return False


def journal_damage(path: Path) -> str:
    """Where an Optuna journal file stops being one JSON record per line ('' when it does not)."""
    import json

    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.endswith(b"\n"):
                return f"line {number} is cut short"
            try:
                json.loads(line)
            except ValueError as exc:
                return f"line {number} is not a JSON record ({exc})"
    return ""


def search_space(cfg: RunConfig) -> dict[str, BaseDistribution]:
    """Everything a study of ``cfg.variant`` searches, minus what the user pinned with
    ``--set variant.hparams.<name>=...``."""
    space = {**train_space(cfg), **get_variant_class(cfg.variant.name).full_search_space()}
    return {k: v for k, v in space.items() if k not in cfg.variant.hparams}


def recommended_params(cfg: RunConfig) -> dict[str, Any]:
    """Trial 0: the design note's setting and the configured optimiser values."""
    resolved = cfg.resolved()
    values = {"optim.lr": cfg.optim.lr, "optim.weight_decay": cfg.optim.weight_decay,
              "data.sampler": resolved.data.sampler, "data.m_per_class": cfg.data.m_per_class,
              **resolved.variant.hparams}
    space = search_space(cfg)
    outside = sorted(k for k in space if k in values and not contains(space[k], values[k]))
    if outside:
        raise ConfigError(f"the recommended setting of {cfg.variant.name!r} lies outside its search space "
                          f"for {outside}")
    return {k: values[k] for k in space if k in values}


def trial_config(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """``base`` with a trial's parameters: dotted keys are config keys, the rest the variant's."""
    data = base.to_dict()
    for key, value in params.items():
        set_dotted(data, key if "." in key else f"variant.hparams.{key}", value)
    return RunConfig.from_dict(data)


@dataclass
class StudySummary:
    name: str
    storage: str
    tracking_uri: str
    parent_run_id: str
    n_trials: int
    n_complete: int
    n_pruned: int
    n_failed: int
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any]
    best_run_id: str | None
    study_id: str = ""


def _parent_run(cfg: RunConfig, name: str, study_id: str, storage_label: str) -> RunLogger:
    """The study's one parent run, found by the study's id (a study is its storage and its
    name, never its name alone). Callers hold the study's lock, so two workers never both
    create it."""
    mlf = client()
    found = find_runs(mlf, cfg.experiment,
                      f"tags.`{contract.TAG_STUDY_ID}` = '{study_id}' and "
                      f"tags.`{contract.TAG_ROLE}` = '{contract.ROLE_STUDY}'",
                      order_by=["attributes.start_time ASC"])
    if found:
        logger = RunLogger(mlf, found[0].info.run_id)
        mlf.update_run(found[0].info.run_id, status="RUNNING")
        return logger
    from carrot.train import run_tags

    tags = run_tags(cfg, name, None)
    tags.update({contract.TAG_ROLE: contract.ROLE_STUDY, contract.TAG_TRIAL: "", contract.TAG_STUDY_ID: study_id,
                 contract.TAG_STUDY_STORAGE: storage_label})
    return RunLogger.start(cfg.experiment, name, tags)


def study_id_of(study: optuna.Study) -> str:
    """The study's unique id, given at creation and kept in its user attrs."""
    sid = study.user_attrs.get(contract.STUDY_ID_ATTR)
    if sid is None:
        sid = uuid.uuid4().hex[:16]
        study.set_user_attr(contract.STUDY_ID_ATTR, sid)
    return sid


def checkpoint_folder(root: Path, study_id: str, number: int) -> Path:
    return root / study_id / f"trial-{number}"


def study_lock(storage: str | None, name: str):
    """A file lock for setting a study up (schema, study, trial 0, parent run): workers started
    together on one machine take turns. Across machines the database's own constraints and the
    study's stored ids keep it consistent."""
    from filelock import FileLock

    interrupt.before_store()
    folder = Path(storage).parent if storage and "://" not in storage else DEFAULT_JOURNAL.parent
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f".{contract.file_name(name)}.lock"), timeout=300)


@dataclass
class OpenStudy:
    """A study ready for trials: everything a worker needs."""

    study: optuna.Study
    store: Any
    name: str
    study_id: str
    label: str  # the storage as shown (password redacted)
    base: RunConfig
    parent: RunLogger
    space: dict[str, BaseDistribution]
    reference: Any  # carrot.reference.ReferencePairs


def _sampler(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)


def _pruner() -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)  # never before 4 full trials


def open_study(base: RunConfig, storage: str | None = None, name: str | None = None,
               log: Callable[[str], None] = print, worker: int = 0) -> OpenStudy:
    """Create or continue the study of ``base`` (or ``name``): check that its fixed
    configuration did not change, give it an id, fail the trials of dead workers, queue the
    recommended setting once, and find or create its one parent run; under the study's lock."""
    from carrot import reference as references
    from carrot.reference import count_classes

    name = name or study_name(base)
    label = redact(storage or str(DEFAULT_JOURNAL), storage or "")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is reported in one line
    with study_lock(storage, name):
        store = open_storage(storage)
        # The sampler's seed moves with the study's length (a continued study does not replay
        # the start-up draws) and with the worker (workers started together draw apart).
        existing = 0
        try:
            existing = len(optuna.load_study(study_name=name, storage=store).trials)
        except KeyError:
            pass
        study = optuna.create_study(study_name=name, storage=store, direction="maximize", load_if_exists=True,
                                    sampler=_sampler((base.seed + existing + 1000 * worker) % 2**32), pruner=_pruner())
        study.set_metric_names([f"{base.split}/acc"])
        fixed = fixed_config(base)
        stored = study.user_attrs.get("fixed_config")
        if stored is not None and stored != fixed:
            before, now = flatten("", stored), flatten("", fixed)
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ConfigError(f"study {name!r} was created with a different configuration ({', '.join(changed)} "
                              "differ); continue it with the same settings, or fork a new study with --study-name "
                              "(STUDY=)")
        if stored is None:
            study.set_user_attr("fixed_config", fixed)
            study.set_user_attr(BASE_CONFIG_ATTR, base.to_dict())
            for key, value in {"dataset": base.data.dataset_id, "backbone": base.model.backbone,
                               "variant": base.variant.name, "split": base.split}.items():
                study.set_user_attr(key, value)
        study_id = study_id_of(study)
        liveness.reap(study, log)  # trials of dead workers: closed, queued again
        recommended = recommended_params(base)
        live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
        # a queued trial keeps its parameters in the system attrs until it starts
        if not any(t.state in live and (t.params or t.system_attrs.get("fixed_params")) == recommended
                   for t in study.trials):
            study.enqueue_trial(recommended)  # trial 0, or again if it failed
        parent = _parent_run(base, name, study_id, label)
        reference = references.for_study(study, base, store, count_classes(base), log)
    return OpenStudy(study, store, name, study_id, label, base, parent, search_space(base), reference)


def work(opened: OpenStudy, trials: int | None = None, until: int | None = None, log: Callable[[str], None] = print,
         checkpoint_root: Path = DEFAULT_CHECKPOINTS, keep_checkpoints: bool = False,
         show_progress: bool = True) -> list[BaseException]:
    """Run trials of an opened study: ``trials`` more, or until the study holds ``until``
    finished trials (several workers share that count). Returns the interrupt that stopped it,
    if any (the trial it stopped failed with the reason and is queued again)."""
    from carrot.train import TrialPruned, failure_reason, run

    study, base, name, study_id, parent = opened.study, opened.base, opened.name, opened.study_id, opened.parent
    finished = _finished(study) if trials is None else 0
    total = trials if trials is not None else max(0, until - finished)
    if until is not None and total == 0:
        log(f"study {name} already holds {finished} finished trials (--until {until}): nothing to run")
    bar = Progress(total=total, desc=f"study {name}", enabled=show_progress and base.show_progress, log=log,
                   unit="trial")
    done = 0
    stopped: list[BaseException] = []
    # an interrupted trial (a signal, a pre-emption) is not broken: it is queued again however often
    requeue = liveness.RetryDeadTrial(max_retry=None)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(liveness.WORKER_ATTR, liveness.this_worker())  # at once: see liveness.UNCLAIMED_S
        trial.set_user_attr(liveness.ERROR_ATTR, None)  # a configuration queued with user attrs may carry one
        params = {key: suggest(trial, key, dist) for key, dist in opened.space.items()}
        cfg = trial_config(base, params)
        frozen = study._storage.get_trial(trial._trial_id)
        history = frozen.system_attrs.get("retry_history", [])  # set by the retry callback
        resume = None
        # a retry: continue from the newest checkpoint of the trials it descends from (a retry that
        # was stopped before its first epoch ended left none of its own)
        for number in reversed(history):
            path = checkpoint_folder(checkpoint_root, study_id, number) / checkpoint.CHECKPOINT_FILE
            if path.exists():
                resume = path
                break
        # a torchrun group: the other ranks train the same trial (see follow)
        ddp.broadcast({"config": cfg.to_dict(), "resume_from": None if resume is None else str(resume),
                       "number": trial.number})
        with liveness.Heartbeat(study, trial):
            try:
                result = run(cfg, trial, study=name, parent_run_id=parent.run_id, log=log,
                             reference=opened.reference,
                             extra_tags={contract.TAG_ROLE: contract.ROLE_TRIAL, contract.TAG_STUDY_ID: study_id},
                             checkpoint_dir=checkpoint_folder(checkpoint_root, study_id, trial.number),
                             resume_from=resume, keep_checkpoint=keep_checkpoints)
            except TrialPruned as exc:
                trial.set_user_attr("pruned_reason", str(exc))
                raise optuna.TrialPruned(str(exc)) from None
        for number in history:  # the trials this one retried are done with their checkpoints
            checkpoint.remove(checkpoint_folder(checkpoint_root, study_id, number))
        return result.objective

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal done
        if stopped and trial.state == optuna.trial.TrialState.FAIL:  # interrupted: the command's last line
            requeue(study, trial)  # says so; its configuration runs again when the study goes on
            return
        done += 1
        value = "-" if trial.value is None else f"{trial.value:.4f}"
        best = study.best_value if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) else None
        bar.update(done, trial=trial.number, value=float("nan") if trial.value is None else trial.value,
                   best=float("nan") if best is None else best)
        if trial.state == optuna.trial.TrialState.FAIL:
            log(f"trial {trial.number} failed: {trial.user_attrs.get(liveness.ERROR_ATTR) or 'see the log above'}")
        elif trial.state == optuna.trial.TrialState.PRUNED:
            log(f"trial {trial.number} pruned: {trial.user_attrs.get('pruned_reason', '')}".rstrip(": "))
        else:
            log(f"trial {trial.number} finished: {base.split}/acc={value}")
        if not stopped and interrupt.requested():  # a stop that came after the trial's last step:
            stopped.append(interrupt.Interrupted(interrupt.requested()))  # no next trial, and the
            study.stop()  # command ends as a stopped one (128 + the signal)
        if not stopped:
            liveness.reap(study, log)
        if until is not None and _finished(study, with_running=True) >= until:
            study.stop()  # the trials other workers are running complete the count

    def guarded(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except optuna.TrialPruned:
            raise
        except interrupt.Interrupted as exc:
            trial.set_user_attr(liveness.ERROR_ATTR, str(exc))
            stopped.append(exc)
            study.stop()
            raise
        except Exception as exc:  # one failing trial never takes the study down
            trial.set_user_attr(liveness.ERROR_ATTR, redact(failure_reason(exc)))
            logging.getLogger("carrot").debug(traceback.format_exc())
            raise

    try:
        if total > 0:
            study.optimize(guarded, n_trials=None if until is not None else total, catch=(Exception,),
                           callbacks=[after_trial], gc_after_trial=True)
    finally:
        bar.close()
    return stopped


def follow(log: Callable[[str], None] = print) -> None:
    """The ranks other than 0 of a torchrun worker: train each trial rank 0 broadcasts (its
    configuration and checkpoint), until it broadcasts the end. Rank 0 tracks and reports;
    a trial that ends (pruned, failed) ends on every rank at the same epoch."""
    from carrot.train import run

    while True:
        order = ddp.broadcast(None)
        if order is None:
            return
        resume = order["resume_from"]
        try:
            run(RunConfig.from_dict(order["config"]), track=False, log=log,
                resume_from=None if resume is None else Path(resume))
        except interrupt.Interrupted:
            raise
        except Exception as exc:  # rank 0 records it; this rank waits for the next trial
            log(f"rank {ddp.rank()}: trial {order['number']} ended: {exc}".splitlines()[0])


def retried_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """The numbers of the failed trials whose configuration was queued again: the retry stands
    for them (Optuna's retry callbacks list every trial a retry descends from in
    ``retry_history``)."""
    return {number for t in trials for number in t.system_attrs.get("retry_history", ())}


def _finished(study: optuna.Study, with_running: bool = False) -> int:
    """Finished trials towards a worker's ``--until``: complete, pruned and failed ones, except a
    failed trial whose retry is queued or running (the retry's outcome counts instead, so a
    worker that reaps a dead trial still runs its retry)."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    states = done + ((optuna.trial.TrialState.RUNNING,) if with_running else ())
    return sum(t.state in states and t.number not in retried for t in trials)


def summarize(opened: OpenStudy) -> StudySummary:
    """The study's counts and best trial; logged on its parent run."""
    study, parent = opened.study, opened.parent
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    summary = StudySummary(
        name=opened.name, storage=opened.label, tracking_uri=redact(tracking_uri()),
        parent_run_id=parent.run_id, n_trials=len(states),
        n_complete=len(complete), n_pruned=states.count(optuna.trial.TrialState.PRUNED),
        n_failed=states.count(optuna.trial.TrialState.FAIL),
        best_number=best.number if best else None, best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
        best_run_id=best.user_attrs.get(contract.TRIAL_RUN_ID_ATTR) if best else None,
        study_id=opened.study_id,
    )
    if best is not None:
        parent.log_metrics({"study/best_value": best.value, "study/n_trials": len(states)}, step=len(states))
        parent.set_tags({contract.TAG_BEST_TRIAL: best.number, contract.TAG_BEST_RUN_ID: summary.best_run_id or ""})
    return summary


def run_study(base: RunConfig, trials: int, storage: str | None = None, log: Callable[[str], None] = print,
              name: str | None = None, checkpoint_root: Path = DEFAULT_CHECKPOINTS,
              keep_checkpoints: bool = False, jobs: int = 1, launcher: str = "local",
              slurm: dict[str, Any] | None = None, nproc: int = 1) -> StudySummary:
    """Add ``trials`` trials to the study of ``base``'s dataset, backbone and variant (or the
    study ``name``), in this process or in ``jobs`` worker processes. A signal stops it after the
    current step: the trial fails with the reason and is queued again, resuming from its
    checkpoint, when the study is continued. With ``nproc`` > 1 each worker is a torchrun
    group training every trial with DDP on ``nproc`` processes."""
    opened = open_study(base, storage, name, log)
    if launcher != "local":  # a submitit job array: Slurm, or submitit's local executor
        from carrot import workers

        folder = DEFAULT_JOURNAL.parent / "slurm" / contract.file_name(opened.name)
        if launcher == "slurm":
            executor = workers.slurm_executor(folder, jobs, **(slurm or {}))
        else:
            import submitit

            executor = submitit.LocalExecutor(folder=str(folder))
            executor.update_parameters(timeout_min=(slurm or {}).get("time_min", 60))
        results = workers.submit_workers(opened, storage, trials, jobs, executor, log)
        stopped = [interrupt.Interrupted(15)] if any(results) else []
    elif jobs > 1 or nproc > 1:
        from carrot.workers import run_workers

        stopped = run_workers(opened, storage, trials, jobs, log, keep_checkpoints=keep_checkpoints, nproc=nproc)
    else:
        stopped = work(opened, trials, log=log, checkpoint_root=checkpoint_root, keep_checkpoints=keep_checkpoints)
    if launcher == "local" and (jobs > 1 or nproc > 1):  # a worker that exited at once (a second signal)
        liveness.reap(opened.study, log)  # left its trial RUNNING: failed, its run closed, queued again
    if launcher == "local":
        close_parent(opened, stopped)
    else:  # every task of the job array has ended; one killed outright keeps a fresh heartbeat for
        opened.parent.finish("KILLED" if stopped else "FINISHED")  # minutes, but does not run any more
    if stopped:
        raise stopped[0]
    return summarize(opened)


def join_study(storage: str | None, name: str, log: Callable[[str], None] = print, trials: int | None = None,
               until: int | None = None, worker: int = 0, overrides: dict[str, Any] | None = None,
               keep_checkpoints: bool = False) -> list[BaseException]:
    """``carrot worker``: join an existing study (from any machine) and run its trials. The
    study's configuration comes from the study itself; ``overrides`` may change only what does
    not define the experiment (device, loader workers, display)."""
    data = stored_config(load_existing_study(storage, name))
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    base = RunConfig.from_dict(data)
    opened = open_study(base, storage, name, log, worker=worker)
    stopped = work(opened, trials, until, log=log, keep_checkpoints=keep_checkpoints)
    close_parent(opened, stopped)
    return stopped


def close_parent(opened: OpenStudy, stopped: list[BaseException]) -> None:
    """The last worker out closes the study's parent run, FINISHED, or KILLED when it was stopped:
    while a trial of another live worker (another ``carrot study`` or ``carrot worker`` on the
    same study) runs, the run stays RUNNING, and that worker closes it when it is done."""
    running = opened.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if not any(liveness.is_dead(trial) is None for trial in running):
        opened.parent.finish("KILLED" if stopped else "FINISHED")


def stored_config(study: optuna.Study) -> dict[str, Any]:
    """The configuration a study was started with (a worker's trials use it)."""
    data = study.user_attrs.get(BASE_CONFIG_ATTR)
    if data is None:
        raise ConfigError(f"study {study.study_name!r} has no stored configuration (it was created by an older "
                          "version, or not by carrot); continue it with `carrot study`")
    return data


def load_existing_study(storage: str | None, name: str) -> optuna.Study:
    """The study ``name`` in ``storage``, which must both exist already (nothing is created)."""
    store = open_storage(storage, create=False)
    try:
        return optuna.load_study(study_name=name, storage=store)
    except KeyError:
        raise ConfigError(f"no study {name!r} in {redact(storage or str(DEFAULT_JOURNAL), storage or '')}; "
                          "start it with `carrot study` first") from None
