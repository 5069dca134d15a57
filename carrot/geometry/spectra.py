"""Spectra of batch covariances: effective rank and spectral entropy.

``erank = exp(H)``, ``H = -sum_k p_k log p_k`` with ``p = lam / sum lam`` the normalised
eigenvalues of the covariance (squared singular values of the centred data, not the singular
values of Roy & Vetterli's definition; see :func:`effective_rank`). Written once as
:func:`spectral_entropy` of the trace ``T = sum lam`` and ``sum lam log lam``:
``H = log T - (sum lam log lam) / T``. :func:`effective_rank` applies it to one matrix;
:class:`BlockSpectrum` to every class of a batch at once, from the block-diagonal
within-class Gram (the ``barrier`` variant).

"No spread" is relative: a trace at or below ``REL_SPREAD_FLOOR`` times the squared norm of
the samples it comes from is the round-off of centring identical samples (float32 leaves
deviations of ~1e-7 of the values), not a spread; it counts as 0, so identical embeddings
give erank 1 with a zero gradient instead of 1 / round-off.

``torch.linalg.eigh`` checks the solver's error codes on the host, one synchronisation per
call on CUDA (there is no ``eigh_ex``). So on CUDA :class:`BlockSpectrum` takes another
route to the same numbers: ``tr(G_s log G_s)`` and ``log G`` from the resolvent integral
``P log P = int_0^inf [P / (1 + t) - P (P + t I)^{-1}] dt`` (P = G_s / tr G_s), a trapezoid
rule in ``log t`` over batched Cholesky factorisations without an error check
(:func:`resolvent_xlogx`): no host sync. Elsewhere (the CPU) it keeps the one ``eigh``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from carrot.geometry.slots import FLOOR, no_autocast, reads_on_host


# A trace below this fraction of the samples' squared norm is round-off, not spread:
# (100 float32 epsilons)^2, i.e. deviations under ~1e-5 of the values.
REL_SPREAD_FLOOR = (100 * torch.finfo(torch.float32).eps) ** 2


def has_spread(trace: Tensor, magnitude: Tensor | None = None) -> Tensor:
    """``trace > tiny`` and, given the squared norm ``magnitude`` of the (uncentred) samples
    behind it, ``trace > REL_SPREAD_FLOOR * magnitude``: a spread that is not centring round-off."""
    spread = trace > torch.finfo(trace.dtype).tiny
    if magnitude is not None:
        spread = spread & (trace > REL_SPREAD_FLOOR * magnitude)
    return spread


# ---------------------------------------------------------------- spectral entropy
def trace_terms(trace: Tensor, magnitude: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(spread, log T, 1 / T)`` for :func:`spectral_entropy`, with T = 1 where there is no spread.

    ``spread`` is :func:`has_spread` (relative to ``magnitude`` when given). Split from the
    entropy so a caller can queue them before the ``eigh`` that gives ``sum lam log lam`` (its
    host sync), and reuse ``1 / T`` in a backward.
    """
    spread = has_spread(trace, magnitude)
    safe = torch.where(spread, trace, torch.ones_like(trace))
    return spread, torch.log(safe), 1.0 / safe


def spectral_entropy(trace: Tensor, xlogx: Tensor, terms: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """``H = -sum_k p_k log p_k`` with ``p = lam / T`` from ``T = sum lam``, ``xlogx = sum lam log lam``.

    ``H = log T - xlogx / T``; 0 (zero gradient) where ``T`` is 0: a one-sample class or
    identical samples have erank ``exp(0) = 1``. ``terms``: :func:`trace_terms` of ``trace``,
    if already computed.
    """
    spread, log_t, inv_t = trace_terms(trace) if terms is None else terms
    return torch.where(spread, log_t - xlogx * inv_t, torch.zeros((), dtype=trace.dtype, device=trace.device))


def xlogx_sum(lam: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum lam, sum lam log lam)`` over the last dim, eigenvalues clamped >= 0.

    ``lam`` is floored at 1e-30 inside the log only, so the gradient stays finite at zero
    eigenvalues.
    """
    pos = lam.clamp_min(0.0)
    return pos.sum(-1), (pos * torch.log(pos.clamp_min(FLOOR))).sum(-1)


def effective_rank(x: Tensor, center: bool = False) -> Tensor:
    """Effective rank of the covariance of a centred (n, D) matrix, a float32 scalar.

    Definition (the one used throughout, e.g. the ``barrier`` variant's erank_c):
    ``erank = exp(H(p))``, ``H(p) = -sum_k p_k log p_k``, ``p_k = lam_k / sum_j lam_j`` with
    ``lam`` the EIGENVALUES of the covariance ``X^T X / n``, i.e. the SQUARED singular values
    ``sigma_k^2`` of the centred X (the 1/n cancels in p). This is not Roy & Vetterli's
    effective rank (2007), which normalises the singular values themselves,
    ``p_k = sigma_k / sum_j sigma_j``: on the same matrix the two differ (squaring
    concentrates p, so the covariance convention gives the smaller value unless the non-zero
    singular values are equal, where both give their count).

    The eigenvalues come from the smaller of the n x n Gram ``X X^T`` and the D x D scatter
    ``X^T X`` (same non-zero spectrum). A matrix with r equal non-zero singular values has
    erank exactly r; a zero matrix has erank 1. The input is assumed centred; ``center=True``
    subtracts the column means.

    >>> effective_rank(torch.eye(3)).item()
    3.0
    """
    with no_autocast(x):
        x = x.float()
        if center:
            x = x - x.mean(0, keepdim=True)
        gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x  # (min(n,D), min(n,D))
        lam = torch.linalg.eigvalsh(gram)
        return torch.exp(spectral_entropy(*xlogx_sum(lam)))


# ------------------------------------------------- every class from one eigh
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
    """Eigenvalues (ascending) and eigenvectors of a small symmetric matrix, ``torch.linalg.eigh``
    (on CUDA it synchronises with the host: its error check)."""
    return torch.linalg.eigh(gram)


# The trapezoid rule of resolvent_xlogx: nodes t = exp(s), s from RESOLVENT_LOG_T[0] to [1] in
# steps of RESOLVENT_STEP. The integrand is analytic in |Im s| < pi, so the rule's error is
# ~exp(-2 pi^2 / step) ~ 1e-11; the ends cut eigenvalues below e^-27.6 ~ 1e-12 of the trace
# (their p log p is under 1e-10) and a tail under 1e-10.
RESOLVENT_LOG_T = (-27.6, 23.0)
RESOLVENT_STEP = 0.8


def resolvent_xlogx(xc: Tensor, same: Tensor, member: Tensor) -> tuple[Tensor, Tensor]:
    """``tr(G_s log G_s)`` per block and ``f'(G) = log G + I`` (block-diagonal), without an eigensolver.

    ``xc`` (B, D) are the samples centred on their blocks (rows in block order), ``same``
    (B, B) the block mask, ``member`` (S, B). In float64: ``G = (xc xc^T) * same``, each block
    scaled to unit trace, ``P = G_s / T_s``; with ``R_t = (P + t I)^{-1}`` from a batched
    Cholesky (``cholesky_ex``: no error check, hence no host sync on CUDA) and the identity
    ``log P = int_0^inf [I / (1 + t) - R_t] dt`` (eigenvalue by eigenvalue:
    ``log p = int [1 / (1 + t) - 1 / (p + t)] dt``) taken by the trapezoid rule in ``log t``
    (:data:`RESOLVENT_LOG_T`, :data:`RESOLVENT_STEP`):

        tr(G_s log G_s) = T_s (tr(P_s log P_s) + log T_s),   f'(G) = log P + (log T + 1) I.

    On the null space of a block (the centring direction, repeated samples) ``log P`` is
    about ``log e^-27.6`` instead of ``-inf``; the gradient never reads it there (``G v = 0``
    means ``xc^T v = 0``). Blocks without a trace give 0 and a finite ``f'``. The float64 Gram
    keeps the round-off of its zero eigenvalues (~1e-16 of the trace) far below the smallest
    node, so every ``P + t I`` is positive definite.

    Returns ``(xlogx (S,), fprime (B, B))`` in ``xc``'s dtype.
    """
    dtype, b = xc.dtype, xc.shape[0]
    x64 = xc.double()
    gram = (x64 @ x64.T) * same.double()  # (B, B) block diagonal
    diag = gram.diagonal()  # (B,)
    member64 = member.double()
    trace = member64 @ diag  # (S,)
    row_trace = member64.T @ trace  # (B,) the trace of each row's block (0 outside every block)
    has = row_trace > 0
    scale = torch.where(has, row_trace, torch.ones_like(row_trace)).rsqrt() * has  # (B,) 1 / sqrt(T), 0 without
    p = gram * scale[:, None] * scale[None, :]  # (B, B) each block at unit trace
    lo, hi = RESOLVENT_LOG_T
    count = int(math.ceil((hi - lo) / RESOLVENT_STEP)) + 1
    t = torch.exp(torch.linspace(lo, hi, count, dtype=torch.float64, device=xc.device))  # (N,)
    w = ((hi - lo) / (count - 1)) * t  # dt = t ds
    w = torch.cat([0.5 * w[:1], w[1:-1], 0.5 * w[-1:]])  # trapezoid ends
    eye = torch.eye(b, dtype=torch.float64, device=xc.device)
    chol, _ = torch.linalg.cholesky_ex(p + t[:, None, None] * eye)  # (N, B, B), check_errors=False
    inv_chol = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)  # L^-1
    resolvent = inv_chol.mT @ inv_chol  # (N, B, B) (P + t I)^-1
    log_p = (w / (1.0 + t)).sum() * eye - torch.einsum("n,nij->ij", w, resolvent)  # (B, B) log P
    log_t = torch.log(torch.where(trace > 0, trace, torch.ones_like(trace)))  # (S,)
    plogp = member64 @ (p * log_p.T).sum(1)  # (S,) tr(P log P) per block
    xlogx = torch.where(trace > 0, trace * (plogp + log_t), torch.zeros_like(trace))
    fprime = (log_p + torch.diag(member64.T @ log_t + 1.0)) * same.double()
    return xlogx.to(dtype), fprime.to(dtype)


def use_resolvent(device: torch.device) -> bool:
    """The spectrum comes from :func:`resolvent_xlogx` (no host sync) on CUDA, from ``eigh``
    where the host reads values for free (:func:`carrot.geometry.slots.reads_on_host`)."""
    return not reads_on_host(device)


class BlockSpectrum:
    """The block-diagonal within-class Gram of a batch and its spectrum, in pieces.

    ``G = (C x)(C x)^T`` restricted to its diagonal blocks, ``C`` the centring operator
    with rows in block order (:func:`class_centring_operator`), so ``G`` is block diagonal
    with contiguous blocks. One spectral computation of ``G`` serves every block: any matrix
    function of a block-diagonal matrix is block diagonal. On the CPU it is one ``eigh``: with
    ``G = V diag(lam) V^T``

        tr f(G_s) = sum_k mass_sk f(lam_k),   mass_sk = sum_{i in s} V_ik^2,

    exact for any orthonormal eigenbasis, also when blocks share eigenvalues. Here
    ``f(lam) = max(lam, 0) log max(lam, floor)`` (``xlogx``), plus the traces ``T_s`` and
    the batch scatter ``||x - mean(x)||_F^2`` (``total``); the non-zero eigenvalues of a
    block are ``n_s`` times those of the class covariance (the factor cancels in ``p``), so
    :meth:`entropy` is each class's spectral entropy. On CUDA, where ``eigh`` would
    synchronise with the host, the same ``tr f(G_s)`` and ``f'(G)`` come from the resolvent
    integral (:func:`resolvent_xlogx`); ``resolvent`` forces either route.

    :meth:`operator` gives the analytic derivative: ``d tr f(G_s) / dG = f'(G)`` on block s
    (``f'(G) = V diag(f'(lam)) V^T``, no ``1 / (lam_i - lam_j)`` eigenvector terms, so it
    is finite on repeated eigenvalues), the identity on the diagonal for the trace, and
    with ``dL/dG = Gg`` (symmetric) ``dL/dx = 2 C^T Gg C x``: every term folds into one
    B x B matrix, so backward costs one (B, B) @ (B, D) product. The pieces are used inside
    ``torch.autograd.Function`` s (no autograd graph of their own); the work before the
    spectrum (:meth:`__init__`) is split from it (:meth:`xlogx`), so a caller can queue
    everything that does not need it first.
    ``trace_terms[0]`` (per block) and ``total_spread`` (the batch) say where there is a
    spread above the round-off of centring (:func:`has_spread`).
    """

    def __init__(self, x: Tensor, centre: Tensor, block: Tensor, num_blocks: int,
                 resolvent: bool | None = None) -> None:
        self.centre = centre
        self.resolvent = use_resolvent(x.device) if resolvent is None else resolvent
        ok = block >= 0
        self.same = ((block[:, None] == block[None, :]) & ok[:, None]).to(x.dtype)  # (B, B) block mask
        self.member = (block[None, :] == torch.arange(num_blocks, device=x.device)[:, None]).to(x.dtype)  # (S, B)
        xc = centre @ x  # (B, D) class-centred, block order
        self.xc = xc
        self.gram = (xc @ xc.T) * self.same  # (B, B)
        self.trace = self.member @ torch.diagonal(self.gram)  # (S,)
        xb = (x - x.mean(0, keepdim=True)).reshape(-1)
        self.total = torch.dot(xb, xb)  # no (B, D) square
        sq_norm = torch.linalg.vector_norm(x, dim=1).square()  # (B,) ||x_i||^2, for the spread floor
        # (spread, log T, 1 / T) of every block, for the entropy; spread relative to the block's samples
        self.trace_terms = trace_terms(self.trace, self.member @ sq_norm)
        self.total_spread = has_spread(self.total, sq_norm.sum())  # 0-dim: the batch has a spread

    def xlogx(self) -> Tensor:
        """(S,) ``tr(G_s log G_s)``, eigenvalues clamped >= 0: one ``eigh`` (CPU), or the
        resolvent integral without a host sync (CUDA, :func:`resolvent_xlogx`)."""
        if self.resolvent:
            xlogx, self.fprime = resolvent_xlogx(self.xc, self.same, self.member)
            return xlogx
        lam, vec = symmetric_eigh(self.gram)  # (B,), (B, B)
        pos = lam.clamp_min(0.0)
        log_pos = torch.log(pos.clamp_min(FLOOR))
        # f'(lam) for backward: log lam + 1, 0 for lam <= 0 (the clamp). Between 0 and the
        # floor (1e-30, round-off of a zero eigenvalue) the exact derivative is log(floor).
        dphi = (log_pos + 1.0) * (lam > 0)
        self.fprime = (vec * dphi) @ vec.T  # (B, B) f'(G)
        return self.member @ ((vec * vec) @ (pos * log_pos))

    def entropy(self, xlogx: Tensor) -> Tensor:
        """(S,) spectral entropy of every block from its :meth:`xlogx` (0 for a block without spread)."""
        return spectral_entropy(self.trace, xlogx, self.trace_terms)

    def operator(self, g_trace: Tensor, g_xlogx: Tensor | None = None, g_total: Tensor | None = None) -> Tensor:
        """(B, B) ``M`` with ``dL/dx = M @ x`` for dL/dtrace (S,), dL/dxlogx (S,), dL/dtotal (0-dim).

        ``M = 2 C^T Gg C + 2 g_total (I - 11^T / B)``, ``Gg = dL/dG`` (symmetric); without
        ``g_xlogx`` it needs no eigenvalues (so it can be built before the ``eigh``).
        """
        centre, b = self.centre, self.centre.shape[0]
        grad_gram = torch.diag(g_trace @ self.member)  # (B, B) trace: identity on each block's diagonal
        if g_xlogx is not None:
            grad_gram = grad_gram + self.fprime * self.same * (g_xlogx @ self.member)[:, None]
        op = centre.T @ (2.0 * grad_gram) @ centre
        if g_total is not None:
            eye = torch.eye(b, dtype=centre.dtype, device=centre.device)
            op = op + (2.0 * g_total) * (eye - 1.0 / b)
        return op


def block_spectrum(x: Tensor, inv: Tensor, blocks: Tensor, num_blocks: int,
                   resolvent: bool | None = None) -> BlockSpectrum:
    """:class:`BlockSpectrum` of ``x`` (B, D) centred on its classes ``inv``, rows grouped by ``blocks``.

    ``blocks`` (B,) int64 in ``[0, num_blocks)`` or -1 to leave a sample out. Computed in
    ``x``'s dtype (cast to float32 first for SPEC) with no autograd graph: call it inside a
    ``torch.autograd.Function`` (as ``carrot.variants.barrier`` does).
    """
    b = x.shape[0]
    counts = torch.zeros(b, dtype=x.dtype, device=x.device).index_add_(
        0, inv, torch.ones(b, dtype=x.dtype, device=x.device))
    order = torch.sort(blocks, stable=True).indices  # (B,) rows in block order: contiguous blocks
    centre = class_centring_operator(inv, counts, order).to(x.dtype)  # (B, B)
    return BlockSpectrum(x, centre, blocks[order], num_blocks, resolvent)
