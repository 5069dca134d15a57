"""``pairwise_confusion``: the published comparator (Dubey et al., ECCV 2018).

Pairwise Confusion pulls the predicted distributions of differently-labelled samples
together (it *adds* confusion, where CARROT pushes the confused pairs apart):

    L = CE + lambda * mean_{(i, j) in pairs, y_i != y_j} ||p_i - p_j||_2,   p = softmax(logits),

pairs being sample i of the first half of the batch with sample i + B/2 of the second
half (an odd batch drops its last sample). The authors' code uses lambda around 0.1 to 0.2
times the number of classes, so the hyperparameter is ``lam_per_class`` and
``lambda = lam_per_class * K``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from optuna.distributions import FloatDistribution
from torch import Tensor

from carrot.variants import register_variant
from carrot.variants.base import BaseHparams, StepBatch, Variant


def pairwise_confusion_loss(logits: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean Euclidean distance between the softmax outputs of half-batch pairs.

    With h = floor(B / 2), pair i = (i, i + h) for i < h; only pairs with different labels
    count:  L = sum_i m_i ||p_i - p_{i+h}||_2 / max(1, sum_i m_i),  m_i = [y_i != y_{i+h}].
    The distance has a zero (not NaN) gradient where p_i = p_{i+h}.

    Args:
        logits: (B, K) any float dtype (computed in float32).
        y: (B,) int labels.
    Returns:
        loss: 0-dim float32 (0 when no pair has different labels, still in the graph).
        stats: ``pairs`` (number of counted pairs), ``distance_mean`` (= loss, detached).
    """
    half = logits.shape[0] // 2
    p = F.softmax(logits.float(), dim=1)  # (B, K)
    p_a, p_b = p[:half], p[half:2 * half]  # (h, K) each
    differ = (y[:half] != y[half:2 * half]).float()  # (h,)
    sq = ((p_a - p_b) ** 2).sum(1)  # (h,)
    # sqrt'(0) is infinite; route zero distances through a constant so the gradient is 0.
    positive = sq > 0
    dist = torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))
    count = differ.sum()
    loss = (dist * differ).sum() / count.clamp_min(1.0)
    return loss, {"pairs": count, "distance_mean": loss.detach()}


@dataclass
class PairwiseConfusionHparams(BaseHparams):
    lam_per_class: float = 0.1  # lambda = lam_per_class * K (the authors: 0.1 to 0.2 times K)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam_per_class < 0:
            raise ValueError(f"lam_per_class must be >= 0, got {self.lam_per_class}")


@register_variant
class PairwiseConfusion(Variant):
    """CE + (lam_per_class * K) * pairwise confusion of the half-batch pairs."""

    name = "pairwise_confusion"
    Hparams = PairwiseConfusionHparams
    search_space = {"lam_per_class": FloatDistribution(0.02, 0.5, log=True)}
    statistics = ("pc_distance", "pairs", "lambda")
    default_sampler = "random"

    def compute(self, batch: StepBatch, ce: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        lam = self.hp.lam_per_class * batch.logits.shape[1]
        loss, stats = pairwise_confusion_loss(batch.logits, batch.labels)
        return {"pc": lam * loss}, {
            "pc_distance": stats["distance_mean"],
            "pairs": stats["pairs"],
            "lambda": torch.full((), lam, device=loss.device),  # a fill, not a host copy
        }
