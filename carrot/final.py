"""``carrot final``: the best configuration of each studied variant, several seeds, test split.

For every variant whose study on the chosen dataset and backbone has a complete trial, the
best trial's resolved configuration (its run's ``config.json``) is re-trained on train+val
with seeds 0..S-1 and evaluated on the test split. A seed whose final run already finished
is not run again, so an interrupted ``make final`` resumes where it stopped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import optuna

from carrot import contract, interrupt, liveness
from carrot.config import ConfigError, RunConfig, set_dotted
from carrot.data import DatasetError
from carrot.model import ModelError
from carrot.study import open_storage, study_name
from carrot.tracking import StoreError, client, find_runs
from carrot.variants import list_variants


@dataclass
class FinalPlan:
    variant: str
    study: str
    trial: int
    config: RunConfig
    seeds_done: list[int]
    seeds_todo: list[int]


def best_trial_config(study: optuna.Study) -> tuple[int, dict[str, Any]] | None:
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return None
    best = max(complete, key=lambda t: (t.value, -t.number))
    run_id = best.user_attrs.get(contract.TRIAL_RUN_ID_ATTR)
    if not run_id:
        return None
    mlf = client()
    path = mlf.download_artifacts(run_id, contract.CONFIG_ARTIFACT)
    with open(path) as fh:
        return best.number, json.load(fh)


def plan_final(base: RunConfig, seeds: int, variants: list[str] | None, storage: str | None,
               overrides: dict[str, Any] | None = None) -> tuple[list[FinalPlan], list[str]]:
    """What to run, and a note for every variant that has no usable study."""
    store = open_storage(storage, create=False)  # final runs need the studies: no new, empty storage
    names = variants or list_variants()
    plans, notes = [], []
    mlf = client()
    for variant in names:
        probe = RunConfig.from_dict({**_section_dict(base), "variant": {"name": variant}})
        name = study_name(probe)
        try:
            study = optuna.load_study(study_name=name, storage=store)
        except KeyError:
            notes.append(f"{variant}: no study {name!r} (run `make study VARIANT={variant}` first)")
            continue
        found = best_trial_config(study)
        if found is None:
            notes.append(f"{variant}: study {name!r} has no complete trial")
            continue
        trial, data = found
        data["split"] = "test"
        for key, value in (overrides or {}).items():
            set_dotted(data, key, value)
        data.get("data", {}).pop("effective_batch_size", None)
        cfg = RunConfig.from_dict(data)
        # a seed counts as done only for this exact configuration (a smoke run with fewer
        # epochs does not stand in for the real one)
        done_runs = find_runs(mlf, base.experiment,
                              f"tags.`{contract.TAG_ROLE}` = '{contract.ROLE_FINAL}' and "
                              f"tags.`{contract.TAG_STUDY}` = '{name}' and "
                              f"tags.`{contract.TAG_CONFIG_HASH}` = '{cfg.identity_hash()}' and "
                              "attributes.status = 'FINISHED'")
        done = sorted({int(r.data.tags[contract.TAG_SEED]) for r in done_runs})
        plans.append(FinalPlan(variant, name, trial, cfg, done, [s for s in range(seeds) if s not in done]))
    return plans, notes


def _section_dict(cfg: RunConfig) -> dict[str, Any]:
    data = cfg.to_dict()
    data.pop("variant")
    return data


def run_final(base: RunConfig, seeds: int = 5, variants: list[str] | None = None, storage: str | None = None,
              overrides: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> list[FinalPlan]:
    from carrot.reference import count_classes, resolve
    from carrot.train import run

    if seeds < 1:
        raise ConfigError(f"invalid seeds={seeds}: expected a positive integer")
    plans, notes = plan_final(base, seeds, variants, storage, overrides)
    for note in notes:
        log(f"final: skipping {note}")
    if not plans:
        raise ConfigError("no variant has a finished study on "
                          f"{base.data.name}/{base.model.backbone}; run `make study VARIANT=...` first")
    liveness.close_dead_runs(base.experiment, contract.ROLE_FINAL, log)  # a seed whose command was killed
    reference = resolve(base, open_storage(storage, create=False), count_classes(base), log)
    failed = []
    for plan in plans:
        log(f"final {plan.variant}: best trial {plan.trial} of {plan.study}; seeds done {plan.seeds_done}, "
            f"to run {plan.seeds_todo}")
        for seed in plan.seeds_todo:
            cfg = RunConfig.from_dict({**plan.config.to_dict(), "seed": seed,
                                       "show_progress": base.show_progress})
            try:
                result = run(cfg, study=plan.study, run_name=f"final-{plan.variant}-s{seed}", log=log,
                             reference=reference, save_weights=True,
                             extra_tags={contract.TAG_ROLE: contract.ROLE_FINAL, contract.TAG_TRIAL: str(plan.trial)})
                log(f"final {plan.variant} seed {seed}: test/acc={result.objective:.4f}")
            except (ConfigError, DatasetError, ModelError, StoreError, interrupt.Interrupted):
                raise  # the same for every seed (or a stop was asked for): stop with one clear line
            except Exception as exc:  # one failing seed does not stop the others
                failed.append(f"{plan.variant} seed {seed}")
                log(f"final {plan.variant} seed {seed} failed: {type(exc).__name__}: {exc}")
    if failed:
        raise FinalRunsFailed(f"{len(failed)} final run(s) failed: {', '.join(failed)}")
    return plans


class FinalRunsFailed(RuntimeError):
    """Some seeds failed (the others finished); ``make final`` exits non-zero."""


def summary_lines(plans: list[FinalPlan], experiment: str) -> list[str]:
    """One line per variant: its finished final runs of this configuration and their test
    accuracy (mean and sample standard deviation over seeds)."""
    import statistics

    mlf = client()
    lines = []
    for plan in plans:
        runs = find_runs(mlf, experiment,
                         f"tags.`{contract.TAG_ROLE}` = '{contract.ROLE_FINAL}' and "
                         f"tags.`{contract.TAG_STUDY}` = '{plan.study}' and "
                         f"tags.`{contract.TAG_CONFIG_HASH}` = '{plan.config.identity_hash()}' and "
                         "attributes.status = 'FINISHED'")
        accs = [100 * r.data.metrics[contract.split_metric("test", "acc")] for r in runs
                if contract.split_metric("test", "acc") in r.data.metrics]
        if not accs:
            lines.append(f"  {plan.variant:<20} no finished final run")
            continue
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else " (one seed: no spread)"
        lines.append(f"  {plan.variant:<20} test/acc {statistics.mean(accs):.2f}%{spread} over {len(accs)} seed(s)")
    return lines
