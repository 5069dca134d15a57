"""Loading finished runs from MLflow into pandas: the one way ``analysis`` reads the store.

Only MLflow (and, in :mod:`analysis.tables`, Optuna) is read. Names of tags, metrics and
artifacts come from :mod:`carrot.contract`, the one module of ``carrot`` that ``analysis``
imports (it needs nothing but NumPy); the training code is never imported.

>>> client = connect()                                   # doctest: +SKIP
>>> runs = load_runs(client, "carrot")                   # one row per run
>>> final = final_runs(runs)                             # split=test, finished, one per seed
>>> final[["variant", "seed", "metrics.test/acc"]]       # last-epoch values
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from carrot import contract

# Control rows first in every table and legend, then the rest alphabetically.
LEADING_VARIANTS = ("baseline", "pairwise_confusion")

# Convenience columns taken from the run tags (column -> tag key).
TAG_COLUMNS = {
    "variant": contract.TAG_VARIANT,
    "study": contract.TAG_STUDY,
    "dataset": contract.TAG_DATASET,
    "backbone": contract.TAG_BACKBONE,
    "split": contract.TAG_SPLIT,
    "role": contract.TAG_ROLE,
}
BASE_COLUMNS = ["run_id", "run_name", "status", "start_time", "end_time", "parent_run_id", "variant", "study",
                "trial", "dataset", "backbone", "seed", "split", "role"]


class StoreMissing(RuntimeError):
    """The tracking store named by the URI does not exist (nothing to analyse)."""


# ----------------------------------------------------------------------------- ordering
def variant_sort_key(name: str) -> tuple[int, str]:
    """baseline, then pairwise_confusion, then every other variant alphabetically."""
    if name in LEADING_VARIANTS:
        return (LEADING_VARIANTS.index(name), "")
    return (len(LEADING_VARIANTS), name)


def order_variants(names: Iterable[str]) -> list[str]:
    return sorted({n for n in names if isinstance(n, str) and n}, key=variant_sort_key)


def natural_key(text: str) -> list:
    """'layer10' after 'layer2'; 'stages.3' after 'stages.1'."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def layer_sort_key(layer: str) -> tuple:
    """Probed layers in network order; the final embedding last."""
    return (1 if layer == "embedding" else 0, natural_key(layer))


# ----------------------------------------------------------------------------- store
def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or contract.DEFAULT_TRACKING_URI


def connect(uri: str | None = None):
    """An ``MlflowClient`` on an existing store; never creates an empty one."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.is_file():
            raise StoreMissing(f"no MLflow store at {db} (tracking URI {uri}); set MLFLOW_TRACKING_URI "
                               "or run from the folder that holds mlruns/")
    return MlflowClient(tracking_uri=uri)


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags :mod:`analysis.tables` and :mod:`analysis.plots` share."""
    parser.add_argument("--experiment", default=contract.DEFAULT_EXPERIMENT,
                        help="MLflow experiment name (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(contract.DEFAULT_OUT),
                        help="output folder (default %(default)s)")
    parser.add_argument("--dataset", action="append", default=None,
                        help=f"only this dataset ({contract.TAG_DATASET} tag); repeat for several")
    parser.add_argument("--backbone", action="append", default=None,
                        help=f"only this backbone ({contract.TAG_BACKBONE} tag); repeat for several")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                             f"{contract.DEFAULT_TRACKING_URI})")


# ----------------------------------------------------------------------------- runs
def _int_or_none(text: Any) -> int | None:
    try:
        return int(str(text))
    except (TypeError, ValueError):
        return None


def empty_runs() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in BASE_COLUMNS})


def load_runs(client, experiment: str = contract.DEFAULT_EXPERIMENT, *, dataset: Iterable[str] | None = None,
              backbone: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per run (deleted runs excluded), in a fixed order.

    Columns: ``run_id, run_name, status, start_time, end_time, parent_run_id``, the
    convenience columns ``variant, study, trial, dataset, backbone, seed, split, role``
    (``seed`` and ``trial`` as integers or None), then ``tags.<key>``, ``params.<key>``
    (strings, as logged) and ``metrics.<key>`` (the last logged step: the last epoch).
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return empty_runs()
    rows = []
    for r in contract.search_runs(client, experiment):
        tags = r.data.tags
        row: dict[str, Any] = {
            "run_id": r.info.run_id,
            "run_name": tags.get(contract.MLFLOW_RUN_NAME, ""),
            "status": r.info.status,
            "start_time": r.info.start_time or 0,
            "end_time": r.info.end_time or 0,
            "parent_run_id": tags.get(contract.MLFLOW_PARENT_RUN_ID, ""),
            "seed": _int_or_none(tags.get(contract.TAG_SEED)),
            "trial": _int_or_none(tags.get(contract.TAG_TRIAL)),
        }
        for column, key in TAG_COLUMNS.items():
            row[column] = tags.get(key, "")
        row.update({f"tags.{k}": v for k, v in tags.items()})
        row.update({f"params.{k}": v for k, v in r.data.params.items()})
        row.update({f"metrics.{k}": float(v) for k, v in r.data.metrics.items()})
        rows.append(row)
    if not rows:
        return empty_runs()
    if dataset:
        rows = [r for r in rows if r["dataset"] in set(dataset)]
    if backbone:
        rows = [r for r in rows if r["backbone"] in set(backbone)]
    rows.sort(key=lambda r: (r["dataset"], r["backbone"], variant_sort_key(r["variant"]), r["split"],
                             -1 if r["seed"] is None else r["seed"], -1 if r["trial"] is None else r["trial"],
                             r["start_time"], r["run_id"]))
    extra = sorted({k for r in rows for k in r} - set(BASE_COLUMNS),
                   key=lambda k: ({"tags": 0, "params": 1, "metrics": 2}[k.split(".", 1)[0]], k))
    frame = pd.DataFrame(rows, columns=BASE_COLUMNS + extra)
    for column in ("seed", "trial"):  # int or None (pandas would turn a gap into a float NaN)
        frame[column] = pd.Series([r[column] for r in rows], dtype=object)
    return frame


def known_variants(runs: pd.DataFrame) -> list[str]:
    """Every variant named by any run's tag, in table order."""
    return order_variants(runs["variant"]) if len(runs) else []


def dataset_groups(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(dataset, backbone) pairs seen in any run, sorted."""
    if not len(runs):
        return []
    pairs = {(d, b) for d, b in zip(runs["dataset"], runs["backbone"]) if d or b}
    return sorted(pairs)


def finished(runs: pd.DataFrame, split: str) -> pd.DataFrame:
    """Training runs (not a study's parent run) of ``split`` whose MLflow status is FINISHED."""
    if not len(runs):
        return runs
    keep = (runs["status"] == "FINISHED") & (runs["split"] == split) & (runs["role"] != contract.ROLE_STUDY)
    return runs[keep].reset_index(drop=True)


def final_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Finished test-split runs, one per (dataset, backbone, variant, seed): the newest.

    Returns the kept runs and the older duplicates that were dropped (a re-run of a seed),
    so a table can say so.
    """
    test = finished(runs, contract.SPLIT_TEST)
    test = test[test["role"] == contract.ROLE_FINAL]  # not ad-hoc `carrot train --set split=test` runs
    if not len(test):
        return test, test
    test = test.assign(_seed=test["seed"].map(lambda s: -1 if s is None else s))
    test = test.sort_values(["dataset", "backbone", "variant", "_seed", "end_time", "run_id"], kind="mergesort")
    newest = ~test.duplicated(["dataset", "backbone", "variant", "_seed"], keep="last")
    return _table_order(test[newest].drop(columns="_seed")), _table_order(test[~newest].drop(columns="_seed"))


def study_trials(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished validation-split runs of studies: tagged as trials (or, in stores written before
    that tag, child runs of a study); never ``carrot train`` runs nor the studies' parent runs."""
    val = finished(runs, contract.SPLIT_VAL)
    legacy = (val["role"].fillna("") == "") & (val["parent_run_id"].fillna("") != "")
    return val[(val["role"] == contract.ROLE_TRIAL) | legacy]


def _table_order(runs: pd.DataFrame) -> pd.DataFrame:
    """Dataset, backbone, variant (baseline first), seed."""
    def key(series: pd.Series) -> pd.Series:
        if series.name == "variant":
            return series.map(lambda v: "%d %s" % variant_sort_key(v))
        if series.name == "seed":
            return series.map(lambda s: -1 if s is None else s)
        return series

    return runs.sort_values(by=["dataset", "backbone", "variant", "seed"], key=key,
                            kind="mergesort").reset_index(drop=True)


def plot_source(runs: pd.DataFrame, dataset: str, backbone: str) -> tuple[pd.DataFrame, str, str]:
    """The runs a plot of one (dataset, backbone) draws: the final runs when any exist,
    else the finished study trials. Returns (runs, split, words for a title)."""
    group = runs[(runs["dataset"] == dataset) & (runs["backbone"] == backbone)] if len(runs) else runs
    final, _ = final_runs(group)
    if len(final):
        return final, contract.SPLIT_TEST, "final runs, test split"
    return study_trials(group), contract.SPLIT_VAL, "study trials, val split"


def metric_keys(runs: pd.DataFrame, pattern: str) -> list[str]:
    """Metric names (without the ``metrics.`` prefix) matching a regular expression, sorted."""
    rx = re.compile(pattern)
    keys = [c[len("metrics."):] for c in runs.columns if c.startswith("metrics.")]
    return sorted(k for k in keys if rx.fullmatch(k))


def metric_values(runs: pd.DataFrame, key: str) -> np.ndarray:
    """Last-epoch values of one metric, NaN where a run lacks it."""
    column = f"metrics.{key}"
    if column not in runs.columns:
        return np.full(len(runs), np.nan)
    return pd.to_numeric(runs[column], errors="coerce").to_numpy(dtype=float)


# ----------------------------------------------------------------------------- histories
def metric_history(client, run_id: str, key: str) -> pd.Series:
    """One metric of one run by step (epoch); the last value logged at a step wins."""
    history = client.get_metric_history(run_id, key)
    if not history:
        return pd.Series(dtype=float, name=key)
    ordered = sorted(history, key=lambda m: (m.step, m.timestamp))
    values: dict[int, float] = {}
    for m in ordered:
        values[int(m.step)] = float(m.value)
    series = pd.Series(values, name=key, dtype=float)
    series.index.name = "step"
    return series.sort_index()


def mean_history(client, run_ids: Iterable[str], key: str) -> pd.DataFrame:
    """Mean, std and count over runs of one metric at each step (NaN-aware).

    Columns ``step, mean, std, n``; empty when no run logged the metric.
    """
    series = [metric_history(client, rid, key) for rid in run_ids]
    series = [s for s in series if len(s)]
    if not series:
        return pd.DataFrame(columns=["step", "mean", "std", "n"])
    table = pd.concat(series, axis=1)
    values = table.to_numpy(dtype=float)  # (steps, runs)
    n = np.isfinite(values).sum(axis=1)
    with warnings.catch_warnings():  # all-NaN steps give NaN, not a warning
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = np.nanmean(values, axis=1)
        std = np.nanstd(values, axis=1, ddof=1)
    std = np.where(n > 1, std, np.nan)
    return pd.DataFrame({"step": table.index.to_numpy(dtype=int), "mean": mean, "std": std, "n": n})


# ----------------------------------------------------------------------------- artifacts
def download_artifact(client, run_id: str, path: str, dst: str | Path) -> Path | None:
    """Copy one artifact of a run into ``dst``; None when the run has no such artifact."""
    try:
        return Path(client.download_artifacts(run_id, path, dst_path=str(dst)))
    except Exception:  # missing artifact, or an artifact store that is not reachable here
        return None


def read_artifact(client, run_id: str, path: str, read: Callable[[Path], Any]) -> Any | None:
    """``read(local file)`` on a temporary copy of one artifact; None when the run has none."""
    with tempfile.TemporaryDirectory(prefix="carrot-analysis-") as tmp:
        local = download_artifact(client, run_id, path, tmp)
        if local is None or not local.is_file():
            return None
        return read(local)


def read_json_artifact(client, run_id: str, path: str) -> Any | None:
    return read_artifact(client, run_id, path, lambda local: json.loads(local.read_text()))


def _read_npz(local: Path) -> dict[str, np.ndarray]:
    with np.load(local, allow_pickle=False) as data:
        return {k: np.array(data[k]) for k in data.files}


def read_confusion(client, run_id: str) -> dict[str, np.ndarray] | None:
    """``confusion`` (E, K, K) counts, ``epochs`` (E,), ``class_names`` (K,) of one run."""
    return read_artifact(client, run_id, contract.CONFUSION_ARTIFACT, _read_npz)


def reference_pairs(client, run_id: str) -> tuple[tuple[int, int], ...]:
    """The reference pairs a run was scored on (its pairs artifact); empty when it has none."""
    pairs = read_json_artifact(client, run_id, contract.PAIRS_ARTIFACT) or {}
    return tuple(tuple(int(i) for i in p) for p in pairs.get(contract.PAIRS_REFERENCE_KEY) or [])


# ----------------------------------------------------------------------------- confusion maths
def confusion_concentration(confusion: np.ndarray, ks: Iterable[int] = (1, 3, 5)) -> dict[int, float]:
    """For each k: the mean over rows (true classes with any error) of the share of the row's
    off-diagonal mass that sits in its k largest off-diagonal cells. NaN when no row has an
    error (a perfect classifier)."""
    cm = np.asarray(confusion, dtype=float).copy()
    np.fill_diagonal(cm, 0.0)
    off = np.sort(cm, axis=1)[:, ::-1]  # (K, K) each row descending
    total = off.sum(axis=1)
    rows = total > 0
    result = {}
    for k in ks:
        if not rows.any():
            result[int(k)] = math.nan
            continue
        top = off[rows, :k].sum(axis=1)
        result[int(k)] = float(np.mean(top / total[rows]))
    return result


def open_store(args, prog: str):
    """(client, runs) for a command's ``--tracking-uri/--experiment/--dataset/--backbone``,
    or (None, None) after printing why the store cannot be read."""
    import logging
    import sys

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        client = connect(args.tracking_uri)
    except StoreMissing as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None, None
    return client, load_runs(client, args.experiment, dataset=args.dataset, backbone=args.backbone)


def rho_ref(layer: str) -> str:
    """The metric key of one layer's rho on the reference pairs."""
    return contract.rho_metric(layer, "ref")


def metric_layers(runs: pd.DataFrame, key_of: Callable[[str], str]) -> list[str]:
    """The layers ``L`` for which the runs logged the metric ``key_of(L)``, in network order.

    ``key_of`` is a per-layer key of :mod:`carrot.contract`, e.g. ``contract.probe_metric``, so
    the key format is written in one place."""
    prefix, suffix = key_of("\0").split("\0")
    keys = metric_keys(runs, re.escape(prefix) + ".+" + re.escape(suffix))
    return sorted({k[len(prefix):len(k) - len(suffix)] for k in keys}, key=layer_sort_key)
