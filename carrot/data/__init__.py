"""Dataset registry: every dataset is a builder ``(DataConfig, ImageSpec) -> DatasetSplits``.

Builders register with ``@register_dataset("name")``; the modules of this package are
imported on first use, so a new dataset is one new file. :func:`preflight` builds a
dataset and checks it (at least two classes, readable image files) before any run exists.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from carrot.config import UserError


class DatasetError(UserError, ValueError):
    """A dataset cannot be built (missing or incomplete root, bad layout)."""


@dataclass
class ImageSpec:
    """What the backbone expects (from timm's data config)."""

    input_size: int = 224  # square side in pixels
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875


@dataclass
class DatasetSplits:
    train: Dataset  # items are (image tensor (3, H, W) float32, int label)
    val: Dataset
    test: Dataset
    num_classes: int
    class_names: list[str]
    labels: dict[str, np.ndarray]  # split -> (N,) int64 labels, in item order
    planted_pairs: list[tuple[int, int]] | None = None  # synthetic only: known confusable pairs
    info: dict[str, str] = field(default_factory=dict)
    train_eval: Dataset | None = None  # the training items with evaluation transforms (probes)
    val_train: Dataset | None = None  # the validation items with training transforms (final runs)

    def __post_init__(self) -> None:
        if self.train_eval is None:
            self.train_eval = self.train
        if self.val_train is None:
            self.val_train = self.val


Builder = Callable[..., DatasetSplits]
_REGISTRY: dict[str, Builder] = {}
_LOADED = False


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return wrap


def _load_all() -> None:
    global _LOADED
    if not _LOADED:
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__name__}.{module.name}")
        _LOADED = True


def list_datasets() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def build_dataset(cfg, spec: ImageSpec) -> DatasetSplits:
    _load_all()
    if cfg.name not in _REGISTRY:
        raise DatasetError(f"unknown dataset {cfg.name!r}; valid: {', '.join(list_datasets())}")
    return _REGISTRY[cfg.name](cfg, spec)


def limit_per_class(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices keeping the first ``limit`` items of every class (all when ``limit`` is None)."""
    if not limit:
        return np.arange(len(labels))
    keep = np.concatenate([np.flatnonzero(labels == c)[:limit] for c in np.unique(labels)])
    return np.sort(keep)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): ``fraction`` of every class held out, at least one kept."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_held = int(round(fraction * len(idx)))
        n_held = min(max(n_held, 1 if len(idx) > 1 else 0), len(idx) - 1)
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def _names(class_names: list[str], ids, shown: int = 5) -> str:
    ids = [int(c) for c in ids]
    named = [class_names[c] if 0 <= c < len(class_names) else str(c) for c in ids[:shown]]
    return ", ".join(named) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def preflight(cfg, verify_images: bool = False) -> DatasetSplits:
    """Build the dataset of ``cfg`` (a ``DataConfig``) and check it before any run exists.

    Raises :class:`DatasetError` with one message when

    * the training split holds fewer than 2 classes (a one-class run would report 100 %
      accuracy), or a class of the val/test splits has no training image;
    * an image file of any split is unusable: by default PIL opens every file and reads its
      header (no decoding: about the cost of listing the files); with ``verify_images`` every
      image is decoded completely, which also catches files cut short after their header.
      The message names the first bad file, its reason and how many bad files there are.

    Embedded datasets (``digits``, ``synthetic``) have no files; only their classes are
    checked. Nothing is written. Returns the built splits.
    """
    splits = build_dataset(cfg, ImageSpec(input_size=cfg.image_size or 224))
    where = f"{cfg.name}: {cfg.root}" if getattr(cfg, "root", None) else str(cfg.name)
    train = np.unique(splits.labels["train"])
    if len(train) < 2:
        raise DatasetError(
            f"{where}: the training split has {len(train)} class{'es' if len(train) != 1 else ''}"
            f"{' (' + _names(splits.class_names, train) + ')' if len(train) else ''}; "
            f"expected at least 2 classes with training images"
        )
    for split in ("val", "test"):
        absent = np.setdiff1d(np.unique(splits.labels[split]), train)
        if len(absent):
            raise DatasetError(
                f"{where}: {len(absent)} class(es) of the {split} split have no training images: "
                f"{_names(splits.class_names, absent)}; expected every evaluated class in the "
                f"training split"
            )
    paths = [p for part in (splits.train, splits.val, splits.test) for p in getattr(part, "paths", ())]
    if paths:
        from carrot.data._images import check_images

        check_images(str(cfg.name), paths, full=verify_images)
    return splits


__all__ = [
    "DatasetError", "DatasetSplits", "ImageSpec", "build_dataset", "list_datasets", "preflight",
    "limit_per_class", "register_dataset", "stratified_split",
]
