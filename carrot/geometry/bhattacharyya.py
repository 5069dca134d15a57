"""Bhattacharyya distance and coefficient of diagonal Gaussians.

Three entry points for the same formula: :func:`bhattacharyya_pairs` for index pairs of
given moments (the diagnostics), :func:`bhattacharyya_diag` for all pairs (the functional
core), and :func:`sample_pair_bhattacharyya` straight from a batch's samples with a
hand-written backward (the ``bhattacharyya`` variant's training step). All float32
(:func:`sample_pair_bhattacharyya` keeps float64 input in float64, for exact tests).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import Tensor

from carrot.geometry.slots import no_autocast

# Elements of one (rows, K, D) block in bhattacharyya_diag: 2**24 float32 = 64 MiB.
_PAIR_BLOCK_ELEMENTS = 1 << 24


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
    diff = mu.index_select(0, i) - mu.index_select(0, j)  # (P, D)
    vbar = 0.5 * (v.index_select(0, i) + v.index_select(0, j)) + eps  # (P, D)
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


class _ColumnBlocks:
    """Consecutive blocks of columns of widths ``w_1 .. w_L``, seen as ``n`` equal chunks of ``g``
    columns (``g`` the widths' gcd, so each chunk lies in one block): a sum over each block is a
    sum within the chunks of a ``(N, n, g)`` view and an ``(n, L)`` 0/1 matrix product, and a
    per-block factor reaches the columns by broadcasting over that view. Three layers of 512,
    1,024 and 2,048 columns are 7 chunks of 512: one vectorised pass, where splitting into
    blocks and stacking is a handful of operations and a copy."""

    def __init__(self, widths: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> None:
        self.chunk = math.gcd(*widths)
        self.chunks = sum(widths) // self.chunk
        edges = [0]
        for w in widths:
            edges.append(edges[-1] + w // self.chunk)
        at = torch.arange(self.chunks, device=device)  # no tensor from Python data: no copy to a device
        self.member = torch.stack([(at >= a) & (at < b) for a, b in zip(edges, edges[1:])], 1).to(dtype)  # (n, L)

    def sum(self, t: Tensor) -> Tensor:
        """(N, D) -> (N, L): the sum over each block of columns."""
        return t.view(t.shape[0], self.chunks, self.chunk).sum(2) @ self.member

    def per_chunk(self, g: Tensor) -> Tensor:
        """(N, L) -> (N, n, 1): each chunk's block value, to broadcast over :meth:`chunked` views."""
        return (g @ self.member.T)[:, :, None]

    def chunked(self, t: Tensor) -> Tensor:
        """(N, D) -> its (N, n, g) view."""
        return t.view(t.shape[0], self.chunks, self.chunk)


@functools.lru_cache(maxsize=32)
def _column_blocks(widths: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> _ColumnBlocks:
    return _ColumnBlocks(widths, device, dtype)


class _SamplePairBhattacharyya(torch.autograd.Function):
    """D_B of class pairs straight from a batch's samples, with a hand-written backward.

    The maths is :func:`bhattacharyya_pairs` on the moments of :func:`class_moments`
    (two-pass, ``v = max(var, eps)``, ``vbar = (v_c + v_d) / 2 + eps``). Doing moments and
    pair terms in one function lets forward and backward work in place on a handful of
    (B, D), (C, D), (P, D) buffers, where autograd would keep and allocate one per op
    (on CPU each fresh MiB-sized buffer costs page faults, more than the arithmetic).
    Rows move between samples, classes and pairs by gathers (``index_select``) and scatters
    (``index_add_``), not by one-hot products: a (P, C) @ (C, D) product costs several
    gathers on CPU.
    Gradients, with ``r = (mu_c - mu_d) / vbar`` and ``n_c`` the class size:
    ``dD/dmu_c = r / 4``, ``dD/dvbar = 1 / (2 vbar) - r^2 / 8``, ``dD/dv_c = -1 / (4 v_c)``
    from the log-determinant, ``dvar_c / dx_i = 2 (x_i - mu_c) / n_c``,
    ``dmu_c / dx_i = 1 / n_c``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, klass: Tensor, pairs: Tensor, num_classes: int, widths: tuple[int, ...],
                eps: float) -> Tensor:
        d, p = x.shape[1], pairs.shape[1]
        inv_n = torch.zeros(num_classes, dtype=x.dtype, device=x.device).index_add_(
            0, klass, torch.ones_like(klass, dtype=x.dtype)).clamp_min_(1.0).reciprocal_()[:, None]  # (C, 1)
        mu = torch.zeros(num_classes, d, dtype=x.dtype, device=x.device).index_add_(0, klass, x).mul_(inv_n)  # (C, D)
        dev = torch.sub(x, mu.index_select(0, klass))  # (B, D) x_i - mu_{c(i)}
        var = torch.zeros_like(mu).index_add_(0, klass, dev * dev).mul_(inv_n)  # (C, D)
        keep = var >= eps  # where the clamp passes the gradient
        v = var.clamp_min_(eps)
        blocks = _column_blocks(widths, x.device, x.dtype)
        log_det = blocks.sum(torch.log(v))  # (C, L)

        ends = pairs.reshape(-1)  # (2P,) the c of every pair, then the d of every pair
        # Two (2P, D) buffers hold every pair-sized intermediate: a half is reused once it is dead.
        ends_mu = mu.index_select(0, ends)  # (2P, D)
        diff = ends_mu[:p].sub_(ends_mu[p:])  # (P, D) mu_c - mu_d
        # (v + eps) / 2 per class, so that vbar = (v_c + v_d) / 2 + eps is one sum per pair
        ends_v = torch.lerp(v, torch.full((), eps, dtype=v.dtype, device=v.device), 0.5).index_select(0, ends)
        vbar = ends_v[:p].add_(ends_v[p:])  # (P, D)
        terms = torch.log(vbar, out=ends_v[p:])
        ratio = torch.div(diff, vbar, out=ends_mu[p:])  # (P, D) r
        terms.addcmul_(diff, ratio, value=0.25)  # log vbar + (mu_c - mu_d)^2 / (4 vbar)
        log_det = log_det.index_select(0, ends)  # (2P, L)
        distance = blocks.sum(terms).mul_(0.5).sub_(log_det[:p].add(log_det[p:]).mul_(0.25))  # (P, L)
        ctx.save_for_backward(dev, klass, ends, inv_n, keep, v, vbar, ratio)
        ctx.blocks = blocks
        return distance

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        dev, klass, ends, inv_n, keep, v, vbar, ratio = ctx.saved_tensors
        blocks = ctx.blocks
        p = ratio.shape[0]
        # Per pair: dD/dmu_c = -dD/dmu_d = r / 4 and dD/dv_c = dD/dv_d = dD/dvbar / 2
        # = (1 / vbar - r^2 / 4) / 4, each column block scaled by its layer's incoming
        # gradient; both are scattered to the classes of the pair's two ends below.
        g_chunks = blocks.per_chunk(0.25 * grad)  # (P, n, 1) a quarter of each layer's gradient
        g_v = torch.reciprocal(vbar).addcmul_(ratio, ratio, value=-0.25)  # (P, D)
        blocks.chunked(g_v).mul_(g_chunks)
        g_mu = torch.mul(blocks.chunked(ratio), g_chunks).view_as(ratio)  # (P, D)
        g_mean = torch.zeros_like(v).index_add_(0, ends[:p], g_mu).index_add_(0, ends[p:], g_mu, alpha=-1.0)  # (C, D)
        g_var = torch.zeros_like(v).index_add_(0, ends[:p], g_v).index_add_(0, ends[p:], g_v)  # (C, D)
        g_log_det = torch.zeros(v.shape[0], grad.shape[1], dtype=grad.dtype, device=grad.device).index_add_(
            0, ends, torch.cat([grad, grad])).mul_(-0.25)  # (C, L)
        # d log_det / dv = 1 / v, block by block
        blocks.chunked(g_var).addcdiv_(blocks.per_chunk(g_log_det).expand(-1, -1, blocks.chunk), blocks.chunked(v))
        g_var.mul_(keep).mul_(2.0 * inv_n)  # (C, D) d/dvar times dvar/d(x - mu) / (x - mu)
        g_x = g_mean.mul_(inv_n).index_select(0, klass)  # (B, D)
        g_x.addcmul_(g_var.index_select(0, klass), dev)
        return g_x, None, None, None, None, None


def sample_pair_bhattacharyya(
    x: Tensor, klass: Tensor, num_classes: int, pairs: Tensor, widths: Sequence[int] | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Bhattacharyya distance between the diagonal Gaussians of class pairs of a batch.

    The same numbers as :func:`class_moments` + :func:`bhattacharyya_pairs`, in one pass
    with a hand-written backward (:class:`_SamplePairBhattacharyya`), for the training step.

    Args:
        x: (B, D) samples, cast to float32 (autocast off; float64 stays float64). Several
            layers can share one call: concatenate their features along dim 1 and pass their
            ``widths``; the distance is then computed per block of columns.
        klass: (B,) int64 class of each sample in ``[0, num_classes)``.
        pairs: (2, P) int64 classes (c, d) of each pair.
        widths: column widths of the blocks (default: one block of D).
    Returns:
        (P, L) D_B per pair and block, float32 (float64 for float64 ``x``).
    """
    with no_autocast(x):
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        widths = tuple(int(w) for w in widths) if widths is not None else (x.shape[1],)
        assert sum(widths) == x.shape[1], f"widths {widths} do not add up to D = {x.shape[1]}"
        return _SamplePairBhattacharyya.apply(x, klass, pairs, num_classes, widths, eps)

