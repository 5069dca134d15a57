"""``bhattacharyya`` (seed 003): confusion-weighted multi-layer Bhattacharyya regularization.

For the pooled features of the last few probed layers, the class-conditional diagonal
Gaussians of the classes the model confuses most are pushed apart by minimising their
Bhattacharyya coefficient rho = exp(-D_B), the overlap behind the Bayes-error bound
P_e <= sqrt(w1 w2) rho:

    L = CE + s * L_bhat,   L_bhat = mean_layers [ sum_{top-M pairs} a_cd rho_cd / sum a_cd ],
    s = CE.detach() / L_bhat.detach()   ("auto"; a fixed lam is the ablation).

The auto-scaled term is computed in log space and never through rho: with

    log L_layer = logsumexp_pairs(log a_cd - D_B(c, d)) - log sum a_cd,
    log L_bhat  = logsumexp_layers(log L_layer) - log(number of layers)   (the layer mean),

the term is ``CE.detach() * exp(log L_bhat - log L_bhat.detach())``: its value is CE and its
gradient is exactly that of ``s * L_bhat``. On wide layers D_B is in the hundreds, rho =
exp(-D_B) is 0 in float32 and a term built from rho goes silent; this one cannot underflow.
With ``scale=fixed`` the term is ``lam * L_bhat`` from rho as is (a fixed weight on an
underflowing overlap legitimately vanishes).

Under torch.distributed the labels, logits and features of all ranks are all-gathered (the
features with gradients) and the auto scale uses the global mean CE, so every rank computes
the term of the global batch (:mod:`carrot.geometry.distributed`).

On CUDA everything is vectorised over classes, pairs and layers on fixed-size (B-slot)
tensors: no ``torch.unique``, no class-index remapping, no host sync. On the CPU, where the
host reads tensors for free, the pair selection, the scaled term with its gradient with
respect to D_B, and the statistics are numpy on small arrays (:func:`select_confusable_pairs`,
:func:`overlap_on_host`); the tests hold both routes to the same numbers. Labels, confusion and
the pair selection are computed once per step; the layers are concatenated along the feature
axis, so moments and pair terms are one pass for all of them, with a hand-written backward.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from torch import Tensor

from carrot.geometry import (
    class_slots, compact_slots, no_autocast, reads_on_host, sample_pair_bhattacharyya, soft_confusion,
)
from carrot.geometry.distributed import all_reduce_mean_no_grad, gather_rows, gather_rows_no_grad
from carrot.variants import register_variant
from carrot.variants.base import BaseHparams, StepBatch, Variant

SCALES = ("auto", "fixed")


@dataclass
class PairSelection:
    """The top-M confusable class pairs of a batch, as slot indices (M' entries: fixed on the
    device path, the valid pairs only on the host's)."""

    i: Tensor  # (M',) int64 slot of class c (c < d)
    j: Tensor  # (M',) int64 slot of class d
    weight: Tensor  # (M',) float32 confusion a_cd; 0 for padding (invalid) entries
    valid: Tensor  # (M',) bool, a real pair of two classes with >= 2 samples
    usable_classes: Tensor  # 0-dim, classes with >= 2 samples
    # The same pairs among the usable classes only, renumbered 0, 1, ... (at most
    # num_usable = B // 2 of them): the moments need only those rows.
    klass: Tensor  # (B,) int64 usable-class index of each sample; num_usable (no pair reads it) if < 2 samples
    pair_class: Tensor  # (2, M') int64 usable-class indices of (c, d); 0 for padding entries
    num_usable: int  # rows of the per-class moments: max(1, B // 2), or the usable classes on the host
    on_host: bool = False  # made by the host (CPU tensors): the pair terms' small tensors can go through numpy
    padded: bool = True  # some entries may be padding (the host's has one only when no pair is valid)


def select_confusable_pairs(logits: Tensor, y: Tensor, top_m: int, on_host: bool | None = None) -> PairSelection:
    """Top-M unordered pairs (c < d) of classes with >= 2 samples, ranked by confusion.

    a_cd = (A_cd + A_dc) / 2, A_cd the mean over samples of c of softmax(logits)_d (no
    grad). Invalid entries of the fixed (S, S) score matrix are -1 (a >= 0), so ``topk``
    over it needs no data-dependent shapes; the ``valid`` mask drops the padding.

    ``on_host`` (default: for CPU tensors) makes the same selection with numpy
    (:func:`_select_on_host`): the host knows the classes of the batch, so the selection is
    numpy on a few small arrays instead of about 70 small tensor operations, it keeps only the
    valid pairs (one padding entry when there is none), and the moments get one row per
    usable class. On CUDA that would cost a host sync every step.
    """
    if on_host if on_host is not None else reads_on_host(logits):
        return _select_on_host(logits, y, top_m)
    inv, counts, labels_of_slot = class_slots(y)
    s = counts.shape[0]
    a = soft_confusion(torch.softmax(logits.detach().float(), dim=1), inv, counts, labels_of_slot)  # (S, S)
    usable = counts >= 2  # (S,)
    upper = torch.ones(s, s, dtype=torch.bool, device=a.device).triu(1)
    ok = upper & usable[:, None] & usable[None, :]  # (S, S)
    score = torch.where(ok, a, torch.full_like(a, -1.0)).reshape(-1)  # (S*S,)
    vals, flat = torch.topk(score, k=min(top_m, s * s))
    valid = vals >= 0
    i, j = flat // s, flat % s
    compact = compact_slots(usable)  # (S,) usable-class index, -1 otherwise
    pair_class = torch.where(valid, torch.stack([compact[i], compact[j]]), torch.zeros_like(i))  # (2, M')
    sel = PairSelection(
        i=i, j=j, weight=torch.where(valid, vals, torch.zeros_like(vals)),
        valid=valid, usable_classes=usable.sum(),
        klass=torch.where(usable[inv], compact[inv], torch.full_like(inv, max(1, s // 2))),
        pair_class=pair_class, num_usable=max(1, s // 2),
    )
    return sel


@functools.lru_cache(maxsize=64)
def _upper_pairs(n: int) -> np.ndarray:
    """``np.triu_indices(n, 1)`` as one (2, n (n - 1) / 2) array, read-only (it costs more than
    the rest of a selection)."""
    pairs = np.stack(np.triu_indices(n, 1))
    pairs.flags.writeable = False
    return pairs


def _select_on_host(logits: Tensor, y: Tensor, top_m: int) -> PairSelection:
    """:func:`select_confusable_pairs` in numpy, for tensors the host can read without a sync.

    The same pairs in the same order (ties, which ``topk`` leaves unordered, by ascending
    slot pair), the same weights up to float32 rounding; only the valid pairs are kept (at
    least one entry) and ``num_usable`` is the number of usable classes, not ``B // 2``.
    Written in few numpy calls: in a training step each costs several times what it costs
    alone, the step's large tensors having pushed numpy out of the caches.
    """
    labels = y.detach().cpu().numpy().reshape(-1)
    b = labels.shape[0]
    per_label = np.bincount(labels)  # (max label + 1,) class indices are small
    usable_labels = np.flatnonzero(per_label >= 2)  # (U,) ascending
    u = usable_labels.shape[0]
    spare = max(1, u)  # the moments' row of the samples of classes with one sample
    compact = np.full(per_label.shape[0], spare, dtype=np.int64)
    compact[usable_labels] = np.arange(u)
    klass = compact[labels]  # (B,) usable-class index, the spare row for the rest
    # A_st = mean over the samples of usable class s of softmax(logits)_t, t usable: (U, U)
    probs = torch.softmax(logits.detach().float(), 1).cpu().numpy()[:, usable_labels]  # (B, U)
    member = np.zeros((spare + 1, b), dtype=np.float32)
    member[klass, np.arange(b)] = 1.0
    rows = (member[:u] @ probs) / per_label[usable_labels, None].astype(np.float32)
    pairs = _upper_pairs(u)  # (2, U (U - 1) / 2) pairs c < d of usable classes, ascending
    score = 0.5 * (rows[pairs[0], pairs[1]] + rows[pairs[1], pairs[0]])
    order = np.argsort(-score, kind="stable")[:top_m]
    pair_class, weight = pairs[:, order], score[order].astype(np.float32)  # (2, P) int64, (P,)
    if not len(order):  # one padding entry, so every shape downstream is non-empty
        pair_class, weight = np.zeros((2, 1), np.int64), np.zeros(1, np.float32)
    # slot of each usable class among all present classes (class_slots' numbering)
    slots = (np.cumsum(per_label > 0) - 1)[usable_labels[pair_class]] if u else pair_class  # (2, P)
    # one tensor of the integer arrays, taken apart as views
    ints = torch.from_numpy(np.concatenate([slots.reshape(-1), pair_class.reshape(-1), klass, [u]]))
    ints = ints.to(logits.device)
    p = pair_class.shape[1]
    return PairSelection(
        i=ints[:p], j=ints[p:2 * p], weight=torch.from_numpy(weight).to(logits.device),
        valid=torch.from_numpy(np.full(p, bool(len(order)))).to(logits.device), usable_classes=ints[-1],
        klass=ints[4 * p:-1], pair_class=ints[2 * p:4 * p].view(2, p), num_usable=spare,
        on_host=logits.device.type == "cpu", padded=not len(order),
    )


def pair_distances(
    features: Sequence[Tensor], sel: PairSelection, normalize: bool = False, eps: float = 1e-6,
    distance: str = "sum",
) -> tuple[Tensor, Tensor, Tensor]:
    """D_B of the selected pairs in every layer, all layers at once.

    The layers' pooled features (B, D_l) are concatenated along the feature axis (float32,
    float64 input stays float64; optionally L2-normalised per layer first), so the per-class
    mean and biased diagonal variance (usable classes only) and the per-pair terms are one
    pass over ``D_1 + ... + D_L`` columns, summed per layer at the end
    (:func:`carrot.geometry.sample_pair_bhattacharyya`). For the selected pairs, with
    ``v = max(var, eps)`` and ``vbar = (v_c + v_d) / 2 + eps`` (as
    :func:`carrot.geometry.bhattacharyya_pairs`):

        D_B = 1/2 [ sum_j (log vbar_j + (mu_cj - mu_dj)^2 / (4 vbar_j)) - 1/2 (sum_j log v_cj + sum_j log v_dj) ]

    ``distance="mean"`` divides each layer's D_B by its width D_l (an ablation switch; ``"sum"``
    is the method).

    Returns ``(db, rho_mean, db_mean)``: ``db`` (M', L) with its gradient, 0 on padding
    entries; the unweighted means of rho = exp(-D_B) and of D_B over the valid pairs, (L,)
    float64 each, no gradient (rho underflows to 0 only beyond D_B ~ 745; D_B stays readable),
    NaN without a valid pair.
    """
    with no_autocast(features[0]):
        fs = [f.to(torch.promote_types(f.dtype, torch.float32)) for f in features]
        if normalize:
            fs = [F.normalize(f, dim=1) for f in fs]
        x = torch.cat(fs, 1) if len(fs) > 1 else fs[0]  # (B, D) all layers side by side
        widths = [f.shape[1] for f in fs]
        db = sample_pair_bhattacharyya(x, sel.klass, sel.num_usable + 1, sel.pair_class, widths, eps)  # (M', L)
        if distance == "mean":  # by Python numbers: a tensor of the widths would be a host-to-device copy
            db = torch.stack([db[:, k] / w for k, w in enumerate(widths)], 1)
        if sel.padded:  # padding entries: D_B = 0, so no inf * 0 in the loss or its gradient
            db = torch.where(sel.valid[:, None], db, torch.zeros_like(db))
        if sel.on_host:  # the same means in numpy: a few microseconds instead of a dozen tensor ops
            d = db.detach().numpy()[sel.valid.numpy()]  # (valid pairs, L)
            if not d.shape[0]:
                undefined = torch.full((db.shape[1],), float("nan"), dtype=db.dtype)
                return db, undefined, undefined.clone()
            d = d.astype(np.float64)  # rho in float64: exp(-D_B) is 0 in float32 from D_B ~ 104, here from ~ 745
            return db, torch.from_numpy(np.exp(-d).mean(0)), torch.from_numpy(d.mean(0))
        with torch.no_grad():
            valid = sel.valid.to(torch.float64)
            n = valid.sum()
            n = torch.where(n > 0, n, float("nan"))  # no valid pair: the means are undefined, not 0
            rho_mean = (valid @ torch.exp(-db.detach().double())) / n
            db_mean = (valid @ db.detach().double()) / n
    return db, rho_mean, db_mean


def weighted_overlap(db: Tensor, sel: PairSelection) -> Tensor:
    """Every layer's ``L_layer = sum_pairs a rho / sum a``, rho = exp(-D_B), (L,).

    The design note's form, used as is by ``scale=fixed`` (a fixed lambda times a term that
    vanishes on wide layers, where rho underflows, legitimately vanishes). 0 when no pair is
    valid or all weights are 0.
    """
    w = sel.weight.to(db.dtype)
    return (w @ torch.exp(-db)) / w.sum().clamp_min(torch.finfo(torch.float32).tiny)


class _AutoScaledOverlap(torch.autograd.Function):
    """The auto-scaled term ``s * L_bhat`` (``s = CE / L_bhat`` detached) from D_B in log space,
    with a closed-form backward.

    Forward, over the pairs that count (valid, weight a > 0) and never through rho:
    ``log L_layer = logsumexp_pairs(log a - D_B) - log sum a``, ``log L = logsumexp_layers(log
    L_layer) - log L``; the term's value is CE. Its gradient is ``CE d log L``:
    ``d term / d D_B[p, l] = -CE pi_l q_pl`` with ``pi = softmax_layers(log L_layer)`` and
    ``q_l = softmax_pairs(log a - D_B[:, l])`` (autograd's graph of the masks, the two
    logsumexps and ``CE exp(log L - stop(log L))`` is about twenty nodes on tiny tensors).
    Without a pair that counts the term is 0 with a zero gradient and ``log L`` a placeholder
    0. Returns ``(term, log L, active)``; only the term is differentiable.
    """

    @staticmethod
    def forward(ctx, db: Tensor, weight: Tensor, valid: Tensor, ce: Tensor):
        w = weight.to(db.dtype)
        ok = valid & (w > 0)  # (P,) pairs that count
        active = ok.any()
        log_w = torch.log(torch.where(ok, w, torch.ones_like(w)))  # (P,) finite everywhere
        # -inf outside the pairs that count; zeros when none counts (no NaN from logsumexp)
        scores = torch.where(ok[:, None], log_w[:, None] - db, float("-inf")).masked_fill_(~active, 0.0)  # (P, L)
        log_num = torch.logsumexp(scores, dim=0)  # (L,)
        log_layers = log_num - torch.log(torch.where(active, w.sum(), 1.0))  # (L,) log L_layer
        log_sum = torch.logsumexp(log_layers, 0)
        log_l = torch.where(active, log_sum - math.log(db.shape[1]), 0.0)
        ctx.save_for_backward(scores, log_num, log_layers, log_sum, active, ce)
        ctx.mark_non_differentiable(log_l, active)
        return torch.where(active, ce.detach().to(db.dtype), 0.0), log_l, active

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_term: Tensor, *_unused):
        scores, log_num, log_layers, log_sum, active, ce = ctx.saved_tensors
        q = torch.exp(scores - log_num)  # (P, L) softmax over the pairs, 0 where a pair does not count
        pi = torch.exp(log_layers - log_sum)  # (L,) softmax over the layers
        scale = (g_term * ce.to(scores.dtype)).neg_().mul_(active)  # 0-dim
        return q.mul_(pi * scale), None, None, None


def auto_scaled_overlap(db: Tensor, sel: PairSelection, ce: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(term, log L_bhat, active)`` of the auto-scaled term (:class:`_AutoScaledOverlap`): the
    term's value is CE (0 without a pair that counts) and its gradient is exactly that of
    ``s * L_bhat`` with ``s = CE / L_bhat`` detached, computed from ``log L_bhat`` so that it
    cannot underflow however small L_bhat is (on wide layers D_B is in the hundreds and
    ``exp(-D_B)`` is 0 in float32). ``log L_bhat`` is the log of the layers' mean of the
    confusion-weighted overlaps ``sum a rho / sum a``."""
    return _AutoScaledOverlap.apply(db, sel.weight, sel.valid, ce.detach())


def _logsumexp(a: np.ndarray) -> np.ndarray:
    """``torch.logsumexp(a, 0)`` in numpy, the same way (the maximum out, then the log of the sum)."""
    top = a.max(0)
    return np.log(np.exp(a - top).sum(0)) + top


class _HostGradient(torch.autograd.Function):
    """A 0-dim value whose gradient with respect to ``db`` the host has already computed (a
    numpy array of ``db``'s shape): the backward scales it by the incoming gradient."""

    @staticmethod
    def forward(ctx, db: Tensor, value: float, gradient: np.ndarray):
        ctx.gradient = gradient
        return torch.tensor(value, dtype=db.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        return torch.from_numpy(ctx.gradient * g.item()), None, None


@dataclass
class HostOverlap:
    """The term and its statistics as the host computes them (:func:`overlap_on_host`)."""

    term: Tensor  # 0-dim, differentiable with respect to db
    l_bhat: float
    log_l_bhat: float  # NaN without a pair that counts
    scale: float


def overlap_on_host(db: Tensor, sel: PairSelection, ce: Tensor, scale: str = "auto", lam: float = 1.0) -> HostOverlap:
    """The term of :func:`auto_scaled_overlap` (``scale="auto"``) or ``lam`` times the layers'
    mean of :func:`weighted_overlap` (``"fixed"``), with their gradients, in numpy: for CPU
    tensors with a host-made selection, where the host reads ``db`` (P', L) for free. About
    fifteen numpy calls on (P', L) arrays where the tensor route is about thirty small tensor
    operations. The same formulas (and ``db``'s dtype); the tests check both routes against
    each other and against ``s * L_bhat`` built from rho.

    ``"auto"``, over the pairs that count (valid, a > 0), with ``q_l = softmax_pairs(log a -
    D_B[:, l])`` and ``pi = softmax_layers(log L_layer)``: the value is CE and ``d term / d
    D_B[p, l] = -CE pi_l q_pl``; without a pair that counts, 0 with a zero gradient.
    ``"fixed"``: ``lam / L sum_l sum_p a_p rho_pl / sum a``, gradient ``-lam / L a_p rho_pl /
    sum a`` (0 when fewer than two classes are usable or every weight is 0).
    """
    d = db.detach().numpy()  # (P', L)
    layers = d.shape[1]
    w = sel.weight.numpy().astype(d.dtype)
    valid = sel.valid.numpy()
    ce_value = ce.item()
    gradient = np.zeros_like(d)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        ok = valid & (w > 0)  # (P',) pairs that count
        if ok.any():
            # the tensor route's operations in its order, so that both round alike
            scores = np.log(w[ok])[:, None] - d[ok]  # (n, L) log a - D_B
            log_num = _logsumexp(scores)  # (L,)
            log_layers = log_num - np.log(w.sum())  # (L,) log L_layer
            log_sum = _logsumexp(log_layers)
            log_l = log_sum - math.log(layers)  # log of the layers' mean
            l_bhat = float(np.exp(log_l))
        else:
            log_l, l_bhat = float("nan"), 0.0
        if scale == "auto":
            if ok.any():
                # -CE q_pl pi_l: q the softmax over the pairs, pi over the layers
                gradient[ok] = np.exp(scores - log_num) * (np.exp(log_layers - log_sum) * -ce_value)
                s = min(float(np.exp(np.log(d.dtype.type(ce_value)) - log_l)), float(np.finfo(np.float32).max))
                value = ce_value
            else:
                s = value = 0.0
        else:
            s = lam
            if int(sel.usable_classes) >= 2 and w.sum() > 0:
                rho = np.exp(-d)
                gradient = (w[:, None] * rho) * (-lam / (layers * w.sum()))
                l_bhat = float((w @ rho).sum() / (layers * w.sum()))
            else:
                l_bhat = 0.0
            value = lam * l_bhat
    return HostOverlap(_HostGradient.apply(db, value, gradient), l_bhat, float(log_l), s)


def multi_layer_bhattacharyya(
    features: Sequence[Tensor], sel: PairSelection, normalize: bool = False, eps: float = 1e-6,
    distance: str = "sum",
) -> tuple[Tensor, Tensor, Tensor]:
    """Every layer's confusion-weighted overlap ``sum a rho / sum a`` (:func:`weighted_overlap`
    of :func:`pair_distances`).

    Returns ``(loss, rho_mean, db_mean)``, each (L,): the weighted overlap (0 when no pair is
    valid or all weights are 0) and the unweighted means of rho and D_B over the valid pairs.
    """
    db, rho_mean, db_mean = pair_distances(features, sel, normalize, eps, distance)
    with no_autocast(db):
        return weighted_overlap(db, sel), rho_mean, db_mean


def pick_layers(names: list[str], layers: int | str) -> list[str]:
    """The last ``layers`` names in network order (all of them for ``"all"``)."""
    if layers == "all":
        return list(names)
    return list(names)[-int(layers):]


@dataclass
class BhattacharyyaHparams(BaseHparams):
    layers: int | str = 3  # how many of the last probed layers (the note: l2, l3, l4), or "all"
    top_M: int = 64  # confusable pairs per batch
    normalize: bool = False  # L2-normalise each layer's pooled features first
    scale: str = "auto"  # "auto": s = CE / L_bhat (detached); "fixed": s = lam
    lam: float = 1.0  # weight when scale == "fixed"
    eps: float = 1e-6  # variance floor in D_B
    distance: str = "sum"  # "sum": D_B over all dimensions (the method); "mean": D_B / D_l per layer

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers != "all" and not (isinstance(self.layers, int) and not isinstance(self.layers, bool)
                                         and self.layers >= 1):
            raise ValueError(f"layers must be an int >= 1 or 'all', got {self.layers!r}")
        if self.distance not in ("sum", "mean"):
            raise ValueError(f"distance must be 'sum' or 'mean', got {self.distance!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if self.top_M < 1 or self.eps <= 0 or self.lam < 0:
            raise ValueError("need top_M >= 1, eps > 0, lam >= 0")


@register_variant
class Bhattacharyya(Variant):
    """CE + s * L_bhat over the last ``layers`` probed layers (see module docstring).

    ``statistics`` lists the layer-independent statistics. Per probed layer ``<layer>`` (the
    keys of ``StepBatch.features``) it also returns ``rho_<layer>`` and ``db_<layer>``: the
    mean rho and mean D_B of the selected pairs (NaN without one). Classes and pairs used are the same for
    every layer (they depend on labels and logits only), so they are logged once.
    ``l_bhat`` is L_bhat (it underflows to 0 with rho on wide layers), ``log_l_bhat`` its
    natural log (readable there; NaN without a usable pair), ``scale`` the s multiplying it.
    """

    name = "bhattacharyya"
    Hparams = BhattacharyyaHparams
    search_space = {
        "layers": CategoricalDistribution([1, 2, 3, "all"]),
        "top_M": IntDistribution(16, 256, log=True),
        "normalize": CategoricalDistribution([False, True]),
        "scale": CategoricalDistribution(SCALES),
        "lam": FloatDistribution(0.01, 10.0, log=True),
        "distance": CategoricalDistribution(["sum", "mean"]),
    }
    statistics = ("l_bhat", "log_l_bhat", "scale", "classes_used", "pairs_used", "layers_used")
    # a batch without a usable pair: log 0, and means over no pair; averaged as missing
    maybe_undefined = ("log_l_bhat", "rho_*", "db_*")
    default_sampler = "pk"
    uses_features = True
    hp: BhattacharyyaHparams

    def compute(self, batch: StepBatch, ce: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        hp = self.hp
        if not batch.features:
            raise ValueError("bhattacharyya needs StepBatch.features (pooled intermediate layers)")
        names = pick_layers(list(batch.features), hp.layers)
        # Under torch.distributed: labels, logits (confusion only, no gradient) and features of
        # all ranks, the features with gradients, and the global mean CE for the auto scale, so
        # every rank computes the term of the global batch (carrot.geometry.distributed).
        logits, labels = gather_rows_no_grad(batch.logits), gather_rows_no_grad(batch.labels)
        features = [gather_rows(batch.features[name]) for name in names]
        ce_global = all_reduce_mean_no_grad(ce)  # the CE of the global batch (this batch's otherwise)
        sel = select_confusable_pairs(logits, labels, hp.top_M)
        db, rho_mean, db_mean = pair_distances(features, sel, hp.normalize, hp.eps, hp.distance)  # (M', L), (L,), (L,)
        stats: dict[str, Tensor] = {}
        for k, name in enumerate(names):
            stats[f"rho_{name}"] = rho_mean[k]
            stats[f"db_{name}"] = db_mean[k]
        if sel.on_host:  # the term and the statistics from (M', L) numbers the host reads for free
            host = overlap_on_host(db, sel, ce_global, hp.scale, hp.lam)
            usable = int(sel.usable_classes)
            values = np.array([host.l_bhat, host.log_l_bhat, host.scale, usable, int(sel.valid.sum()),
                               len(names) if usable >= 2 else 0], dtype=np.float32)
            stats.update(zip(self.statistics, torch.from_numpy(values).unbind()))
            return {"bhat": host.term}, stats

        layer_ok = (sel.usable_classes >= 2).float()  # same for every layer
        n_ok = layer_ok * len(names)
        with no_autocast(db):
            # log L_bhat: the mean over layers of L_layer, as logsumexp over layers - log L.
            term, log_l, active = auto_scaled_overlap(db, sel, ce_global)
            if hp.scale == "auto":
                with torch.no_grad():
                    l_bhat = torch.where(active, torch.exp(log_l), torch.zeros_like(log_l))
                    # s = CE / L_bhat; saturates at the float32 maximum where L_bhat underflows
                    # (log_l_bhat is the readable one there); 0 without a pair, not CE / 0.
                    s = torch.exp(torch.log(ce_global.detach()) - log_l).clamp_max(torch.finfo(torch.float32).max)
                    s = torch.where(active, s, torch.zeros_like(s))
            else:
                l_bhat = weighted_overlap(db, sel).sum() * layer_ok / n_ok.clamp_min(1.0)
                s = torch.full_like(l_bhat, hp.lam)
                term = s * l_bhat
        stats.update(
            l_bhat=l_bhat.detach(), log_l_bhat=torch.where(active, log_l.detach(), float("nan")), scale=s,
            classes_used=sel.usable_classes.float(), pairs_used=sel.valid.float().sum(), layers_used=n_ok,
        )
        return {"bhat": term}, stats
