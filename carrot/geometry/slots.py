"""Class slots of a batch, per-class sums, means and moments, L2 normalisation, distances.

Classes present in a batch are compacted into ``B`` fixed *slots* (``B = len(y)``) without
a host sync; unused slots have count 0 and are masked out downstream, so every shape
depends on ``B`` only. On the CPU, where reading a count costs no sync, a step may keep only
the ``C`` used slots (:func:`used_class_slots`). The same per-class routines serve a whole
evaluation split, with the labels themselves as slots (``inv = labels``, ``num_slots = K``).

>>> import torch
>>> y = torch.tensor([7, 3, 7, 3, 5])
>>> inv, counts, labels = class_slots(y)
>>> inv.tolist(), counts.tolist(), labels[:3].tolist()
([2, 0, 2, 0, 1], [2.0, 1.0, 2.0, 0.0, 0.0], [3, 5, 7])
>>> means, counts = class_means(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 0, 1]), 2)
>>> means.squeeze(1).tolist(), counts.tolist()
([2.0, 5.0], [2.0, 1.0])
"""
from __future__ import annotations

import contextlib
import contextvars

import numpy as np
import torch
from torch import Tensor

# Floor inside sqrt and log (p log p), so their derivatives stay finite at 0.
FLOOR = 1e-30

# CPU tensors take the routes that read values on the host; device_routes turns it off in its context
_HOST_ROUTES: contextvars.ContextVar[bool] = contextvars.ContextVar("carrot_host_routes", default=True)


def reads_on_host(where: Tensor | torch.device) -> bool:
    """Whether a step may read the values of tensors on ``where`` on the host, where that is
    free: CPU tensors, unless :func:`device_routes` is on. Elsewhere (CUDA) such a read would
    make the host wait for the device, and every step takes its sync-free route instead."""
    device = where if isinstance(where, torch.device) else where.device
    return device.type == "cpu" and _HOST_ROUTES.get()


@contextlib.contextmanager
def device_routes():
    """Within it (this thread's context only) CPU tensors take the sync-free routes a CUDA step
    takes, so that those routes can be run and checked on a machine without a GPU
    (:mod:`carrot.syncs`)."""
    token = _HOST_ROUTES.set(False)
    try:
        yield
    finally:
        _HOST_ROUTES.reset(token)


def kth_largest(x: Tensor, m: int) -> Tensor:
    """The ``m``-th largest value of every row of ``x`` (R, N), ``1 <= m <= N``: (R,), no grad.

    On the host (CPU, float32 or float64) from numpy's sort of the values, which runs
    vectorised: on fresh 200 x 200 rows a few times faster than ``torch.topk``, whose
    per-row selection branches on every comparison. Elsewhere the last of ``topk``'s values.
    """
    with torch.no_grad():
        x = x.detach()
        if reads_on_host(x) and x.dtype in (torch.float32, torch.float64):
            return torch.from_numpy(np.sort(x.numpy(), axis=1)[:, x.shape[1] - m])
        return x.topk(m, dim=1).values[:, -1]


def stat_float(t: Tensor) -> Tensor:
    """``t`` in float32 (from bf16/fp16 under autocast), or as it is when float64: a float64
    model (the fixed-seed numerics checks) keeps every loss term float64."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def no_autocast(t: Tensor):
    """Context that turns autocast off on ``t``'s device: statistics stay float32 (SPEC).
    Where autocast is already off it changes nothing (entering ``torch.autocast`` costs about
    as much as a small tensor operation)."""
    device = t.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except TypeError:  # torch < 2.4 asks for no device type: always enter
        enabled = True
    return torch.autocast(device, enabled=False) if enabled else contextlib.nullcontext()


# --------------------------------------------------------------------------- slots
def class_slots(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Compact the labels of a batch into ``B = len(y)`` slots without a host sync.

    Labels are sorted, a new slot starts wherever the sorted label changes, and the slot
    index is the cumulative sum of those changes. Slots follow ascending label order and
    the ``C`` present classes occupy slots ``0 .. C-1``. CPU tensors take one
    ``torch.unique`` instead (the same outputs; the host may read the class count there).

    Returns:
        inv: (B,) int64, slot of each sample, in [0, C).
        counts: (B,) float32, samples per slot (0 for unused slots ``>= C``).
        labels_of_slot: (B,) int64, the label owning each slot (meaningful where counts > 0,
            0 elsewhere).
    """
    y = y.reshape(-1).long()
    return _class_slots_on_host(y) if reads_on_host(y) else _class_slots_sync_free(y)


def _class_slots_sync_free(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`class_slots` by sorting and a cumulative sum: no data-dependent shape."""
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


def _used_slots_by_unique(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The ``C`` used slots from ``torch.unique`` (its output size is the class count, which a
    CUDA tensor would have to sync for): ``inv`` (B,), ``counts`` (C,) float32, labels (C,)."""
    labels, inv, counts = torch.unique(y, sorted=True, return_inverse=True, return_counts=True)
    return inv.reshape(-1), counts.float(), labels


def _class_slots_on_host(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`class_slots` with ``torch.unique``, padded to B slots."""
    inv, present, labels = _used_slots_by_unique(y)
    counts = torch.zeros(y.shape[0], dtype=torch.float32, device=y.device)
    counts[:labels.shape[0]] = present
    labels_of_slot = torch.zeros_like(y)
    labels_of_slot[:labels.shape[0]] = labels
    return inv, counts, labels_of_slot


def used_class_slots(y: Tensor) -> tuple[Tensor, Tensor, Tensor, int | None]:
    """:func:`class_slots` with only the slots a step uses: where the host reads the labels
    (CPU, no sync to avoid), the ``C`` used slots, ``(inv (B,), counts (C,), labels_of_slot
    (C,), C)``, straight from ``torch.unique``; elsewhere (CUDA, where the count would cost a
    host sync) all ``B`` slots and ``None``."""
    y = y.reshape(-1).long()
    if not reads_on_host(y):
        return (*_class_slots_sync_free(y), None)
    inv, counts, labels = _used_slots_by_unique(y)
    return inv, counts, labels, labels.shape[0]


def compact_slots(keep: Tensor) -> Tensor:
    """Renumber the slots where ``keep`` is true as 0, 1, ... in order; others get -1.

    ``keep`` (S,) bool, e.g. ``counts >= 2``. Sync-free (a cumulative sum), so a caller
    that knows an upper bound on the kept slots (``B // 2`` classes can have two samples)
    can work on that many slots instead of ``B``.
    """
    k = keep.long()
    return torch.where(keep, torch.cumsum(k, 0) - 1, torch.full_like(k, -1))


# ------------------------------------------------------------------------- moments
def slot_sums(x: Tensor, inv: Tensor, num_slots: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-slot sums ``sum_{i: inv_i = s} x_i``, (S, D) in ``dtype`` (float32 by default), 0 on
    empty slots; differentiable. For callers that have the counts already."""
    x = x.to(dtype)
    return torch.zeros(num_slots, x.shape[1], dtype=dtype, device=x.device).index_add_(0, inv, x)


def class_sums(x: Tensor, inv: Tensor, num_slots: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Per-slot sums ``sum_{i: inv_i = s} x_i`` and counts, in ``dtype`` (float32 by default).

    Returns ``(sums (S, D), counts (S,))``; empty slots have sum 0 and count 0. The sums
    are what data-parallel callers all-reduce before dividing.
    """
    counts = torch.zeros(num_slots, dtype=dtype, device=x.device)
    counts.index_add_(0, inv, torch.ones_like(inv, dtype=dtype))
    return slot_sums(x, inv, num_slots, dtype), counts


def class_means(x: Tensor, inv: Tensor, num_slots: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Per-slot means ``mu_s = (1/n_s) sum_{i: inv_i = s} x_i`` in ``dtype`` (float32 by default).

    Returns ``(means (S, D), counts (S,))``; empty slots have mean 0 and count 0.
    """
    sums, counts = class_sums(x, inv, num_slots, dtype)
    return sums / counts.clamp_min(1.0)[:, None], counts


def class_deviations(x: Tensor, inv: Tensor, num_slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-slot means and every sample's deviation from its slot's mean, float32.

    Returns ``(means (S, D), dev (B, D) = x - means[inv], counts (S,))``.
    """
    x = x.float()
    means, counts = class_means(x, inv, num_slots)
    return means, x - means.index_select(0, inv), counts


def class_moments(x: Tensor, inv: Tensor, num_slots: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-slot mean and biased diagonal variance in float32.

    ``var_sj = (1/n_s) sum_{i in s} (x_ij - mu_sj)^2`` (two-pass: deviations from the mean,
    not E[x^2] - mu^2, so no cancellation). A slot with one sample has variance 0; an
    empty slot has mean 0, variance 0 and count 0.

    Returns ``(means (S, D), var (S, D), counts (S,))``.
    """
    means, dev, counts = class_deviations(x, inv, num_slots)  # (S, D), (B, D), (S,)
    return means, slot_variance(dev, inv, counts), counts


def slot_variance(dev: Tensor, inv: Tensor, counts: Tensor) -> Tensor:
    """``(1/n_s) sum_{i in s} dev_i^2`` per slot, (S, D), from the deviations of :func:`class_deviations`."""
    sq = torch.zeros(counts.shape[0], dev.shape[1], dtype=dev.dtype, device=dev.device).index_add_(0, inv, dev * dev)
    return sq / counts.clamp_min(1.0)[:, None]


def rms_radius(var: Tensor) -> Tensor:
    """RMS radius ``r_s = sqrt(mean_i ||x_i - mu_s||^2) = sqrt(sum_j var_sj)``, (S,) float32.

    The sum is floored at 1e-30 inside the sqrt so a zero-spread class has a finite (zero)
    gradient instead of ``inf * 0 = nan``.
    """
    return torch.sqrt(var.float().sum(-1).clamp_min(FLOOR))


# ------------------------------------------------------------------- norms, distances
class _L2Normalize(torch.autograd.Function):
    """``x * r`` with ``r = 1 / ||x||`` per row (0 where ``||x|| <= eps``), closed-form backward.

    With ``u = x r`` the gradient is ``dx = r (g - u (g . u))``: two (N, D) passes, where
    autograd's graph of the product, the row norm and the mask keeps and allocates one (N, D)
    buffer per op. ``r = 0`` on the rows left out gives their 0 value and zero gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (N, 1)
        # 0 on the rows left out (their 1 / 0 = inf is replaced before any product); a NaN
        # row is not left out and stays NaN, as absent classes in the diagnostics need
        r = norm.reciprocal().masked_fill_(norm <= eps, 0.0)  # (N, 1)
        out = x * r  # (N, D)
        ctx.save_for_backward(out, r)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        out, r = ctx.saved_tensors
        dot = torch.linalg.vecdot(g, out).unsqueeze(-1)  # (N, 1) g . u
        return g.addcmul(out, dot, value=-1.0).mul_(r), None


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``x / ||x||`` along the last dim, in ``x``'s dtype; 0, with a zero gradient, where ``||x|| <= eps``.

    The same value as ``F.normalize`` wherever ``||x|| > eps``, written as a product with a
    (N, 1) factor and a closed-form backward (:class:`_L2Normalize`): on the CPU it is several
    times faster than ``F.normalize``'s expanded division. A (near-)zero row has no direction:
    ``F.normalize`` maps it to ``x / eps`` with the gradient ``1 / eps = 1e12``, which
    overflows float16 and, through two normalisations in a row (a normalised neck, then
    prototypes or the expansion operator), reaches ~1e26 in float32. Here it maps to 0 with a
    zero gradient (the convention of :func:`pairwise_distance` at 0).
    """
    return _L2Normalize.apply(x, eps)


def pairwise_sq_distance(a: Tensor) -> Tensor:
    """Squared Euclidean distances ``||a_i||^2 + ||a_j||^2 - 2 a_i.a_j`` (N, N) float32, clamped >= 0
    against round-off (no (N, N, D) tensor); the diagonal is not forced to 0."""
    a = a.float()
    sq = (a * a).sum(-1)  # (N,)
    with no_autocast(a):
        inner = a @ a.T  # (N, N)
    return (sq[:, None] + sq[None, :] - 2.0 * inner).clamp_min(0.0)  # (N, N)


def sq_distance_to_distance(d2: Tensor) -> Tensor:
    """``sqrt(d2)`` with a finite gradient at 0 (0 there); non-decreasing in ``d2``."""
    return torch.sqrt(d2.clamp_min(FLOOR)) * (d2 > 0)


def pairwise_distance(a: Tensor) -> Tensor:
    """Euclidean distances ``||a_i - a_j||`` (N, N) float32, finite gradient at 0.

    Uses ``||a_i||^2 + ||a_j||^2 - 2 a_i.a_j`` (no (N, N, D) tensor), clamped >= 0 against
    round-off; the diagonal is exactly 0.
    """
    d2 = pairwise_sq_distance(a)
    d2 = d2 * (1.0 - torch.eye(a.shape[0], dtype=d2.dtype, device=d2.device))
    return sq_distance_to_distance(d2)
