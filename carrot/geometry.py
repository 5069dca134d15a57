"""Shared batch geometry: class slots, per-class moments, Bhattacharyya, effective rank.

Written once and used by the variants (inside a training step) and by the validation
diagnostics. Everything here is sync-free on CUDA: no ``torch.unique``, no boolean
indexing with data-dependent shapes, no ``.item()`` / ``.cpu()``. The one exception is
``torch.linalg.eigvalsh`` in the effective ranks: PyTorch checks its solver's error codes
on the host, one synchronisation per call (there is no ``eigh_ex``); the per-class version
makes that one batched call per step. Classes present in a
batch are compacted into ``B`` fixed *slots* (``B = len(y)``), unused slots have count 0
and are masked out downstream, so every shape depends on ``B`` only.

All statistics are computed in float32 whatever the input dtype (inputs are cast inside).

>>> import torch
>>> y = torch.tensor([7, 3, 7, 3, 5])
>>> inv, counts, labels = class_slots(y)
>>> inv.tolist(), counts.tolist(), labels[:3].tolist()
([2, 0, 2, 0, 1], [2.0, 1.0, 2.0, 0.0, 0.0], [3, 5, 7])
"""
from __future__ import annotations

import torch
from torch import Tensor

# Elements of one (rows, K, D) block in bhattacharyya_diag: 2**24 float32 = 64 MiB.
_PAIR_BLOCK_ELEMENTS = 1 << 24
# Floor for probabilities inside p log p, so d/dp = log p + 1 stays finite at p = 0.
_P_FLOOR = 1e-30


# --------------------------------------------------------------------------- slots
def class_slots(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Compact the labels of a batch into ``B = len(y)`` slots without a host sync.

    Labels are sorted, a new slot starts wherever the sorted label changes, and the slot
    index is the cumulative sum of those changes. Slots follow ascending label order and
    the ``C`` present classes occupy slots ``0 .. C-1``.

    Returns:
        inv: (B,) int64, slot of each sample, in [0, C).
        counts: (B,) float32, samples per slot (0 for unused slots ``>= C``).
        labels_of_slot: (B,) int64, the label owning each slot (meaningful where counts > 0,
            0 elsewhere).
    """
    y = y.reshape(-1).long()
    b = y.shape[0]
    sorted_y, order = torch.sort(y)  # (B,), (B,)
    change = torch.ones_like(sorted_y)  # (B,) 1 where a new class starts in sorted order
    if b > 1:
        change[1:] = (sorted_y[1:] != sorted_y[:-1]).long()
    slot_sorted = torch.cumsum(change, 0) - 1  # (B,)
    inv = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)  # (B,)
    counts = torch.zeros(b, dtype=torch.float32, device=y.device)
    counts.index_add_(0, inv, torch.ones(b, dtype=torch.float32, device=y.device))
    # Every write into a slot carries the same label, so duplicate indices are harmless.
    labels_of_slot = torch.zeros_like(sorted_y).scatter_(0, slot_sorted, sorted_y)  # (B,)
    return inv, counts, labels_of_slot


# ------------------------------------------------------------------------- moments
def class_means(x: Tensor, inv: Tensor, num_slots: int) -> tuple[Tensor, Tensor]:
    """Per-slot means ``mu_s = (1/n_s) sum_{i: inv_i = s} x_i`` in float32.

    Returns ``(means (S, D), counts (S,))``; empty slots have mean 0 and count 0.
    """
    x = x.float()
    counts = torch.zeros(num_slots, dtype=torch.float32, device=x.device)
    counts.index_add_(0, inv, torch.ones_like(inv, dtype=torch.float32))
    sums = torch.zeros(num_slots, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, inv, x)  # (S, D)
    return sums / counts.clamp_min(1.0)[:, None], counts


def class_moments(x: Tensor, inv: Tensor, num_slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-slot mean and biased diagonal variance in float32.

    ``var_sj = (1/n_s) sum_{i in s} (x_ij - mu_sj)^2`` (two-pass: deviations from the mean,
    not E[x^2] - mu^2, so no cancellation). A slot with one sample has variance 0; an
    empty slot has mean 0, variance 0 and count 0.

    Returns ``(means (S, D), var (S, D), counts (S,))``.
    """
    x = x.float()
    means, counts = class_means(x, inv, num_slots)
    dev = x - means[inv]  # (B, D)
    sq = torch.zeros_like(means).index_add_(0, inv, dev * dev)  # (S, D)
    return means, sq / counts.clamp_min(1.0)[:, None], counts


def rms_radius(var: Tensor) -> Tensor:
    """RMS radius ``r_s = sqrt(mean_i ||x_i - mu_s||^2) = sqrt(sum_j var_sj)``, (S,) float32.

    The sum is floored at 1e-30 inside the sqrt so a zero-spread class has a finite (zero)
    gradient instead of ``inf * 0 = nan``.
    """
    return torch.sqrt(var.float().sum(-1).clamp_min(_P_FLOOR))


def pairwise_distance(a: Tensor) -> Tensor:
    """Euclidean distances ``||a_i - a_j||`` (N, N) float32, finite gradient at 0.

    Uses ``||a_i||^2 + ||a_j||^2 - 2 a_i.a_j`` (no (N, N, D) tensor), clamped >= 0 against
    round-off; the diagonal is exactly 0.
    """
    a = a.float()
    sq = (a * a).sum(-1)  # (N,)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (a @ a.T)).clamp_min(0.0)  # (N, N)
    d2 = d2 * (1.0 - torch.eye(a.shape[0], dtype=d2.dtype, device=d2.device))
    return torch.sqrt(d2.clamp_min(_P_FLOOR)) * (d2 > 0)


def compact_slots(keep: Tensor) -> Tensor:
    """Renumber the slots where ``keep`` is true as 0, 1, ... in order; others get -1.

    ``keep`` (S,) bool, e.g. ``counts >= 2``. Sync-free (a cumulative sum), so a caller
    that knows an upper bound on the kept slots (``B // 2`` classes can have two samples)
    can work on that many slots instead of ``B``.
    """
    k = keep.long()
    return torch.where(keep, torch.cumsum(k, 0) - 1, torch.full_like(k, -1))


# ------------------------------------------------------------------ Bhattacharyya
def bhattacharyya_pairs(
    mu: Tensor, var: Tensor, i: Tensor, j: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Bhattacharyya distance and coefficient of diagonal Gaussians for index pairs (i, j).

    With ``v = max(var, eps)`` (the clamp keeps ``log v`` finite for a dimension with no
    spread) and ``vbar = (v_i + v_j) / 2 + eps``:

        D_B = 1/8 sum_k (mu_ik - mu_jk)^2 / vbar_k
              + 1/2 [ sum_k log vbar_k - 1/2 (sum_k log v_ik + sum_k log v_jk) ]
        rho = exp(-D_B)

    Args:
        mu, var: (K, D) means and diagonal variances (cast to float32).
        i, j: (P,) int64 indices into the K rows.
    Returns:
        distance (P,), coefficient (P,), float32.
    """
    mu, v = mu.float(), var.float().clamp_min(eps)
    log_det = torch.log(v).sum(-1)  # (K,) sum_k log v_k
    diff = mu[i] - mu[j]  # (P, D)
    vbar = 0.5 * (v[i] + v[j]) + eps  # (P, D)
    mahal = 0.125 * (diff * diff / vbar).sum(-1)  # (P,)
    log_term = 0.5 * (torch.log(vbar).sum(-1) - 0.5 * (log_det[i] + log_det[j]))  # (P,)
    distance = mahal + log_term
    return distance, torch.exp(-distance)


def bhattacharyya_diag(mu: Tensor, var: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """All-pairs Bhattacharyya distance and coefficient, both (K, K) float32.

    Same formula and the same ``eps`` handling as :func:`bhattacharyya_pairs` (variances
    clamped ``>= eps`` before the log, ``vbar = (v_c + v_d)/2 + eps``). Rows are processed
    in blocks so that no more than ~2**24 elements of a (rows, K, D) tensor exist at once
    (K=200, D=2048 goes in blocks of 40 rows). Under autograd every block's intermediates
    are still kept for backward; inside a training step select pairs first and call
    :func:`bhattacharyya_pairs`.
    """
    mu, v = mu.float(), var.float().clamp_min(eps)
    k, d = mu.shape
    log_det = torch.log(v).sum(-1)  # (K,)
    rows = max(1, _PAIR_BLOCK_ELEMENTS // max(1, k * d))
    blocks = []
    for start in range(0, k, rows):
        stop = min(k, start + rows)
        diff = mu[start:stop, None, :] - mu[None, :, :]  # (r, K, D)
        vbar = 0.5 * (v[start:stop, None, :] + v[None, :, :]) + eps  # (r, K, D)
        mahal = 0.125 * (diff * diff / vbar).sum(-1)  # (r, K)
        log_term = 0.5 * (torch.log(vbar).sum(-1) - 0.5 * (log_det[start:stop, None] + log_det[None, :]))
        blocks.append(mahal + log_term)
    distance = torch.cat(blocks, 0) if blocks else mu.new_zeros(0, 0)  # (K, K)
    return distance, torch.exp(-distance)


# ------------------------------------------------------------------ effective rank
def _entropy_rank(lam: Tensor) -> Tensor:
    """``exp(-sum p log p)`` with ``p = lam / sum lam`` over the last dim; lam >= 0.

    An all-zero spectrum gives erank 1. ``p`` is floored inside the log only, so the
    gradient stays finite at zero eigenvalues.
    """
    lam = lam.clamp_min(0.0)
    total = lam.sum(-1, keepdim=True)
    p = lam / total.clamp_min(torch.finfo(lam.dtype).tiny)
    entropy = -(p * torch.log(p.clamp_min(_P_FLOOR))).sum(-1)
    return torch.exp(entropy)


def effective_rank(x: Tensor, center: bool = False) -> Tensor:
    """Effective rank of the covariance of a centred (n, D) matrix, a float32 scalar.

    ``erank = exp(H(p))``, ``p_k = lam_k / sum lam``, ``lam`` the eigenvalues of
    ``X^T X / n`` (the normalisation cancels in p). The eigenvalues come from the smaller
    of the n x n Gram ``X X^T`` and the D x D scatter ``X^T X`` (same non-zero spectrum).
    A matrix with r equal non-zero singular values has erank exactly r; a zero matrix has
    erank 1. The input is assumed centred; ``center=True`` subtracts the column means.
    """
    x = x.float()
    if center:
        x = x - x.mean(0, keepdim=True)
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x  # (min(n,D), min(n,D))
    lam = torch.linalg.eigvalsh(gram)
    return _entropy_rank(lam)


def class_effective_rank(x: Tensor, inv: Tensor, slots: Tensor, num_slots: int) -> Tensor:
    """Effective rank of every slot's class covariance, batched (no per-class loop).

    Each sample is centred on its class mean; slot ``s`` gets the masked Gram matrix
    ``G_s = (m_s m_s^T) * (X_c X_c^T)`` (B, B), with ``m_s`` the indicator of its samples,
    whose non-zero eigenvalues are ``n_s`` times those of the class covariance. Batched
    ``eigvalsh`` over (S, B, B), eigenvalues clamped >= 0, then :func:`_entropy_rank`.

    Args:
        x: (B, D) samples; inv: (B,) class slot of each sample (for centring).
        slots: (B,) int64 slot in ``[0, num_slots)`` whose Gram a sample enters, or -1 to
            leave it out (lets callers keep only classes with >= 2 samples in fewer slots).
    Returns:
        (num_slots,) float32 erank; 1 for a slot with fewer than two distinct samples.
    """
    x = x.float()
    means, _ = class_means(x, inv, int(inv.shape[0]))
    xc = x - means[inv]  # (B, D) class-centred
    gram = xc @ xc.T  # (B, B)
    ids = torch.arange(num_slots, device=x.device)
    member = (slots[None, :] == ids[:, None]).float()  # (S, B)
    grams = gram[None] * member[:, :, None] * member[:, None, :]  # (S, B, B)
    lam = torch.linalg.eigvalsh(grams)  # (S, B)
    return _entropy_rank(lam)


# ------------------------------------------------------------------ soft confusion
def soft_confusion(probs: Tensor, inv: Tensor, counts: Tensor, labels_of_slot: Tensor) -> Tensor:
    """Symmetrised soft confusion among the classes present in a batch, (S, S) float32.

    ``a_st = (A_st + A_ts) / 2`` with ``A_st`` the mean, over the samples of slot s, of the
    softmax probability of slot t's label (probabilities over all K classes, not
    renormalised to the present ones). Rows/columns of empty slots and the diagonal are 0.
    No gradient flows (confusion is a measurement, not a target).

    Args:
        probs: (B, K) softmax probabilities; inv, counts, labels_of_slot from
            :func:`class_slots`.
    """
    with torch.no_grad():
        probs = probs.detach().float()
        s = counts.shape[0]
        present = (counts > 0).float()  # (S,)
        p_slot = probs[:, labels_of_slot] * present[None, :]  # (B, S)
        sums = torch.zeros(s, s, dtype=torch.float32, device=probs.device).index_add_(0, inv, p_slot)
        mean = sums / counts.clamp_min(1.0)[:, None]  # (S, S)
        a = 0.5 * (mean + mean.T)
        a = a * (1.0 - torch.eye(s, dtype=a.dtype, device=a.device))
        return a * present[:, None] * present[None, :]


__all__ = [
    "bhattacharyya_diag", "bhattacharyya_pairs", "class_effective_rank", "class_means",
    "class_moments", "class_slots", "compact_slots", "effective_rank", "pairwise_distance", "rms_radius",
    "soft_confusion",
]

