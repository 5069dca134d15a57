"""What a run shows in the MLflow UI besides its metrics: its description, its dataset
inputs with a content digest, its pictures, and the params worth comparing.

- :func:`describe`: the run description (``mlflow.note.content``): variant, study and trial,
  the headline numbers of the last epoch, and the reason for a failure.
- :func:`dataset_inputs`: one MLflow dataset input per split (context ``train``,
  ``validation``, ``test``), each with a digest of its content: the file list relative to the
  dataset root (or the pixels of an in-memory dataset) and the labels.
- :func:`pictures`: the confusion matrix of the last epoch with class names, the top
  confusable pairs as a labelled bar chart, and the prototype-cosine and D_B trajectories, as
  SVG (:mod:`carrot.charts`); :func:`log_pictures` logs them with their wall time.
- :func:`logged_params`: the resolved configuration without display switches, with the
  device as it was resolved.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

import numpy as np

from carrot import contract

# config keys that change what is shown, not what is trained: never params
DISPLAY_KEYS = ("show_progress", "experiment")
IMAGE_DIR = "images"
CONFUSION_IMAGE = f"{IMAGE_DIR}/confusion.svg"
PAIRS_IMAGE = f"{IMAGE_DIR}/top_pairs.svg"
TRAJECTORY_IMAGE = f"{IMAGE_DIR}/trajectories.svg"
# the splits a run reads, as MLflow dataset contexts: a search trial trains on train and is scored
# on val; a final run trains on train+val and is scored on test
SPLIT_CONTEXT = {"val": {"train": "train", "val": "validation"},
                 "test": {"train": "train", "val": "train", "test": "test"}}
MAX_NAMED_CLASSES = 40  # the heatmap names every class up to this many


def logged_params(flat: dict[str, Any], device: str) -> dict[str, Any]:
    """The flattened resolved configuration as MLflow params: display switches dropped, the
    device resolved (``cuda``/``cpu``, not ``auto``)."""
    out = {k: v for k, v in flat.items() if k not in DISPLAY_KEYS}
    out["device"] = device
    return out


# ----------------------------------------------------------------------------- description
def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.2f}%" if pct else f"{value:.4f}"


def headline(metrics: dict[str, float], split: str) -> list[tuple[str, str]]:
    """(label, value) of the numbers a reader looks for first, from one epoch's metrics."""
    rows = [(f"{split} accuracy", _fmt(metrics.get(contract.split_metric(split, "acc")), pct=True)),
            (f"{split} mean class accuracy", _fmt(metrics.get(contract.split_metric(split, "mean_class_acc")),
                                                  pct=True)),
            ("reference-pair error", _fmt(metrics.get(contract.REF_ERROR), pct=True)),
            ("reference-pair prototype cosine", _fmt(metrics.get(contract.PROTO_COS_REF)))]
    probe = metrics.get(contract.probe_metric("embedding"))
    if probe is not None:
        rows.append(("linear probe (embedding)", _fmt(probe, pct=True)))
    return rows


def describe(variant: str, study: str | None, trial: int | None, status: str, epochs_done: int, epochs: int,
             metrics: dict[str, float] | None, split: str, error: str = "") -> str:
    """The run description, in Markdown."""
    where = f"study `{study}`" + (f", trial {trial}" if trial is not None else "") if study else "single run"
    lines = [f"**{variant}** · {where} · {status.lower()} after {epochs_done}/{epochs} epochs", ""]
    if metrics:
        lines += ["| | |", "|---|---|"] + [f"| {label} | {value} |" for label, value in headline(metrics, split)]
    if error:
        lines += ["", f"**{'pruned' if status == 'KILLED' and error.startswith('pruned') else 'stopped'}:** "
                  f"{error}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- dataset inputs
def _unwrap(ds) -> tuple[Any, np.ndarray | None]:
    """(base dataset, indices into it), through any nesting of ``Subset``."""
    import torch

    indices = None
    while isinstance(ds, torch.utils.data.Subset):
        idx = np.asarray(ds.indices)
        indices = idx if indices is None else idx[indices]
        ds = ds.dataset
    return ds, indices


def content_digest(ds, labels: np.ndarray, root: str | None = None) -> str:
    """sha256 (first 16 hex digits) of a split's content: its file list (relative to
    ``root``) or its pixels, and its labels, in item order."""
    import os

    h = hashlib.sha256()
    base, idx = _unwrap(ds)
    paths = getattr(base, "paths", None)
    if paths is not None:
        chosen = [paths[i] for i in idx] if idx is not None else list(paths)
        if root:
            chosen = [os.path.relpath(p, root) for p in chosen]
        h.update(json.dumps(chosen).encode())
    elif hasattr(base, "images"):
        images = base.images if idx is None else base.images[idx]
        h.update(np.ascontiguousarray(np.asarray(images)).tobytes())
    h.update(np.ascontiguousarray(np.asarray(labels, dtype=np.int64)).tobytes())
    return h.hexdigest()[:16]


def dataset_inputs(dataset_id: str, root: str | None, splits, run_split: str = "val") -> list:
    """MLflow ``DatasetInput`` entities, one per split the run reads (``run_split``: the split
    it is scored on), each with its content digest, its size, class count and context."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import ColSpec, Schema

    out = []
    for split, context in SPLIT_CONTEXT[run_split].items():
        ds, labels = getattr(splits, split), splits.labels[split]
        source = CodeDatasetSource({"dataset": dataset_id, "root": root or "(built in)", "split": split})
        schema = Schema([ColSpec("binary", "image"), ColSpec("long", "label")])
        meta = MetaDataset(source, name=f"{dataset_id}/{split}", digest=content_digest(ds, labels, root),
                           schema=schema)
        out.append(DatasetInput(meta._to_mlflow_entity(), tags=[
            InputTag("mlflow.data.context", context),
            InputTag("carrot.samples", str(len(labels))),
            InputTag("carrot.classes", str(len(np.unique(labels))))]))
    return out


# ----------------------------------------------------------------------------- pictures
def _pair_label(names: list[str], i: int, j: int) -> str:
    from carrot.charts import NAME_LIMIT, shorten

    return f"{shorten(str(names[i]), NAME_LIMIT)} ↔ {shorten(str(names[j]), NAME_LIMIT)}" if names else f"{i} ↔ {j}"


def pictures(confusion: np.ndarray, class_names: list[str], history: list[dict[str, float]],
             top_n: int = 20) -> dict[str, str]:
    """Artifact name -> SVG document (:mod:`carrot.charts`): the last epoch's confusion matrix,
    its top confusable pairs, and the prototype-cosine and D_B trajectories over the epochs
    (when the run logged either)."""
    from carrot import charts

    out = {CONFUSION_IMAGE: charts.confusion_matrix(confusion, class_names, MAX_NAMED_CLASSES)}
    pairs = contract.confusable_pairs(confusion, top_n)
    if len(pairs):
        out[PAIRS_IMAGE] = charts.pair_bars([_pair_label(class_names, int(i), int(j)) for i, j in pairs],
                                            contract.pair_error(confusion, pairs))
    layers = sorted({k.split("/")[1] for h in history for k in h if k.startswith("dB/")})
    if history and (layers or any(contract.PROTO_COS_REF in h for h in history)):
        cosines = []
        for key, label in ((contract.PROTO_COS_REF, "reference pairs"), (contract.PROTO_COS_TOP, "top pairs"),
                           (contract.PROTO_COS_OFFDIAG_MEAN, "all pairs (mean)")):
            values = [h.get(key, math.nan) for h in history]
            if np.isfinite(values).any():
                cosines.append((label, values))
        distances = [(layer, [h.get(contract.db_metric(layer, "ref"), math.nan) for h in history])
                     for layer in layers]
        out[TRAJECTORY_IMAGE] = charts.line_panels([
            {"title": "Prototype cosine of confusable pairs", "ylabel": "prototype cosine", "series": cosines,
             "empty": "no prototype cosine logged"},
            {"title": "Bhattacharyya distance of reference pairs", "ylabel": "D_B = -log rho", "series": distances,
             "from_zero": True, "legend_title": "layer", "empty": "no D_B logged"},
        ], len(history))
    return out


# ----------------------------------------------------------------------------- logging them
PICTURES_METRIC = "time/pictures_s"  # wall time of a run's pictures, drawn and logged at its end


def log_pictures(logger, confusion: np.ndarray, class_names: list[str], history: list[dict[str, float]],
                 top_n: int, step: int) -> str:
    """Draw :func:`pictures`, log them into ``logger``'s run (one artifact upload) and their
    wall time as ``time/pictures_s`` at ``step``. Returns ``""``, or why they could not be
    drawn: a picture that fails costs the run its pictures, not its status (a store that fails
    still raises)."""
    began = time.time()
    try:
        files = {name: svg.encode("utf-8") for name, svg in pictures(confusion, class_names, history, top_n).items()}
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    logger.log_files(files)
    logger.log_metrics({PICTURES_METRIC: time.time() - began}, step=step)
    return ""
