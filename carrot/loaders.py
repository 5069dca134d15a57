"""DataLoaders for a run: the P x K sampler, workers, pinned memory."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from carrot.config import ConfigError, RunConfig
from carrot.data import DatasetSplits


def training_split(splits: DatasetSplits, split: str) -> tuple[Dataset, np.ndarray, Dataset, np.ndarray, str]:
    """(train set, its labels, evaluation set, its labels, evaluation split name).

    Study trials (``split="val"``) train on train and evaluate on val; final runs
    (``split="test"``) train on train+val and evaluate on test.
    """
    if split == "test":
        train = ConcatDataset([splits.train, splits.val_train])
        labels = np.concatenate([splits.labels["train"], splits.labels["val"]])
        return train, labels, splits.test, splits.labels["test"], "test"
    return splits.train, splits.labels["train"], splits.val, splits.labels["val"], "val"


def pk_batch_size(num_classes: int, m: int, batch_size: int) -> int:
    """P x m with P = min(batch_size / m, classes): datasets with few classes get smaller batches."""
    if batch_size % m:
        raise ConfigError(f"invalid data.batch_size={batch_size}: a P x K batch needs a multiple of data.m_per_class={m}")
    return min(batch_size // m, num_classes) * m


def check_batch(cfg: RunConfig, splits: DatasetSplits) -> None:
    """A training batch of ``cfg`` can be filled from the training split of every trial: with
    shuffled batches the split holds a whole batch; with P x K batches (configured, or searched
    by a study when ``data.sampler`` is ``auto``) every class has ``data.m_per_class`` samples."""
    labels = splits.labels["train"] if cfg.split == "val" else np.concatenate(
        [splits.labels["train"], splits.labels["val"]])
    if len(labels) < cfg.data.batch_size:
        raise ConfigError(f"invalid data.batch_size={cfg.data.batch_size}: larger than the training split "
                          f"({len(labels)} samples); expected at most {len(labels)}")
    if cfg.data.sampler in ("pk", "auto"):
        m = cfg.data.m_per_class
        counts = np.unique(labels, return_counts=True)[1]
        if cfg.data.sampler == "pk" and counts.min() < m:
            raise ConfigError(f"data.sampler=pk needs data.m_per_class={m} training samples of every class; "
                              f"the smallest class has {counts.min()}; lower data.m_per_class or use "
                              "data.sampler=random")
        if cfg.data.batch_size % m:
            raise ConfigError(f"invalid data.batch_size={cfg.data.batch_size}: a P x K batch needs a multiple of "
                              f"data.m_per_class={m}" + (" (studies search the sampler: set data.sampler to pin it)"
                                                         if cfg.data.sampler == "auto" else ""))


def pk_sampler(labels: np.ndarray, m: int, batch_size: int, seed: int):
    """pytorch-metric-learning's ``MPerClassSampler``: every batch holds batch_size/m classes x m."""
    from pytorch_metric_learning.samplers import MPerClassSampler

    classes, counts = np.unique(labels, return_counts=True)
    short = classes[counts < m]
    if len(short):
        raise ConfigError(
            f"classes {short[:10].tolist()} have fewer than m_per_class={m} training samples "
            f"(smallest: {counts.min()}); lower data.m_per_class or use data.sampler=random"
        )
    if len(classes) < 2:
        raise ConfigError("a P x K batch needs at least 2 classes in the training split")

    class SeededMPerClassSampler(MPerClassSampler):
        """MPerClassSampler drawing from its own generator (seed + epoch), not numpy's global one,
        so a run's batches do not depend on what else consumed the global state."""

        def __iter__(self):
            from pytorch_metric_learning.utils import common_functions as c_f

            saved = c_f.NUMPY_RANDOM
            c_f.NUMPY_RANDOM = np.random.RandomState(seed + self.epoch)
            self.epoch += 1
            try:
                return super().__iter__()  # builds the whole index list before returning
            finally:
                c_f.NUMPY_RANDOM = saved

    sampler = SeededMPerClassSampler(labels.tolist(), m=m, batch_size=batch_size,
                                     length_before_new_iter=len(labels))
    sampler.epoch = 0
    return sampler


def make_loader(dataset: Dataset, cfg: RunConfig, *, train: bool, labels: np.ndarray | None = None,
                pin: bool = False) -> DataLoader:
    """Evaluation: in order, double batches. Training: ``cfg.data.sampler`` (resolved: ``pk``
    or ``random``), seeded by the run's seed."""
    workers = cfg.data.workers
    common = dict(num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)
    if workers > 0:
        common["prefetch_factor"] = 4
    if not train:
        return DataLoader(dataset, batch_size=cfg.data.batch_size * 2, shuffle=False, **common)
    generator = torch.Generator().manual_seed(cfg.seed)
    assert cfg.data.sampler in ("pk", "random"), f"unresolved sampler {cfg.data.sampler!r}: resolve the config"
    if cfg.data.sampler == "pk":
        assert labels is not None, "the P x K sampler needs the training labels"
        m = cfg.data.m_per_class
        batch_size = pk_batch_size(len(np.unique(labels)), m, cfg.data.batch_size)
        sampler = pk_sampler(labels, m, batch_size, cfg.seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **common)
    return DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                      generator=generator, **common)
