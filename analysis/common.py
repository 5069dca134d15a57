"""Loading finished runs from MLflow into pandas: the one way ``analysis`` reads the store.

Only MLflow (and, in :mod:`analysis.tables`, Optuna) is read. Names of tags, metrics and
artifacts come from :mod:`carrot.contract`, the one module of ``carrot`` that ``analysis``
imports (it needs nothing but NumPy); the training code is never imported.

>>> client = connect()                                   # doctest: +SKIP
>>> runs = load_runs(client, "carrot")                   # one row per run
>>> final = final_runs(runs).kept                        # split=test, finished, one per seed
>>> final[["variant", "seed", "metrics.test/acc"]]       # last-epoch values

A store is portable as a whole folder: a run's artifacts are read from the folder its artifact
URI names or, when that path no longer exists, from the same relative place under the folder of
the SQLite database (:func:`artifact_folder`), so a copied or moved ``mlruns/`` (``mlflow.db``
with ``artifacts/`` beside it) builds the same tables and plots. An artifact found nowhere is
reported with the run, the artifact and every folder looked in.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

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
    """The tracking store named by the URI does not exist or cannot be read (nothing to analyse)."""


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
    db_file = contract.sqlite_file(uri)
    if db_file is not None:  # an in-memory database holds no runs either
        db = Path(db_file or ":memory:")
        if not db.is_file():
            raise StoreMissing(f"no MLflow store at {db} (tracking URI {uri}); set MLFLOW_TRACKING_URI "
                               "or run from the folder that holds mlruns/")
    else:
        problem = contract.tracking_store_problem(uri)
        if problem:
            raise StoreMissing(problem)
    if db_file is None:
        return MlflowClient(tracking_uri=uri)
    try:  # a damaged file ("database disk image is malformed") fails here, on the first query
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as exc:
        raise StoreMissing(f"the MLflow store {db_file} cannot be read: {contract.first_line(exc)}; expected the SQLite database of "
                           "an MLflow store") from None
    return client


def _folder_argument(text: str) -> Path:
    """An output folder: an empty --out would write the results into the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder for the results, got an empty path")
    return Path(text)


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags :mod:`analysis.tables` and :mod:`analysis.plots` share."""
    parser.add_argument("--experiment", default=contract.DEFAULT_EXPERIMENT,
                        help="MLflow experiment name (default %(default)s)")
    parser.add_argument("--out", type=_folder_argument, default=Path(contract.DEFAULT_OUT),
                        help="output folder (default %(default)s)")
    parser.add_argument("--dataset", action="append", default=None,
                        help=f"only this dataset ({contract.TAG_DATASET} tag); repeat for several (default: all)")
    parser.add_argument("--backbone", action="append", default=None,
                        help=f"only this backbone ({contract.TAG_BACKBONE} tag); repeat for several (default: all)")
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


def tag_values(runs: pd.DataFrame, key: str) -> pd.Series:
    """One tag of every run as text; "" where a run lacks it."""
    column = f"tags.{key}"
    if column not in runs.columns:
        return pd.Series([""] * len(runs), index=runs.index, dtype=object)
    return runs[column].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))


class FinalRuns(NamedTuple):
    """The final runs a table uses, and what was left out and why."""

    kept: pd.DataFrame  # one run per (dataset, backbone, variant, seed), all of one configuration
    duplicates: pd.DataFrame  # older runs of a kept seed under the same configuration (a re-run)
    other_configs: pd.DataFrame  # runs of another configuration (carrot.config_hash) than the newest


def final_runs(runs: pd.DataFrame) -> FinalRuns:
    """Finished test-split final runs: per (dataset, backbone, variant), the runs of the newest
    configuration (the ``carrot.config_hash`` of the run that finished last), one per seed: the
    newest.

    Seeds trained under different fixed settings (epochs, image size, any hyperparameter) are
    never averaged together; the runs of other configurations come back separately, so a table
    can say how many were left out.
    """
    test = finished(runs, contract.SPLIT_TEST)
    test = test[test["role"] == contract.ROLE_FINAL]  # not ad-hoc `carrot train --set split=test` runs
    if not len(test):
        return FinalRuns(test, test, test)
    slot = ["dataset", "backbone", "variant"]
    test = test.assign(_seed=test["seed"].map(lambda s: -1 if s is None else s),
                       _config=tag_values(test, contract.TAG_CONFIG_HASH))
    newest_config: dict[tuple, str] = {}  # slot -> configuration of the run that finished last
    for *key, config in test.sort_values(["end_time", "run_id"], ascending=False, kind="mergesort")[
            slot + ["_config"]].itertuples(index=False):
        newest_config.setdefault(tuple(key), config)
    same = np.array([newest_config[tuple(key)] == config
                     for *key, config in test[slot + ["_config"]].itertuples(index=False)], dtype=bool)
    other, test = test[~same], test[same]
    test = test.sort_values(slot + ["_seed", "end_time", "run_id"], kind="mergesort")
    newest = ~test.duplicated(slot + ["_seed"], keep="last")
    helpers = ["_seed", "_config"]
    return FinalRuns(_table_order(test[newest].drop(columns=helpers)),
                     _table_order(test[~newest].drop(columns=helpers)),
                     _table_order(other.drop(columns=helpers)))


def study_trials(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished validation-split runs of studies: tagged as trials (or, in stores written before
    that tag, child runs of a study); never ``carrot train`` runs nor the studies' parent runs."""
    val = finished(runs, contract.SPLIT_VAL)
    legacy = (val["role"].fillna("") == "") & (val["parent_run_id"].fillna("") != "")
    return val[(val["role"] == contract.ROLE_TRIAL) | legacy]


SHORT_ID = 8  # characters of a study id shown in tables


class Study(NamedTuple):
    """The trials of one study: a study is its storage and its name, told apart by its id."""

    study_id: str  # "" for trials logged before studies had ids
    name: str
    trials: pd.DataFrame

    @property
    def label(self) -> str:
        """``<name> (<first 8 characters of the id>)``."""
        return f"{self.name} ({self.study_id[:SHORT_ID] if self.study_id else 'no id'})"


def studies(trials: pd.DataFrame) -> list[Study]:
    """The trials grouped by study (``carrot.study_id``; trials without one by study name),
    oldest study first (by its first trial's start, then id)."""
    if not len(trials):
        return []
    ids = tag_values(trials, contract.TAG_STUDY_ID)
    names = trials["study"].fillna("").astype(str)
    keys = pd.Series([sid or f"name:{name}" for sid, name in zip(ids, names)], index=trials.index)
    found = []
    for key in sorted(set(keys)):
        part = trials[keys == key]
        sid = "" if key.startswith("name:") else key
        name = sorted(set(names[keys == key]))[0]
        found.append((int(part["start_time"].min()), sid, name, part))
    found.sort(key=lambda f: (f[0], f[1], f[2]))
    return [Study(sid, name, part) for _, sid, name, part in found]


# Settings that differ between runs of one experiment without making it another experiment, or
# that each variant sets for itself; never reported as a difference of fixed settings.
NOT_SETTINGS = frozenset({"seed", "device", "data.workers", "show_progress", "experiment", "data.root",
                          "data.cache", "split"})


def fixed_differences(groups: Iterable[pd.DataFrame], ignore_prefixes: tuple[str, ...] = ()) -> list[str]:
    """The parameters (``params.<key>`` without the prefix) that hold one value within each
    group and differ between groups: the fixed settings that set the groups apart, sorted."""
    groups = [g for g in groups if len(g)]
    if len(groups) < 2:
        return []
    columns = sorted(set.intersection(*(set(c for c in g.columns if c.startswith("params.")) for g in groups)))
    out = []
    for column in columns:
        key = column[len("params."):]
        if key in NOT_SETTINGS or key.startswith(ignore_prefixes):
            continue
        values = [set(g[column].dropna().astype(str)) for g in groups]
        if all(len(v) == 1 for v in values) and len(set.union(*values)) > 1:
            out.append(key)
    return out


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
    final = final_runs(group).kept
    if len(final):
        return final, contract.SPLIT_TEST, "final runs, test split"
    trials = study_trials(group)
    if not len(trials):
        return trials, contract.SPLIT_VAL, "study trials, val split"
    # one study per variant (the newest), so trials of differently set-up studies are not averaged
    newest = [studies(trials[trials["variant"] == v])[-1].trials for v in order_variants(trials["variant"])]
    return _table_order(pd.concat(newest)), contract.SPLIT_VAL, "study trials of each variant's newest study, val split"


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


def first_history(client, run_id: str, keys: str | Sequence[str]) -> pd.Series:
    """The history of the first of ``keys`` the run logged (a quantity whose key was renamed:
    the current key first, then the older ones)."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    for key in keys:
        series = metric_history(client, run_id, key)
        if len(series):
            return series
    return pd.Series(dtype=float, name=keys[0])


def mean_history(client, run_ids: Iterable[str], keys: str | Sequence[str]) -> pd.DataFrame:
    """Mean, std and count over runs of one metric at each step (NaN-aware); each run's values
    come from the first of ``keys`` it logged.

    Columns ``step, mean, std, n``; empty when no run logged the metric.
    """
    series = [first_history(client, rid, keys) for rid in run_ids]
    series = [s.rename(i) for i, s in enumerate(series) if len(s)]
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
def store_folder(client) -> Path | None:
    """The folder of a SQLite store's database file (``mlruns/``, which holds ``artifacts/``);
    None for a store of another kind."""
    uri = str(getattr(client, "tracking_uri", "") or "")
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).absolute().parent


def local_path(uri: str) -> Path | None:
    """The local path of a ``file:`` URI or a plain path; None for a remote artifact store
    (``s3://``, ``mlflow-artifacts:``, ``http://``...)."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    parsed = urlparse(uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" or re.fullmatch(r"[A-Za-z]", parsed.scheme):  # a path (or a Windows drive)
        return Path(uri)
    return None


@dataclass(frozen=True)
class ArtifactFolder:
    """Where one run's artifacts are: the folder its artifact URI names when it exists, else the
    same relative location under the store's folder (a store copied or moved as a whole)."""

    run_id: str
    uri: str  # the run's artifact URI, as logged
    path: Path | None  # the local folder of the run's artifacts; None when remote or not found
    looked: tuple[str, ...]  # the local folders tried, in order
    remote: bool = False  # an artifact store that MLflow downloads from (path is None)
    error: str = ""  # why the run could not be read

    def missing(self, artifact: str) -> str:
        """One line: which run, which artifact, where it was looked for."""
        if self.error:
            return f"run {self.run_id}: artifact {artifact} not read: {self.error}"
        text = f"run {self.run_id}: artifact {artifact} not found: looked in {self.looked[0]} (the run's artifact folder)"
        if len(self.looked) > 1:
            text += f" and, under the store's folder, {self.looked[1]}"
        if len(self.looked) > 2:
            tail = Path(self.looked[-1]).relative_to(Path(self.looked[-1]).parent.parent)
            text += f" and {len(self.looked) - 2} other folder(s) there ending in {tail}"
        return text


def store_relative_candidates(logged: Path, run_id: str, root: Path) -> list[Path]:
    """The folders under ``root`` that a run's moved artifact folder ``logged`` may be: the part of
    the logged path after the store folder's name first, then every trailing part of the path that
    still holds the run id, longest first."""
    parts = logged.parts
    if run_id not in parts:
        return []
    at = len(parts) - 1 - parts[::-1].index(run_id)  # the last component that is the run id
    tails = [parts[i:] for i in range(1, at + 1)]
    named = [i for i, part in enumerate(parts[:at]) if part == root.name]
    if named:
        first = parts[named[-1] + 1:]
        tails = [first] + [t for t in tails if t != first]
    return [root.joinpath(*tail) for tail in tails]


def artifact_folder(client, run_id: str) -> ArtifactFolder:
    """The local folder holding a run's artifacts (:class:`ArtifactFolder`)."""
    try:
        uri = client.get_run(run_id).info.artifact_uri
    except Exception as exc:  # a run id the store does not hold
        return ArtifactFolder(run_id, "", None, (), error=f"{type(exc).__name__}: {exc}")
    logged = local_path(uri)
    if logged is None:
        return ArtifactFolder(run_id, uri, None, (), remote=True)
    looked = [str(logged)]
    if logged.is_dir():
        return ArtifactFolder(run_id, uri, logged, tuple(looked))
    root = store_folder(client)
    for candidate in store_relative_candidates(logged, run_id, root) if root is not None else []:
        looked.append(str(candidate))
        if candidate.is_dir():
            return ArtifactFolder(run_id, uri, candidate, tuple(looked))
    return ArtifactFolder(run_id, uri, None, tuple(looked))


def _report(problems: list[str] | None, text: str) -> None:
    import sys

    if problems is None:
        print(f"carrot analysis: {text}", file=sys.stderr)
    elif text not in problems:
        problems.append(text)


def download_artifact(client, run_id: str, path: str, dst: str | Path, *,
                      problems: list[str] | None = None) -> Path | None:
    """Copy one artifact of a run into ``dst``; None when the run has no such artifact.

    A run's artifacts are read from the folder its artifact URI names or, when that folder is
    gone (a store copied or moved with its ``artifacts/``), from the same relative location under
    the store's folder (:func:`artifact_folder`). When the run's artifact folder is found nowhere,
    or a remote artifact store fails, one line says which run, which artifact and where it was
    looked for: appended to ``problems``, or printed to stderr when ``problems`` is None. A run
    whose artifact folder exists but lacks the file simply did not log it: None, nothing said."""
    import shutil

    folder = artifact_folder(client, run_id)
    if folder.remote:
        try:
            return Path(client.download_artifacts(run_id, path, dst_path=str(dst)))
        except Exception as exc:  # an artifact store that is not reachable here, or no such artifact
            _report(problems, f"run {run_id}: artifact {path} could not be downloaded from {folder.uri}: "
                              f"{type(exc).__name__}: {exc}")
            return None
    if folder.path is None:
        _report(problems, folder.missing(path))
        return None
    source = folder.path / path
    if not source.exists():
        return None
    target = Path(dst) / path
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        shutil.copyfile(source, target)
    return target


def read_artifact(client, run_id: str, path: str, read: Callable[[Path], Any], *,
                  problems: list[str] | None = None) -> Any | None:
    """``read(local file)`` on a temporary copy of one artifact; None when the run has none
    (:func:`download_artifact` says why where the artifact could not be found) or when it cannot
    be read (a file cut short or damaged: said the same way)."""
    with tempfile.TemporaryDirectory(prefix="carrot-analysis-") as tmp:
        local = download_artifact(client, run_id, path, tmp, problems=problems)
        if local is None or not local.is_file():
            return None
        try:
            return read(local)
        except Exception as exc:  # zipfile.BadZipFile, ValueError, EOFError, OSError ...
            _report(problems, f"run {run_id}: artifact {path} cannot be read ({contract.error_line(exc)}); "
                              "that run is left out where the artifact is needed")
            return None


def _read_npz(local: Path) -> dict[str, np.ndarray]:
    with np.load(local, allow_pickle=False) as data:
        return {k: np.array(data[k]) for k in data.files}


def read_confusion(client, run_id: str, *, problems: list[str] | None = None) -> dict[str, np.ndarray] | None:
    """``confusion`` (E, K, K) counts, ``epochs`` (E,), ``class_names`` (K,) of one run."""
    return read_artifact(client, run_id, contract.CONFUSION_ARTIFACT, _read_npz, problems=problems)


def read_predictions(client, run_id: str, *, problems: list[str] | None = None) -> dict[str, np.ndarray] | None:
    """A final run's per-sample test predictions (:data:`contract.PREDICTIONS_ARTIFACT`)."""
    return read_artifact(client, run_id, contract.PREDICTIONS_ARTIFACT, _read_npz, problems=problems)


class Artifacts:
    """The runs' confusion matrices and predictions, each read from the store once per command
    (several tables and plots read the same files).

    ``missing`` collects one line per artifact that could not be found or downloaded (which run,
    which artifact, where it was looked for); each line is also passed to ``log`` (stderr by
    default) when it first occurs."""

    def __init__(self, client, log: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.missing: list[str] = []
        self.unreachable: set[str] = set()  # runs whose artifacts could not be found, downloaded or read
        self._log = log
        self._read: dict[tuple[str, str], Any] = {}

    def _get(self, run_id: str, name: str, read: Callable[..., Any]) -> Any:
        if self.client is None:  # no store to read from
            return None
        if (run_id, name) not in self._read:
            problems: list[str] = []
            self._read[(run_id, name)] = read(self.client, run_id, problems=problems)
            for text in problems:
                self.unreachable.add(run_id)
                if text not in self.missing:
                    self.missing.append(text)
                    self._say(text)
        return self._read[(run_id, name)]

    def _say(self, text: str) -> None:
        if self._log is not None:
            self._log(text)
        else:
            import sys

            print(f"carrot analysis: {text}", file=sys.stderr)

    def confusion(self, run_id: str) -> np.ndarray | None:
        """The last epoch's confusion matrix (K, K) int64 (rows: true class), or None."""
        data = self._get(run_id, contract.CONFUSION_ARTIFACT, read_confusion)
        counts = None if data is None else data.get(contract.CONFUSION_KEY)
        if counts is None or counts.ndim != 3 or not len(counts):
            return None
        return np.asarray(counts[-1], dtype=np.int64)

    def class_names(self, run_id: str) -> list[str]:
        data = self._get(run_id, contract.CONFUSION_ARTIFACT, read_confusion) or {}
        return [str(n) for n in data.get("class_names", [])]

    def predictions(self, run_id: str) -> dict[str, np.ndarray] | None:
        return self._get(run_id, contract.PREDICTIONS_ARTIFACT, read_predictions)


# ----------------------------------------------------------------------------- reference pairs
REFERENCE_TOP_N = 20  # pairs in the paper tables' reference set (SPEC: top N, default 20)


@dataclass(frozen=True)
class ReferenceSet:
    """The paper tables' reference pairs of one dataset and backbone: the top-N pairs by
    :func:`contract.confusable_pairs` of the baseline's pooled last-epoch confusion matrices."""

    pairs: np.ndarray  # (P, 2) int64, i < j, most confusable first
    scores: np.ndarray  # (P,) S_ij of the pooled matrix
    pooled: np.ndarray | None  # (K, K) summed counts; None without any baseline matrix
    run_ids: tuple[str, ...]  # the baseline runs pooled
    skipped: int  # baseline runs without a usable confusion matrix (none, or another K)
    top_n: int
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.pairs)

    def errors(self, cm: np.ndarray | None) -> np.ndarray:
        """Each reference pair's error in one run's confusion matrix (P,); NaN when the run has
        no matrix or one of another size."""
        if cm is None or self.pooled is None or cm.shape != self.pooled.shape:
            return np.full(len(self.pairs), np.nan)
        return contract.pair_error(cm, self.pairs)

    def mean_error(self, cm: np.ndarray | None) -> float:
        """The mean pair error over the reference pairs; NaN without pairs or a usable matrix."""
        errors = self.errors(cm)
        return float(errors.mean()) if len(errors) and np.isfinite(errors).all() else math.nan

    def name(self, k: int) -> str:
        return self.class_names[k] if k < len(self.class_names) else str(k)


def reference_set(artifacts: Artifacts, baseline_runs: pd.DataFrame, top_n: int = REFERENCE_TOP_N) -> ReferenceSet:
    """Pool the last-epoch confusion matrices of ``baseline_runs`` and take their top-N pairs.

    Counts are summed as integers and pairs ranked with a fixed tie-break, so the set depends on
    which runs there are, never on the order they finished. A run whose matrix has another
    number of classes than most runs is skipped (and counted).
    """
    matrices = {rid: artifacts.confusion(rid) for rid in sorted(baseline_runs["run_id"])} if len(
        baseline_runs) else {}
    shapes = Counter(cm.shape for cm in matrices.values() if cm is not None)
    if not shapes:
        return ReferenceSet(np.zeros((0, 2), np.int64), np.zeros(0), None, (), len(matrices), top_n)
    shape = max(shapes, key=lambda sh: (shapes[sh], sh))  # most runs; ties: more classes
    used = tuple(rid for rid, cm in matrices.items() if cm is not None and cm.shape == shape)
    pooled = np.sum([matrices[rid] for rid in used], axis=0, dtype=np.int64)  # (K, K)
    pairs = contract.confusable_pairs(pooled, top_n=top_n)  # (P, 2), only pairs with S > 0
    scores = contract.pair_scores(pooled)[pairs[:, 0], pairs[:, 1]] if len(pairs) else np.zeros(0)
    names = next((tuple(n) for n in (artifacts.class_names(rid) for rid in used) if len(n) == shape[0]), ())
    return ReferenceSet(pairs, scores, pooled, used, len(matrices) - len(used), top_n, names)


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
    runs = load_runs(client, args.experiment, dataset=args.dataset, backbone=args.backbone)

    def refuse(flag: str, value: str, problem: str, choices: list[str]) -> None:
        import difflib

        close = difflib.get_close_matches(value, choices, n=1)
        print(f"{prog}: error: {flag} {value}: {problem}" + (f" (did you mean {close[0]!r}?)" if close else "")
              + f"; expected one of: {', '.join(choices) or 'none (the experiment has no runs)'}", file=sys.stderr)

    # a typo must not overwrite the results with empty (or fewer) ones
    if not len(runs) and client.get_experiment_by_name(args.experiment) is None:
        held = sorted(e.name for e in client.search_experiments()
                      if client.search_runs([e.experiment_id], max_results=1))
        if held:
            refuse("--experiment", args.experiment, "no such experiment in the store", held)
            return None, None
    if args.dataset or args.backbone:
        held = load_runs(client, args.experiment)
        for flag, column, wanted in (("--dataset", "dataset", args.dataset), ("--backbone", "backbone", args.backbone)):
            have = sorted(set(held[column])) if len(held) else []
            for value in [v for v in wanted or [] if v not in have]:
                refuse(flag, value, f"no run of experiment {args.experiment!r} has it", have)
                return None, None
    try:  # the output folder, before any work
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"{prog}: error: --out {args.out} cannot be a folder of results ({exc.strerror or exc}); "
              "expected a folder this user can write", file=sys.stderr)
        return None, None
    return client, runs


def db_keys(layer: str, which: str = "ref") -> tuple[str, str]:
    """The keys D_B = -log rho of one layer was logged under: the current one, then the older."""
    return contract.db_metric(layer, which), contract.legacy_db_metric(layer, which)


def db_layers(runs: pd.DataFrame, which: str = "ref") -> list[str]:
    """The layers with a D_B metric under either key, in network order."""
    found = set(metric_layers(runs, lambda layer: contract.db_metric(layer, which)))
    found |= set(metric_layers(runs, lambda layer: contract.legacy_db_metric(layer, which)))
    return sorted(found, key=layer_sort_key)


def first_values(runs: pd.DataFrame, keys: Sequence[str]) -> np.ndarray:
    """Last-epoch values of a renamed metric: per run, the first of ``keys`` it logged."""
    out = np.full(len(runs), np.nan)
    for key in reversed(keys):
        values = metric_values(runs, key)
        out = np.where(np.isfinite(values), values, out)
    return out


def metric_layers(runs: pd.DataFrame, key_of: Callable[[str], str]) -> list[str]:
    """The layers ``L`` for which any of the runs logged the metric ``key_of(L)``, in network order.

    ``key_of`` is a per-layer key of :mod:`carrot.contract`, e.g. ``contract.probe_metric``, so
    the key format is written in one place."""
    prefix, suffix = key_of("\0").split("\0")
    keys = [k for k in metric_keys(runs, re.escape(prefix) + ".+" + re.escape(suffix))
            if np.isfinite(metric_values(runs, k)).any()]  # a column of the store, logged by none of these runs
    return sorted({k[len(prefix):len(k) - len(suffix)] for k in keys}, key=layer_sort_key)
