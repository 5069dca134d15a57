"""Shared batch geometry: class slots, per-class moments, Bhattacharyya, effective rank.

Written once and used by the variants (inside a training step) and by the validation
diagnostics. Everything here is sync-free on CUDA: no ``torch.unique``, no boolean
indexing with data-dependent shapes, no ``.item()`` / ``.cpu()``. The one exception is
``torch.linalg.eigh`` in the effective ranks: PyTorch checks the solver's error codes on
the host, one synchronisation per call (there is no ``eigh_ex``); the per-class version
makes one call per step, for all classes at once (one B x B block-diagonal matrix).
Classes present in a batch are compacted into ``B`` fixed *slots* (``B = len(y)``),
unused slots have count 0 and are masked out downstream, so every shape depends on ``B``
only.

All statistics are computed in float32 whatever the input dtype (inputs are cast inside,
and the matrix products run with autocast off, so bf16 autocast does not round them).

>>> import torch
>>> y = torch.tensor([7, 3, 7, 3, 5])
>>> inv, counts, labels = class_slots(y)
>>> inv.tolist(), counts.tolist(), labels[:3].tolist()
([2, 0, 2, 0, 1], [2.0, 1.0, 2.0, 0.0, 0.0], [3, 5, 7])
"""
from __future__ import annotations

from typing import Sequence

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


def no_autocast(t: Tensor):
    """Context that turns autocast off on ``t``'s device: statistics stay float32 (SPEC)."""
    return torch.autocast(t.device.type, enabled=False)


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
    with no_autocast(a):
        inner = a @ a.T  # (N, N)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * inner).clamp_min(0.0)  # (N, N)
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


def _column_block_sum(t: Tensor, widths: tuple[int, ...]) -> Tensor:
    """(N, sum(widths)) -> (N, L): the sum over each block of columns."""
    if len(widths) == 1:
        return t.sum(1, keepdim=True)
    return torch.stack([part.sum(1) for part in t.split(widths, 1)], 1)


def _column_block_expand(g: Tensor, widths: tuple[int, ...]) -> Tensor:
    """(N, L) -> (N, sum(widths)): column block l filled with g[:, l] (adjoint of the sum)."""
    n = g.shape[0]
    return torch.cat([g[:, k:k + 1].expand(n, w) for k, w in enumerate(widths)], 1)


class _SamplePairBhattacharyya(torch.autograd.Function):
    """D_B of class pairs straight from a batch's samples, with a hand-written backward.

    The maths is :func:`bhattacharyya_pairs` on the moments of :func:`class_moments`
    (two-pass, ``v = max(var, eps)``, ``vbar = (v_c + v_d) / 2 + eps``). Doing moments and
    pair terms in one function lets forward and backward work in place on a handful of
    (B, D), (C, D), (P, D) buffers, where autograd would keep and allocate one per op
    (on CPU each fresh MiB-sized buffer costs page faults, more than the arithmetic).
    Gradients, with ``r = (mu_c - mu_d) / vbar`` and ``n_c`` the class size:
    ``dD/dmu_c = r / 4``, ``dD/dvbar = 1 / (2 vbar) - r^2 / 8``, ``dD/dv_c = -1 / (4 v_c)``
    from the log-determinant, ``dvar_c / dx_i = 2 (x_i - mu_c) / n_c``,
    ``dmu_c / dx_i = 1 / n_c``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, klass: Tensor, pairs: Tensor, num_classes: int, widths: tuple[int, ...],
                eps: float) -> Tensor:
        d = x.shape[1]
        inv_n = 1.0 / torch.zeros(num_classes, dtype=x.dtype, device=x.device).index_add_(
            0, klass, torch.ones_like(klass, dtype=x.dtype)).clamp_min(1.0)  # (C,)
        mu = torch.zeros(num_classes, d, dtype=x.dtype, device=x.device).index_add_(0, klass, x)
        mu.mul_(inv_n[:, None])  # (C, D)
        dev = mu.index_select(0, klass).neg_().add_(x)  # (B, D) x_i - mu_{c(i)}, one buffer
        var = torch.zeros_like(mu).index_add_(0, klass, dev * dev).mul_(inv_n[:, None])  # (C, D)
        keep = var >= eps  # where the clamp passes the gradient
        v = var.clamp_min_(eps)
        log_det = _column_block_sum(torch.log(v), widths)  # (C, L)

        classes = torch.arange(num_classes, device=x.device)
        pick_i = (pairs[0][:, None] == classes).to(x.dtype)  # (P, C)
        pick_j = (pairs[1][:, None] == classes).to(x.dtype)
        diff = (pick_i - pick_j) @ mu  # (P, D)
        vbar = (0.5 * (pick_i + pick_j)) @ v  # (P, D)
        vbar.add_(eps)
        terms = torch.log(vbar)
        ratio = diff / vbar  # (P, D) r
        terms.addcmul_(diff, ratio, value=0.25)  # log vbar + (mu_c - mu_d)^2 / (4 vbar)
        distance = 0.5 * _column_block_sum(terms, widths) - 0.25 * ((pick_i + pick_j) @ log_det)  # (P, L)
        ctx.save_for_backward(dev, klass, inv_n, keep, v, vbar, ratio, pick_i, pick_j)
        ctx.widths = widths
        return distance

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        dev, klass, inv_n, keep, v, vbar, ratio, pick_i, pick_j = ctx.saved_tensors
        widths = ctx.widths
        g_terms = _column_block_expand(0.5 * grad, widths)  # (P, D)
        g_vbar = torch.reciprocal(vbar).addcmul_(ratio, ratio, value=-0.25).mul_(g_terms)  # (P, D)
        g_diff = g_terms.mul_(ratio).mul_(0.5)  # (P, D)
        g_mu = (pick_i - pick_j).T @ g_diff  # (C, D)
        g_v = (0.5 * (pick_i + pick_j)).T @ g_vbar  # (C, D)
        g_log_det = -0.25 * ((pick_i + pick_j).T @ grad)  # (C, L)
        g_v.addcdiv_(_column_block_expand(g_log_det, widths), v).mul_(keep)  # (C, D) d/dvar
        g_x = g_v.mul_(inv_n[:, None]).index_select(0, klass).mul_(dev).mul_(2.0)  # (B, D)
        g_x.add_(g_mu.mul_(inv_n[:, None]).index_select(0, klass))
        return g_x, None, None, None, None, None


def sample_pair_bhattacharyya(
    x: Tensor, klass: Tensor, num_classes: int, pairs: Tensor, widths: Sequence[int] | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Bhattacharyya distance between the diagonal Gaussians of class pairs of a batch.

    The same numbers as :func:`class_moments` + :func:`bhattacharyya_pairs`, in one pass
    with a hand-written backward (:class:`_SamplePairBhattacharyya`), for the training step.

    Args:
        x: (B, D) samples, cast to float32 (autocast off). Several layers can share one call:
            concatenate their features along dim 1 and pass their ``widths``; the distance is
            then computed per block of columns.
        klass: (B,) int64 class of each sample in ``[0, num_classes)``.
        pairs: (2, P) int64 classes (c, d) of each pair.
        widths: column widths of the blocks (default: one block of D).
    Returns:
        (P, L) float32 D_B per pair and block.
    """
    with no_autocast(x):
        x = x.float()
        widths = tuple(int(w) for w in widths) if widths is not None else (x.shape[1],)
        assert sum(widths) == x.shape[1], f"widths {widths} do not add up to D = {x.shape[1]}"
        return _SamplePairBhattacharyya.apply(x, klass, pairs, num_classes, widths, eps)


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
    with no_autocast(x):
        x = x.float()
        if center:
            x = x - x.mean(0, keepdim=True)
        gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x  # (min(n,D), min(n,D))
        lam = torch.linalg.eigvalsh(gram)
        return _entropy_rank(lam)


def class_centring_operator(inv: Tensor, counts: Tensor, rows: Tensor) -> Tensor:
    """(R, B) float32 matrix ``C`` with ``(C @ x)_p = x_{rows_p} - mu_{inv[rows_p]}``.

    ``C[p, i] = [i = rows_p] - [inv_i = inv_{rows_p}] / n_{inv[rows_p]}``: one matrix
    product centres every sample on its class mean (and reorders the rows, e.g. into class
    blocks with ``rows`` the samples sorted by class); its backward is one more product.
    """
    b = inv.shape[0]
    ids = torch.arange(b, device=inv.device)
    row_slot = inv[rows]  # (R,)
    pick = (rows[:, None] == ids[None, :]).float()  # (R, B)
    same = (row_slot[:, None] == inv[None, :]).float()  # (R, B)
    return pick - same / counts[row_slot].clamp_min(1.0)[:, None]


def symmetric_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a small symmetric matrix, ``torch.linalg.eigh``.

    The one place the spectral code calls the solver (and, on CUDA, the one host sync of
    the error check), so a different solver path is a one-line change.
    """
    return torch.linalg.eigh(gram)


class BlockSpectrum:
    """The block-diagonal within-class Gram of a batch and its spectrum, in pieces.

    ``G = (C x)(C x)^T`` restricted to its diagonal blocks, ``C`` the centring operator
    with rows in block order (:func:`class_centring_operator`), so ``G`` is block diagonal
    with contiguous blocks. ONE ``eigh`` of ``G`` serves every block: any matrix function
    of a block-diagonal matrix is block diagonal, so with ``G = V diag(lam) V^T``

        tr f(G_s) = sum_k mass_sk f(lam_k),   mass_sk = sum_{i in s} V_ik^2,

    exact for any orthonormal eigenbasis, also when blocks share eigenvalues. Here
    ``f(lam) = max(lam, 0) log max(lam, floor)`` (``xlogx``), plus the traces ``T_s`` and
    the batch scatter ``||x - mean(x)||_F^2`` (``total``).

    :meth:`backward` is the analytic derivative: ``d tr f(G_s) / dG = f'(G)`` on block s
    (``f'(G) = V diag(f'(lam)) V^T``, no ``1 / (lam_i - lam_j)`` eigenvector terms, so it
    is finite on repeated eigenvalues), the identity on the diagonal for the trace, and
    with ``dL/dG = Gg`` (symmetric) ``dL/dx = 2 C^T Gg C x``: every term folds into one
    B x B matrix, so backward costs one (B, B) @ (B, D) product. The pieces are used inside
    ``torch.autograd.Function`` s (no autograd graph of their own); the work before the
    ``eigh`` (:meth:`__init__`) is split from the spectrum (:meth:`xlogx`), so a caller can
    queue everything that does not need the eigenvalues before the solver's host sync.
    """

    def __init__(self, x: Tensor, centre: Tensor, block: Tensor, num_blocks: int) -> None:
        # x is kept for backward as is (not via save_for_backward): it must not be modified in place.
        self.x, self.centre, self.block = x, centre, block
        ok = block >= 0
        self.same = ((block[:, None] == block[None, :]) & ok[:, None]).to(x.dtype)  # (B, B) block mask
        self.member = (block[None, :] == torch.arange(num_blocks, device=x.device)[:, None]).to(x.dtype)  # (S, B)
        xc = centre @ x  # (B, D) class-centred, block order
        self.gram = (xc @ xc.T) * self.same  # (B, B)
        self.trace = self.member @ torch.diagonal(self.gram)  # (S,)
        xb = (x - x.mean(0, keepdim=True)).reshape(-1)
        self.total = torch.dot(xb, xb)  # no (B, D) square

    def xlogx(self) -> Tensor:
        """(S,) ``tr(G_s log G_s)``, eigenvalues clamped >= 0; the ``eigh`` (host sync on CUDA)."""
        self.lam, self.vec = symmetric_eigh(self.gram)  # (B,), (B, B)
        pos = self.lam.clamp_min(0.0)
        log_pos = torch.log(pos.clamp_min(_P_FLOOR))
        # f'(lam) for backward: log lam + 1, 0 for lam <= 0 (the clamp). Between 0 and the
        # floor (1e-30, round-off of a zero eigenvalue) the exact derivative is log(floor).
        self.dphi = (log_pos + 1.0) * (self.lam > 0)
        return self.member @ ((self.vec * self.vec) @ (pos * log_pos))

    def for_backward(self) -> "BlockSpectrum":
        """Drop what backward does not need (the outputs: a ctx holding its own outputs is a
        reference cycle) and return self, to keep on the autograd ctx."""
        self.gram = self.trace = self.total = None
        return self

    def operator(self, g_trace: Tensor, g_xlogx: Tensor | None = None, g_total: Tensor | None = None) -> Tensor:
        """(B, B) ``M`` with ``dL/dx = M @ x`` for dL/dtrace (S,), dL/dxlogx (S,), dL/dtotal (0-dim).

        ``M = 2 C^T Gg C + 2 g_total (I - 11^T / B)``, ``Gg = dL/dG`` (symmetric); without
        ``g_xlogx`` it needs no eigenvalues (so it can be built before the ``eigh``).
        """
        centre, b = self.centre, self.centre.shape[0]
        grad_gram = torch.diag(g_trace @ self.member)  # (B, B) trace: identity on each block's diagonal
        if g_xlogx is not None:
            fprime = (self.vec * self.dphi) @ self.vec.T  # (B, B) f'(G)
            grad_gram = grad_gram + fprime * self.same * (g_xlogx @ self.member)[:, None]
        op = centre.T @ (2.0 * grad_gram) @ centre
        if g_total is not None:
            eye = torch.eye(b, dtype=centre.dtype, device=centre.device)
            op = op + (2.0 * g_total) * (eye - 1.0 / b)
        return op

    def backward(self, g_trace: Tensor, g_xlogx: Tensor, g_total: Tensor) -> Tensor:
        """dL/dx (B, D) from dL/dtrace (S,), dL/dxlogx (S,) and dL/dtotal (0-dim)."""
        return self.operator(g_trace, g_xlogx, g_total) @ self.x


def block_spectrum(x: Tensor, inv: Tensor, blocks: Tensor, num_blocks: int) -> BlockSpectrum:
    """:class:`BlockSpectrum` of ``x`` (B, D) centred on its classes ``inv``, rows grouped by ``blocks``.

    ``blocks`` (B,) int64 in ``[0, num_blocks)`` or -1 to leave a sample out. Computed in
    ``x``'s dtype (cast to float32 first for SPEC) with no autograd graph: call it inside a
    ``torch.autograd.Function``.
    """
    b = x.shape[0]
    counts = torch.zeros(b, dtype=x.dtype, device=x.device).index_add_(
        0, inv, torch.ones(b, dtype=x.dtype, device=x.device))
    order = torch.sort(blocks, stable=True).indices  # (B,) rows in block order: contiguous blocks
    centre = class_centring_operator(inv, counts, order).to(x.dtype)  # (B, B)
    return BlockSpectrum(x, centre, blocks[order], num_blocks)


class _WithinClassSpectrum(torch.autograd.Function):
    """(trace, xlogx, total) of :class:`BlockSpectrum` with its analytic backward."""

    @staticmethod
    def forward(ctx, x: Tensor, inv: Tensor, blocks: Tensor, num_blocks: int):
        spec = block_spectrum(x, inv, blocks, num_blocks)
        outputs = spec.trace, spec.xlogx(), spec.total
        ctx.spec = spec.for_backward()
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_trace: Tensor, g_xlogx: Tensor, g_total: Tensor):
        return ctx.spec.backward(g_trace, g_xlogx, g_total), None, None, None


def within_class_spectrum(x: Tensor, inv: Tensor, blocks: Tensor, num_blocks: int) -> tuple[Tensor, Tensor, Tensor]:
    """Spectral statistics of the classes of a batch from one B x B eigendecomposition.

    Args:
        x: (B, D) samples (computed in their own dtype: cast to float32 first for SPEC);
        inv: (B,) class slot of each sample, for centring on its class mean;
        blocks: (B,) int64 in ``[0, num_blocks)``, the block a sample's centred row enters, or -1
            to leave it out (``inv`` itself, or a renumbering such as ``compact_slots``).
    Returns:
        trace (num_blocks,): ``T_s = sum_{i in s} ||x_i - mu_{inv_i}||^2``;
        xlogx (num_blocks,): ``tr(G_s log G_s)`` of the block's Gram ``G_s`` (eigenvalues
            clamped >= 0), so the spectral entropy is :func:`spectral_entropy`;
        total (0-dim): ``sum_i ||x_i - mean(x)||^2``.
    One ``eigh`` (one host sync on CUDA, PyTorch's error check) whatever the number of
    classes; gradients from :meth:`BlockSpectrum.backward`.
    """
    return _WithinClassSpectrum.apply(x, inv, blocks, num_blocks)


def spectral_entropy(trace: Tensor, xlogx: Tensor) -> Tensor:
    """``H = -sum_k p_k log p_k`` with ``p = lam / T`` from ``T = sum lam``, ``xlogx = sum lam log lam``.

    ``H = log T - xlogx / T``; 0 (zero gradient) where ``T`` is 0: a one-sample class or
    identical samples have erank ``exp(0) = 1``.
    """
    spread = trace > torch.finfo(trace.dtype).tiny
    safe = torch.where(spread, trace, torch.ones_like(trace))
    return torch.where(spread, torch.log(safe) - xlogx / safe, torch.zeros_like(trace))


def class_effective_rank(x: Tensor, inv: Tensor, slots: Tensor, num_slots: int) -> Tensor:
    """Effective rank of every slot's class covariance, batched (no per-class loop).

    Each sample is centred on its class mean (``inv``); the centred samples of slot ``s``
    form one diagonal block of the (B, B) within-class Gram matrix, whose non-zero
    eigenvalues are ``n_s`` times those of the class covariance (the factor cancels in
    ``p``). One ``eigh`` of that block-diagonal matrix gives every slot's spectral entropy
    (:func:`within_class_spectrum`); ``erank = exp(H)``.

    Args:
        x: (B, D) samples; inv: (B,) class slot of each sample (for centring).
        slots: (B,) int64 slot in ``[0, num_slots)`` whose Gram a sample enters, or -1 to
            leave it out (lets callers keep only classes with >= 2 samples in fewer slots).
    Returns:
        (num_slots,) float32 erank; 1 for a slot with fewer than two distinct samples.
    """
    with no_autocast(x):
        trace, xlogx, _ = within_class_spectrum(x.float(), inv, slots, num_slots)
        return torch.exp(spectral_entropy(trace, xlogx))


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
    "bhattacharyya_diag", "bhattacharyya_pairs", "class_centring_operator",
    "class_effective_rank", "class_means", "class_moments", "class_slots", "compact_slots", "effective_rank",
    "no_autocast", "pairwise_distance", "rms_radius", "sample_pair_bhattacharyya", "soft_confusion",
    "spectral_entropy", "symmetric_eigh", "BlockSpectrum", "block_spectrum",
    "within_class_spectrum",
]

