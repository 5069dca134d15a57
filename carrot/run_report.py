"""What a run shows in the MLflow UI besides its metrics: its description, its dataset
inputs with a content digest, its pictures, and the params worth comparing.

- :func:`describe`: the run description (``mlflow.note.content``): variant, study and trial,
  the headline numbers of the last epoch, and the reason for a failure.
- :func:`dataset_inputs`: one MLflow dataset input per split (context ``train``,
  ``validation``, ``test``), each with a digest of its content: the file list relative to the
  dataset root (or the pixels of an in-memory dataset) and the labels.
- :func:`figures`: the confusion matrix of the last epoch with class names, the top
  confusable pairs as a labelled bar chart, and the prototype-cosine and D_B trajectories;
  :func:`log_pictures` logs them with their wall time.
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
CONFUSION_IMAGE = f"{IMAGE_DIR}/confusion.png"
PAIRS_IMAGE = f"{IMAGE_DIR}/top_pairs.png"
TRAJECTORY_IMAGE = f"{IMAGE_DIR}/trajectories.png"
SPLIT_CONTEXT = {"train": "train", "val": "validation", "test": "test"}
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


def dataset_inputs(dataset_id: str, root: str | None, splits) -> list:
    """MLflow ``DatasetInput`` entities, one per split, each with its content digest and
    its size, class count and context."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import ColSpec, Schema

    out = []
    for split in ("train", "val", "test"):
        ds, labels = getattr(splits, split), splits.labels[split]
        source = CodeDatasetSource({"dataset": dataset_id, "root": root or "(built in)", "split": split})
        schema = Schema([ColSpec("binary", "image"), ColSpec("long", "label")])
        meta = MetaDataset(source, name=f"{dataset_id}/{split}", digest=content_digest(ds, labels, root),
                           schema=schema)
        out.append(DatasetInput(meta._to_mlflow_entity(), tags=[
            InputTag("mlflow.data.context", SPLIT_CONTEXT[split]),
            InputTag("carrot.samples", str(len(labels))),
            InputTag("carrot.classes", str(len(np.unique(labels))))]))
    return out


# ----------------------------------------------------------------------------- figures
def _pair_label(names: list[str], i: int, j: int) -> str:
    return f"{names[i]} ↔ {names[j]}" if names else f"{i} ↔ {j}"


def figures(confusion: np.ndarray, class_names: list[str], history: list[dict[str, float]],
            top_n: int = 20) -> dict[str, Any]:
    """Artifact name -> matplotlib Figure: the last epoch's confusion matrix, its top
    confusable pairs, and the prototype-cosine and D_B trajectories over the epochs."""
    from matplotlib.figure import Figure  # no pyplot: nothing to close, no global figure list

    def subplots(*grid: int, figsize: tuple[float, float]):
        fig = Figure(figsize=figsize, layout="constrained")
        return fig, fig.subplots(*grid)

    out: dict[str, Any] = {}
    K = confusion.shape[0]
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = min(10.0, 3.0 + 0.18 * K)
    fig, ax = subplots(figsize=(size + 1.2, size))
    im = ax.imshow(rates, cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, label="share of the true class", shrink=0.8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if class_names and K <= MAX_NAMED_CLASSES:
        ax.set_xticks(range(K), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(K), class_names, fontsize=7)
    ax.set_title(f"Confusion matrix, last epoch ({K} classes)")
    out[CONFUSION_IMAGE] = fig

    pairs = contract.confusable_pairs(confusion, top_n)
    if len(pairs):
        errors = contract.pair_error(confusion, pairs)
        labels = [_pair_label(class_names, int(i), int(j)) for i, j in pairs]
        fig, ax = subplots(figsize=(6.4, 1.2 + 0.28 * len(pairs)))
        ax.barh(range(len(pairs)), 100 * errors, color="tab:red")
        ax.set_yticks(range(len(pairs)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(1.0, 100 * float(np.nanmax(errors)) * 1.1))
        ax.set_xlabel("pair error (%): share of the pair's samples predicted as the other class")
        ax.set_title(f"Top {len(pairs)} confusable pairs, last epoch")
        out[PAIRS_IMAGE] = fig

    epochs = np.arange(1, len(history) + 1)
    layers = sorted({k.split("/")[1] for h in history for k in h if k.startswith("dB/")})
    if history and (layers or any(contract.PROTO_COS_REF in h for h in history)):
        fig, axes = subplots(1, 2, figsize=(10, 3.6))
        for key, label in ((contract.PROTO_COS_REF, "reference pairs"), (contract.PROTO_COS_TOP, "top pairs"),
                           (contract.PROTO_COS_OFFDIAG_MEAN, "all pairs (mean)")):
            values = [h.get(key, np.nan) for h in history]
            if np.isfinite(values).any():
                axes[0].plot(epochs, values, marker="o", label=label)
        axes[0].set_xlabel("epoch")
        axes[0].set_ylabel("prototype cosine")
        axes[0].set_title("Prototype cosine of confusable pairs")
        if axes[0].lines:  # no prototype cosine was logged: an empty panel, no empty legend
            axes[0].legend(fontsize=8)
        for layer in layers:
            axes[1].plot(epochs, [h.get(contract.db_metric(layer, "ref"), np.nan) for h in history], marker="o",
                         label=layer)
        axes[1].set_ylim(bottom=0)
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("D_B = -log rho")
        axes[1].set_title("Bhattacharyya distance of reference pairs")
        if layers:
            axes[1].legend(fontsize=8, title="layer")
        for ax in axes:
            ax.xaxis.get_major_locator().set_params(integer=True)
        out[TRAJECTORY_IMAGE] = fig
    return out


# ----------------------------------------------------------------------------- logging them
PICTURES_METRIC = "time/pictures_s"  # wall time of a run's pictures, drawn and logged at its end


def log_pictures(logger, confusion: np.ndarray, class_names: list[str], history: list[dict[str, float]],
                 top_n: int, step: int) -> None:
    """Draw :func:`figures`, log them into ``logger``'s run and their wall time as
    ``time/pictures_s`` at ``step``."""
    began = time.time()
    for name, fig in figures(confusion, class_names, history, top_n).items():
        logger.log_figure(fig, name)
    logger.log_metrics({PICTURES_METRIC: time.time() - began}, step=step)
