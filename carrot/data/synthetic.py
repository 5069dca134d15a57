"""``synthetic``: generated images with a planted structure of confusable sibling classes.

Classes come in ``synthetic_groups`` groups of ``synthetic_siblings`` siblings. All classes
of a group share a strong group pattern (a smooth random image); siblings differ only in a
small detail: a faint patch at a sibling-specific place. So a classifier separates groups
easily and siblings with difficulty, and the confusable pairs are known in advance
(``DatasetSplits.planted_pairs``): every pair of siblings within a group.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from carrot.data import DatasetSplits, ImageSpec, register_dataset
from carrot.data._tensor import split_tensor_dataset

DEFAULT_SIZE = 32


def make_synthetic(groups: int, siblings: int, per_class: int, size: int, detail: float, seed: int):
    """Images (N, 3, size, size), labels (N,), planted pairs [(i, j), ...] with i < j."""
    g = torch.Generator().manual_seed(seed)
    k = groups * siblings
    # group patterns: low-frequency noise upsampled, strong amplitude
    coarse = torch.randn(groups, 3, 4, 4, generator=g)
    group_pattern = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) * 1.5
    # sibling detail: a faint square patch at a sibling-specific position
    patch = max(2, size // 8)
    detail_maps = torch.zeros(k, 3, size, size)
    for c in range(k):
        y0, x0 = torch.randint(0, size - patch, (2,), generator=g).tolist()
        sign = torch.randn(3, 1, 1, generator=g).sign()
        detail_maps[c, :, y0:y0 + patch, x0:x0 + patch] = sign * detail
    labels = np.repeat(np.arange(k), per_class)
    y = torch.as_tensor(labels)
    noise = torch.randn(len(labels), 3, size, size, generator=g) * 0.5
    images = group_pattern[y // siblings] + detail_maps[y] + noise
    planted = [
        (grp * siblings + a, grp * siblings + b)
        for grp in range(groups)
        for a, b in itertools.combinations(range(siblings), 2)
    ]
    return images, labels.astype(np.int64), planted


@register_dataset("synthetic")
def build_synthetic(cfg, spec: ImageSpec) -> DatasetSplits:
    size = cfg.image_size or DEFAULT_SIZE
    images, labels, planted = make_synthetic(
        cfg.synthetic_groups, cfg.synthetic_siblings, cfg.synthetic_per_class, size,
        cfg.synthetic_detail, seed=cfg.split_seed,
    )
    k = cfg.synthetic_groups * cfg.synthetic_siblings
    names = [f"g{c // cfg.synthetic_siblings}s{c % cfg.synthetic_siblings}" for c in range(k)]
    return split_tensor_dataset(
        images, labels, cfg, names, augment=cfg.augment != "none", planted_pairs=planted,
        info={"generator": "carrot.data.synthetic", "image_size": str(size)},
    )
