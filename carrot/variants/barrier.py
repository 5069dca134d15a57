"""``barrier`` (seed 004): variance barrier + effective-rank barrier.

Log barriers that blow up as a class collapses, either in spread (its within-class scatter
shrinking relative to the whole batch's) or in dimension (its covariance spectrum
concentrating on few directions):

    R_var  = mean_c -log(S_c / S_bar),   R_rank = mean_c -log(erank_c / D),
    L = CE + w (R_var + R_rank)          (parameter-free: w = 1, both on).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from carrot.geometry import class_effective_rank, class_moments, class_slots, compact_slots
from carrot.space import Categorical, Float
from carrot.variants import register_variant
from carrot.variants.base import BaseHparams, StepBatch, Variant


def barrier_terms(z: Tensor, y: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Variance and effective-rank barriers of a batch, batched over classes.

    S_bar = mean_i ||z_i - zbar||^2 (trace of the batch covariance, floored at eps); for
    every class c with n_c >= 2: S_c = mean_{i in c} ||z_i - mu_c||^2,
    r_c = max(S_c / S_bar, eps), erank_c = exp(H(p)) with p the normalised eigenvalues of
    the class covariance (from masked per-class Gram matrices, one batched ``eigvalsh``).

        R_var = mean_c -log r_c,   R_rank = mean_c -log(max(erank_c / D, eps))

    Both are 0 (with finite, zero gradients) when no class has two samples. No host sync
    apart from the one inside the single batched ``eigvalsh`` (PyTorch's error check).

    Args:
        z: (B, D) embeddings (computed in float32); y: (B,) labels.
    Returns:
        r_var, r_rank (0-dim float32) and stats: ``r_var``, ``r_rank``, ``min_r``,
        ``min_erank_ratio`` (min erank_c / D; both 1 when no class qualifies),
        ``classes_used``, and per-slot ``r`` / ``erank`` with ``used`` mask (S,).
    """
    z = z.float()
    b, d = z.shape
    inv, counts, _ = class_slots(y)
    _, var, _ = class_moments(z, inv, b)  # (S, D)
    scatter_c = var.sum(-1)  # (S,) S_c
    scatter_all = ((z - z.mean(0, keepdim=True)) ** 2).sum(-1).mean().clamp_min(eps)  # S_bar
    ratio = (scatter_c / scatter_all).clamp_min(eps)  # (S,) r_c

    used = counts >= 2  # (S,)
    n_used = used.sum()
    w = used.float()
    denom = n_used.clamp_min(1).float()
    r_var = (-torch.log(ratio) * w).sum() / denom

    # At most B // 2 classes have two samples: only that many Gram matrices are needed.
    n_slots = max(1, b // 2)
    compact = compact_slots(used)  # (S,) index among used classes, -1 otherwise
    erank_used = class_effective_rank(z, inv, compact[inv], n_slots)  # (B//2,)
    in_use = torch.arange(n_slots, device=z.device) < n_used  # (B//2,)
    erank_ratio = (erank_used / d).clamp_min(eps)
    r_rank = (-torch.log(erank_ratio) * in_use.float()).sum() / denom

    with torch.no_grad():
        one = torch.ones((), device=z.device)
        min_r = torch.where(used, ratio, torch.full_like(ratio, float("inf"))).min()
        min_er = torch.where(in_use, erank_ratio, torch.full_like(erank_ratio, float("inf"))).min()
        erank_slot = torch.ones_like(ratio)
        erank_slot = torch.where(used, erank_used.detach()[compact.clamp_min(0)], erank_slot)
        stats = {
            "r_var": r_var.detach(),
            "r_rank": r_rank.detach(),
            "min_r": torch.where(n_used > 0, min_r, one),
            "min_erank_ratio": torch.where(n_used > 0, min_er, one),
            "classes_used": n_used.float(),
            "r": ratio.detach(),
            "erank": erank_slot,
            "used": used,
        }
    return r_var, r_rank, stats


@dataclass
class BarrierHparams(BaseHparams):
    use_var: bool = True  # add the variance barrier R_var
    use_rank: bool = True  # add the effective-rank barrier R_rank
    weight: float = 1.0  # multiplies each barrier (1 = the parameter-free method)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")


@register_variant
class Barrier(Variant):
    """CE + weight * (R_var + R_rank) on the pooled embedding."""

    name = "barrier"
    Hparams = BarrierHparams
    search_space = {
        "use_var": Categorical([True, False]),
        "use_rank": Categorical([True, False]),
        "weight": Float(0.01, 10.0, log=True),
    }
    statistics = ("r_var", "r_rank", "min_r", "min_erank_ratio", "classes_used")
    default_sampler = "pk"
    hp: BarrierHparams

    def compute(self, batch: StepBatch, ce: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        hp = self.hp
        r_var, r_rank, st = barrier_terms(batch.embedding, batch.labels)
        terms: dict[str, Tensor] = {}
        if hp.use_var:
            terms["r_var"] = hp.weight * r_var
        if hp.use_rank:
            terms["r_rank"] = hp.weight * r_rank
        return terms, {k: st[k] for k in self.statistics}
