"""``pairwise_confusion``: the published comparator (Dubey et al., ECCV 2018).

Pairwise Confusion pulls the predicted distributions of pairs of samples together (it *adds*
confusion, where CARROT pushes the confused pairs apart). The batch is split in halves and
sample i of the first half is paired with sample i + B/2 of the second; p = softmax(logits).

Default, ``pairs="all"``: the authors' released PyTorch code. Their ``PairwiseConfusion``
(repository abhimanyudubey/confusion, ``confusion_pytorch/__init__.py``) is::

    batch_left = features[:int(0.5*batch_size)]
    batch_right = features[int(0.5*batch_size):]
    loss = torch.norm((batch_left - batch_right).abs(), 2, 1).sum() / float(batch_size)

i.e. the sum over the B/2 half-batch pairs of ||p_i - p_{i+B/2}||_2 divided by the batch size
B, with no mask on the labels (a same-label pair counts like any other), and an exception for
an odd batch size. Here

    L_pc = (1 / B) sum_{i < B/2} ||p_i - p_{i+B/2}||_2,

an odd batch drops its last sample (B is then the even part) instead of raising.

Option ``pairs="different"``: the mean over the half-batch pairs with different labels,
``sum_i m_i ||p_i - p_{i+B/2}||_2 / max(1, sum_i m_i)``, m_i = [y_i != y_{i+B/2}] (the paper's
wording, "pairs of samples from different classes"). It is about twice the default on a batch
of many classes (a mean over B/2 pairs, not a sum over them divided by B).

Weight: L = CE + lambda * L_pc with lambda = ``lam_per_class`` * K. The authors recommend
lambda between 0.1 N and 0.2 N, N the number of classes (the repository's README: "The
optimal range of operation for pairwise loss is 0.1N to 0.2N"), at their scale, the default
above; the recommended ``lam_per_class`` = 0.1 is the low end of that range and the search
covers 0.02 to 0.5. With ``pairs="different"`` the same lambda weighs the term about twice as
much.

Under torch.distributed the logits and labels are all-gathered (autograd-aware), so the pairs
and the division by B are those of the global batch, as in one process on the concatenated
batch (:mod:`carrot.geometry.distributed`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from optuna.distributions import FloatDistribution
from torch import Tensor

from carrot.geometry.distributed import gather_rows, gather_rows_no_grad
from carrot.variants import register_variant
from carrot.variants.base import BaseHparams, StepBatch, Variant

PAIRS = ("all", "different")


def pairwise_confusion_loss(logits: Tensor, y: Tensor, pairs: str = "all") -> tuple[Tensor, dict[str, Tensor]]:
    """Euclidean distance between the softmax outputs of half-batch pairs (i, i + B/2).

    With h = floor(B / 2) and d_i = ||p_i - p_{i+h}||_2 for i < h:

    - ``pairs="all"`` (the authors' code): ``L = sum_i d_i / (2 h)``, every pair counted;
    - ``pairs="different"``: ``L = sum_i m_i d_i / max(1, sum_i m_i)``, m_i = [y_i != y_{i+h}].

    An odd batch drops its last sample. The distance has a zero (not NaN) gradient where
    p_i = p_{i+h}.

    Args:
        logits: (B, K) any float dtype (computed in float32).
        y: (B,) int labels.
    Returns:
        loss: 0-dim float32 (0 when no pair counts, still in the graph).
        stats: ``pairs`` (number of counted pairs), ``distance_mean`` (the mean distance d_i
        over the counted pairs, detached: twice the loss for ``"all"``, which divides by 2h;
        NaN when no pair counts).
    """
    if pairs not in PAIRS:
        raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
    half = logits.shape[0] // 2
    p = F.softmax(logits.float(), dim=1)  # (B, K)
    p_a, p_b = p[:half], p[half:2 * half]  # (h, K) each
    sq = ((p_a - p_b) ** 2).sum(1)  # (h,)
    # sqrt'(0) is infinite; route zero distances through a constant so the gradient is 0.
    positive = sq > 0
    dist = torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))
    if pairs == "all":
        count = torch.full((), float(half), device=dist.device)
        loss = dist.sum() / max(1, 2 * half)
        mean = dist.detach().sum() / half if half else torch.full((), float("nan"), device=dist.device)
    else:
        differ = (y[:half] != y[half:2 * half]).float()  # (h,)
        count = differ.sum()
        loss = (dist * differ).sum() / count.clamp_min(1.0)
        mean = torch.where(count > 0, loss.detach(), torch.full_like(loss, float("nan")))
    return loss, {"pairs": count, "distance_mean": mean}


@dataclass
class PairwiseConfusionHparams(BaseHparams):
    lam_per_class: float = 0.1  # lambda = lam_per_class * K (the authors: 0.1 to 0.2 times K)
    pairs: str = "all"  # "all": the authors' sum over half-batch pairs / B; "different": masked mean

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam_per_class < 0:
            raise ValueError(f"lam_per_class must be >= 0, got {self.lam_per_class}")
        if self.pairs not in PAIRS:
            raise ValueError(f"pairs must be one of {PAIRS}, got {self.pairs!r}")


@register_variant
class PairwiseConfusion(Variant):
    """CE + (lam_per_class * K) * pairwise confusion of the half-batch pairs."""

    name = "pairwise_confusion"
    Hparams = PairwiseConfusionHparams
    # the comparator is searched at the authors' setting (pairs="all") over lambda only
    search_space = {"lam_per_class": FloatDistribution(0.02, 0.5, log=True)}
    statistics = ("pc_distance", "pairs", "lambda")
    maybe_undefined = ("pc_distance",)  # no pair counted (pairs="different", every pair one class)
    default_sampler = "random"
    hp: PairwiseConfusionHparams

    def compute(self, batch: StepBatch, ce: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        lam = self.hp.lam_per_class * batch.logits.shape[1]
        # the pairs of the global batch under torch.distributed (this batch's otherwise)
        logits, labels = gather_rows(batch.logits), gather_rows_no_grad(batch.labels)
        loss, stats = pairwise_confusion_loss(logits, labels, self.hp.pairs)
        return {"pc": lam * loss}, {
            "pc_distance": stats["distance_mean"],
            "pairs": stats["pairs"],
            "lambda": torch.full((), lam, device=loss.device),  # a fill, not a host copy
        }
