"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).

Real data that ships inside an installed package, so it needs no download. Images are
resized to ``image_size`` (default 32 px), replicated to three channels and standardised
with the training split's statistics.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from carrot.data import DatasetSplits, ImageSpec, register_dataset
from carrot.data._tensor import split_tensor_dataset

DEFAULT_SIZE = 32


@register_dataset("digits")
def build_digits(cfg, spec: ImageSpec) -> DatasetSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    size = cfg.image_size or DEFAULT_SIZE
    x = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    labels = bunch.target.astype(np.int64)
    return split_tensor_dataset(
        x, labels, cfg, [str(i) for i in range(10)], augment=cfg.augment != "none",
        info={"source": "sklearn.datasets.load_digits", "image_size": str(size)},
    )
