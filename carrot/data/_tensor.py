"""In-memory datasets of image tensors (the embedded ``digits`` and ``synthetic``)."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from carrot.data import DatasetSplits, limit_per_class, stratified_split


class TensorImageDataset(Dataset):
    """Images held as one float tensor; optional random-shift + flip augmentation."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, augment: bool = False) -> None:
        self.images = images  # (N, 3, H, W) float32, normalised
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.augment:
            pad = max(1, x.shape[-1] // 16)
            x = torch.nn.functional.pad(x[None], (pad,) * 4, mode="replicate")[0]
            dy, dx = torch.randint(0, 2 * pad + 1, (2,)).tolist()
            x = x[:, dy:dy + self.images.shape[-2], dx:dx + self.images.shape[-1]]
        return x, int(self.labels[i])


def split_tensor_dataset(images: torch.Tensor, labels: np.ndarray, cfg, class_names: list[str],
                         augment: bool, **extra) -> DatasetSplits:
    """Stratified train/val/test partition fixed by ``cfg.split_seed``; normalised by train stats."""
    trainval, test = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
    tr_rel, val_rel = stratified_split(labels[trainval], cfg.val_fraction, cfg.split_seed + 1)
    train, val = trainval[tr_rel], trainval[val_rel]
    train = train[limit_per_class(labels[train], cfg.limit_per_class)]
    mean = images[train].mean(dim=(0, 2, 3), keepdim=True)
    std = images[train].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    images = (images - mean) / std
    parts = {"train": train, "val": val, "test": test}
    return DatasetSplits(
        train=TensorImageDataset(images[train], labels[train], augment=augment),
        val=TensorImageDataset(images[val], labels[val]),
        test=TensorImageDataset(images[test], labels[test]),
        train_eval=TensorImageDataset(images[train], labels[train]),
        val_train=TensorImageDataset(images[val], labels[val], augment=augment),
        num_classes=len(class_names),
        class_names=class_names,
        labels={k: labels[v].astype(np.int64) for k, v in parts.items()},
        **extra,
    )
