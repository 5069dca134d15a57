"""The Optuna study orchestrator: one study per (dataset, backbone, variant).

Trial 0 is the variant's recommended setting; TPE (seeded) proposes the rest; a median
pruner stops weak trials on per-epoch validation accuracy. Every trial is one MLflow run
under one parent run per study. Running the same study again continues it.

Storage: a journal file under ``studies/`` by default (safe for several processes on one
machine, unlike SQLite), or any URL given with ``--storage`` (PostgreSQL for several
machines).
"""
from __future__ import annotations

import copy
import json
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna

from carrot.config import ConfigError, RunConfig
from carrot.progress import Progress
from carrot.space import Distribution, Float, suggest_all
from carrot.tracking import RunLogger, StoreError, check_writable, client, find_runs, flatten, tracking_uri
from carrot.variants import get_variant_class

DEFAULT_STORAGE_DIR = Path("studies")
DEFAULT_JOURNAL = DEFAULT_STORAGE_DIR / "optuna.journal"


def train_space(cfg: RunConfig) -> dict[str, Distribution]:
    """Learning rate (and weight decay, when it is not 0) searched for every variant, so the
    baseline is tuned as fairly as the regularizers; the ranges are centred on the configured
    values, which trial 0 uses."""
    space: dict[str, Distribution] = {"optim.lr": Float(cfg.optim.lr / 10, cfg.optim.lr * 3, log=True)}
    if cfg.optim.weight_decay > 0:
        space["optim.weight_decay"] = Float(cfg.optim.weight_decay / 10, cfg.optim.weight_decay * 3, log=True)
    return space


def study_name(cfg: RunConfig) -> str:
    return f"{cfg.data.dataset_id}-{cfg.model.backbone}-{cfg.variant.name}"


def fixed_config(cfg: RunConfig) -> dict[str, Any]:
    """The part of the configuration a study does not search: it must not change when a study
    is continued, or trials trained under different budgets would be compared."""
    data = cfg.to_dict()
    for key in ("seed", "device", "show_progress", "experiment"):
        data.pop(key)
    data["data"].pop("workers")
    data["optim"].pop("lr")
    data["optim"].pop("weight_decay")
    data["variant"].pop("hparams")
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def open_storage(url: str | None):
    """A journal file (default, or a path), or an RDB URL such as postgresql://..."""
    if url is None or "://" not in url:
        path = Path(url) if url else DEFAULT_JOURNAL
        check_writable(path.parent if str(path.parent) else Path("."), "Optuna study storage")
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(str(path)))
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:
        raise StoreError(f"cannot open Optuna storage {url!r}: {exc}") from None


def search_space(cfg: RunConfig) -> dict[str, Distribution]:
    """Everything a study of ``cfg.variant`` searches, minus what the user pinned with
    ``--set variant.hparams.<name>=...``."""
    space = {**train_space(cfg), **get_variant_class(cfg.variant.name).full_search_space()}
    return {k: v for k, v in space.items() if k not in cfg.variant.hparams}


def recommended_params(cfg: RunConfig) -> dict[str, Any]:
    """Trial 0: the design note's setting and the configured optimiser values."""
    rec = get_variant_class(cfg.variant.name).recommended()
    rec.update(cfg.variant.hparams)
    values = {"optim.lr": cfg.optim.lr, "optim.weight_decay": cfg.optim.weight_decay, **rec}
    space = search_space(cfg)
    outside = sorted(k for k in space if k in values and not space[k].contains(values[k]))
    if outside:
        raise ConfigError(f"the recommended setting of {cfg.variant.name!r} lies outside its search space "
                          f"for {outside}")
    return {k: values[k] for k in space if k in values}


def trial_config(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    cfg = copy.deepcopy(base)
    hparams = dict(cfg.variant.hparams)
    for key, value in params.items():
        if key == "optim.lr":
            cfg.optim.lr = float(value)
        elif key == "optim.weight_decay":
            cfg.optim.weight_decay = float(value)
        else:
            hparams[key] = value
    cfg.variant.hparams = hparams
    return cfg


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


def _parent_run(cfg: RunConfig, name: str) -> RunLogger:
    mlf = client()
    found = find_runs(mlf, cfg.experiment,
                      f"tags.`carrot.study` = '{name}' and tags.`carrot.role` = 'study'",
                      order_by=["attributes.start_time ASC"])
    if found:
        logger = RunLogger(mlf, found[0].info.run_id)
        mlf.update_run(found[0].info.run_id, status="RUNNING")
        return logger
    from carrot.train import run_tags

    tags = run_tags(cfg, cfg.seed, name, None)
    tags.update({"carrot.role": "study", "carrot.trial": ""})
    return RunLogger.start(cfg.experiment, f"study {name}", tags)


def run_study(base: RunConfig, trials: int, storage: str | None = None,
              log: Callable[[str], None] = print) -> StudySummary:
    """Add ``trials`` trials to the study of ``base``'s dataset, backbone and variant."""
    from carrot.train import TrialPruned, run

    name = study_name(base)
    store = open_storage(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The sampler's seed moves with the study's length so a continued study does not
    # replay the random start-up draws of the first session.
    existing = 0
    try:
        existing = len(optuna.load_study(study_name=name, storage=store).trials)
    except KeyError:
        pass
    study = optuna.create_study(
        study_name=name, storage=store, direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=base.seed + existing, n_startup_trials=4),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1),  # never before 4 full trials
    )
    fixed = fixed_config(base)
    stored = study.user_attrs.get("fixed_config")
    if stored is not None and stored != fixed:
        before, now = flatten("", stored), flatten("", fixed)
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise ConfigError(f"study {name!r} was created with a different configuration ({', '.join(changed)} "
                          "differ); continue it with the same settings, or start a new study in another storage "
                          "(--storage / STORAGE=)")
    if stored is None:
        study.set_user_attr("fixed_config", fixed)
        for key, value in {"dataset": base.data.dataset_id, "backbone": base.model.backbone,
                           "variant": base.variant.name, "split": base.split}.items():
            study.set_user_attr(key, value)
    recommended = recommended_params(base)
    live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING,
            optuna.trial.TrialState.WAITING)
    if not any(t.state in live and t.params == recommended for t in study.trials):
        study.enqueue_trial(recommended)  # trial 0, or again if it failed or was interrupted

    parent = _parent_run(base, name)
    parent.set_tags({"carrot.study_storage": storage or str(DEFAULT_JOURNAL)})
    space = search_space(base)
    bar = Progress(total=trials, desc=f"study {name}", enabled=base.show_progress, log=log, unit="trial")
    done = 0

    def objective(trial: optuna.Trial) -> float:
        params = suggest_all(trial, space)
        cfg = trial_config(base, params)
        try:
            result = run(cfg, trial, study=name, parent_run_id=parent.run_id, log=log)
        except TrialPruned as exc:
            raise optuna.TrialPruned(str(exc)) from None
        trial.set_user_attr("mlflow_run_id", result.run_id)
        return result.objective

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal done
        done += 1
        value = "-" if trial.value is None else f"{trial.value:.4f}"
        best = study.best_value if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) else None
        bar.update(done, trial=trial.number, value=float("nan") if trial.value is None else trial.value,
                   best=float("nan") if best is None else best)
        if trial.state == optuna.trial.TrialState.FAIL:
            log(f"trial {trial.number} failed: {trial.user_attrs.get('error', 'see the log above')}")
        elif trial.state == optuna.trial.TrialState.PRUNED:
            log(f"trial {trial.number} pruned")
        else:
            log(f"trial {trial.number} finished: {base.split}/acc={value}")

    def guarded(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # one failing trial never takes the study down
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            logging.getLogger("carrot").debug(traceback.format_exc())
            raise

    try:
        study.optimize(guarded, n_trials=trials, catch=(Exception,), callbacks=[after_trial],
                       gc_after_trial=True)
    finally:
        bar.close()
        parent.finish("FINISHED")

    states = [t.state for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    summary = StudySummary(
        name=name, storage=storage or str(DEFAULT_JOURNAL), tracking_uri=tracking_uri(),
        parent_run_id=parent.run_id, n_trials=len(states),
        n_complete=len(complete), n_pruned=states.count(optuna.trial.TrialState.PRUNED),
        n_failed=states.count(optuna.trial.TrialState.FAIL),
        best_number=best.number if best else None, best_value=best.value if best else None,
        best_params=dict(best.params) if best else {},
        best_run_id=best.user_attrs.get("mlflow_run_id") if best else None,
    )
    if best is not None:
        parent.log_metrics({"study/best_value": best.value, "study/n_trials": len(states)}, step=len(states))
        parent.set_tags({"carrot.best_trial": best.number, "carrot.best_run_id": summary.best_run_id or ""})
    return summary

