"""Soft confusion: how much probability the samples of one class put on another.

``A_st`` = the mean, over the samples of class s, of the softmax probability of class t
(:func:`carrot.geometry.class_means` of the probability rows); the pair weight is its
symmetric part with a zero diagonal (:func:`symmetric_confusion`). The ``bhattacharyya``
variant takes it among the classes of one batch (:func:`soft_confusion`); the ``prototype``
variant keeps an EMA of the rows ``A_s`` over steps and symmetrises that. A measurement,
not a target: no gradient flows.
"""
from __future__ import annotations

import torch
from torch import Tensor

from carrot.geometry.slots import class_means


def symmetric_confusion(a: Tensor) -> Tensor:
    """``omega = (A + A^T) / 2`` with a zero diagonal, (S, S)."""
    return (a + a.T).mul_(0.5).fill_diagonal_(0.0)


def soft_confusion(probs: Tensor, inv: Tensor, counts: Tensor, labels_of_slot: Tensor) -> Tensor:
    """Symmetrised soft confusion among the classes present in a batch, (S, S) float32.

    ``a_st = (A_st + A_ts) / 2`` with ``A_st`` the mean, over the samples of slot s, of the
    softmax probability of slot t's label (probabilities over all K classes, not
    renormalised to the present ones). Rows/columns of empty slots and the diagonal are 0.

    Args:
        probs: (B, K) softmax probabilities; inv, counts, labels_of_slot from
            :func:`carrot.geometry.class_slots`.
    """
    with torch.no_grad():
        s = counts.shape[0]
        present = (counts > 0).float()  # (S,)
        rows, _ = class_means(probs.detach(), inv, s)  # (S, K) A_s over all K classes
        a = symmetric_confusion(rows.index_select(1, labels_of_slot) * present[None, :])  # (S, S)
        return a * present[:, None] * present[None, :]
