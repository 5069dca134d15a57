"""DataLoaders for a run: the P x K sampler, workers, pinned memory."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from carrot.config import ConfigError, RunConfig
from carrot.data import DatasetSplits


def trained_on(split: str) -> tuple[str, ...]:
    """The splits a run that evaluates on ``split`` trains on (see :func:`training_split`)."""
    return ("train", "val") if split == "test" else ("train",)


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


def check_batch(cfg: RunConfig, splits: DatasetSplits, world: int = 1) -> None:
    """A training batch of ``cfg`` can be filled from the training split of every trial: with
    shuffled batches the split holds a whole batch; with P x K batches (configured, or searched
    by a study when ``data.sampler`` is ``auto``) every class has ``data.m_per_class`` samples.
    With ``world`` DDP processes every rank gets an equal share (:func:`rank_batch_size`)."""
    if world > 1:
        rank_batch_size(cfg.data.batch_size, world, cfg.data.m_per_class if cfg.data.sampler in ("pk", "auto") else 1)
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


class RankSlice(torch.utils.data.Sampler):
    """Rank ``rank``'s slice of every global batch a P x K sampler draws: every rank draws the
    same global batches (same seed) and keeps rows ``rank * B/W .. (rank + 1) * B/W - 1``, that
    is, whole classes (each class's m indices are consecutive)."""

    def __init__(self, sampler, batch_size: int, rank: int, world: int) -> None:
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world
        self.share = batch_size // world

    @property
    def epoch(self) -> int:  # the checkpoint's view of the P x K sampler
        return self.sampler.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.sampler.epoch = value

    @property
    def labels(self):
        return self.sampler.labels

    def __iter__(self):
        indices = list(iter(self.sampler))
        for start in range(0, len(indices) - self.batch_size + 1, self.batch_size):
            yield from indices[start + self.rank * self.share:start + (self.rank + 1) * self.share]

    def __len__(self) -> int:
        return (len(self.sampler) // self.batch_size) * self.share


def rank_batch_size(global_batch: int, world: int, per: int = 1, what: str = "data.batch_size") -> int:
    """The batch each of ``world`` ranks holds: equal shares of whole groups of ``per`` rows."""
    if global_batch % (world * per):
        unit = f"{world} processes" + (f" x data.m_per_class={per}" if per > 1 else "")
        raise ConfigError(f"invalid {what}={global_batch} for {world} DDP processes: expected a multiple of "
                          f"{world * per} ({unit}), so every rank holds an equal share"
                          + (" of whole classes" if per > 1 else ""))
    return global_batch // world


def make_loader(dataset: Dataset, cfg: RunConfig, *, train: bool, labels: np.ndarray | None = None,
                pin: bool = False) -> DataLoader:
    """Evaluation: in order, double batches. Training: ``cfg.data.sampler`` (resolved: ``pk``
    or ``random``), seeded by the run's seed. Under DDP (:mod:`carrot.ddp`) the global batch
    is ``data.batch_size`` and each rank loads its equal share: a ``DistributedSampler``
    slice, or, for P x K, whole classes of the global P x K batch."""
    from carrot import ddp

    world, rank = ddp.world_size(), ddp.rank()
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
        if world > 1:
            share = rank_batch_size(batch_size, world, m, "P x K batch")
            return DataLoader(dataset, batch_size=share, sampler=RankSlice(sampler, batch_size, rank, world),
                              drop_last=True, **common)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **common)
    if world > 1:
        from torch.utils.data.distributed import DistributedSampler

        share = rank_batch_size(cfg.data.batch_size, world)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                     drop_last=True)
        return DataLoader(dataset, batch_size=share, sampler=sampler, drop_last=True, **common)
    return DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True,
                      generator=generator, **common)
