"""``prototype`` (seed 000): confusion-weighted prototype separation.

An error-exponent (Chernoff / Bhattacharyya) proxy that pushes apart the prototypes of the
class pairs the model currently confuses most:

    L = CE + lambda(t) * L_carrot,   L_carrot = mean_{(i, j) in P} omega_ij exp(-alpha d2_ij),

with lambda(t) ramped linearly from 0 over ``warmup_epochs``.

State kept across steps (registered buffers, so they follow ``.to()`` and checkpoints):
    mu (K, D)   unit-norm class prototypes (EMA, momentum ``mu_momentum``);
    seen (K,)   classes that have a prototype;
    conf (K, K) soft confusion (EMA per present row, momentum ``conf_momentum``, zero diag);
    gram (K, K) Gram matrix of the stored prototypes in the metric space (a cache, below);
    mahalanobis only: cov (D, D) EMA within-class covariance, metric_factor (D, D) the
    factor L with d2 = ||(mu_i - mu_j) L||^2, refreshed every ``cov_refresh_every`` steps,
    and mu_metric (K, D) = mu L.
K and D are unknown at construction: the buffers are allocated on the first forward from
``logits.shape[1]`` and ``embedding.shape[1]`` (or call :meth:`PrototypeVariant.initialize_state`);
``load_state_dict`` into a fresh instance resizes them.

One step (B samples, C classes present):
1. conf row c <- (1 - m_conf) conf_c + m_conf * mean_{i: y_i = c} p_i for c present
   (p = softmax, optionally only each sample's top-``conf_topk`` probabilities, every
   probability tied with the ``conf_topk``-th included); other rows unchanged; diagonal 0.
   omega = (conf + conf^T) / 2.
2. **The fix to the sketch**: the loss uses prototypes that carry this batch's gradient,
   mu~_c = normalize((1 - beta) mu_c.detach() + beta * mean_{i: y_i = c} h_i) for c present,
   the stored (detached) prototype otherwise; the buffer stores mu~.detach(). (The sketch
   computed the loss from the no-grad buffer: no gradient reached the backbone.)
3. Pairs P: for every seen class i its top-m neighbours by omega (every seen class whose
   omega_ij reaches row i's m-th largest, so ties at that value are all kept where topk
   would pick some), deduplicated as unordered pairs (K x K mask, OR its transpose, upper
   triangle) and kept where omega > 0 (a zero-weight "neighbour" is an arbitrary tie, and
   counting it would only dilute the mean). The mean is a masked sum over the mask count:
   no data-dependent shape. On the CPU each row's m-th largest comes from numpy's
   vectorised sort (:func:`carrot.geometry.kth_largest`).
4. d2_ij = ||t_i - t_j||^2 with t = mu~ (euclidean; whitening, where h already passed V),
   or t = mu~ L (mahalanobis: Sigma_s = (1 - s) Sigma_w / (tr Sigma_w / D) + s I = C C^T,
   L = C^{-T}, so d2 = (mu_i - mu_j)^T Sigma_s^{-1} (mu_i - mu_j)). Sigma_w is scaled to mean
   eigenvalue 1 so an isotropic within-class spread gives back the euclidean d2 and alpha
   keeps its meaning across metrics.

Cost: only the present rows of t change in a step, so d2 comes from the cached Gram of the
stored prototypes with the rows and columns of the present classes recomputed: one
(B, D) x (D, K) product, O(B K D) like the head itself, instead of O(K^2 D) for all pairs or
O(K m D) for gathered pair differences. The classes of a batch occupy its class slots
(:func:`carrot.geometry.class_slots`; a (K, B) one-hot maps each class to its slot): fixed
shapes, no host sync. Where both classes are present the product t_i . stop(t_j) is
symmetrised as r_ij + r_ji - stop(r_ij), which keeps the value and the exact gradient with
respect to both prototypes without a second (B, B, D) product.
All of it runs in float32 with autocast off.

Whitening (the note's second route): the neck is normalise-then-V, V a bias-free D x D
linear map initialised to the identity; the head sees V h, prototypes and distances are
taken on V h, and ``whiten_weight * ||V^T V - I||_F^2`` is added (estimated with
``whiten_probes`` Rademacher probes, E||(V^T V - I) g||^2 = ||V^T V - I||_F^2, because the
exact penalty costs O(D^3) per step; 0 probes = exact).

Under torch.distributed the labels are all-gathered and the per-class sums, the confusion
sums and the covariance scatter are all-reduced before the EMA, so every rank computes the
same L_carrot as one process on the global batch. The sums go through an autograd-aware
all-reduce: its backward sums the ranks' (equal) gradients, so each rank's embeddings get W
times their share, which DDP's average over the W ranks turns into the single-process
gradient (:mod:`carrot.geometry.distributed`; the former local-gradient trick,
``local + (global - local).detach()``, gave 1 / W of it). Ranks must use equal batch sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from torch import Tensor, nn

from carrot.geometry import kth_largest, slot_sums, symmetric_confusion, used_class_slots
from carrot.geometry.distributed import (
    all_reduce_sum, all_reduce_sum_no_grad, gather_rows_no_grad, local_rows,
)
from carrot.variants import register_variant
from carrot.variants.base import BaseHparams, L2Normalize, StepBatch, Variant, linear_ramp

METRICS = ("euclidean", "mahalanobis", "whitening")


# ------------------------------------------------------------------ functional core
class _BlendedPrototypes(torch.autograd.Function):
    """``normalize((1 - beta) mu + beta means)`` row-wise with a closed-form backward:
    ``dmeans = beta r (g - u (g . u))``, ``u`` the output and ``r`` one over the blend's norm
    (0 for a zero row, which stays 0 with a zero gradient, as :func:`carrot.geometry.l2_normalize`)."""

    @staticmethod
    def forward(ctx, mu: Tensor, means: Tensor, momentum: float) -> Tensor:
        v = torch.lerp(mu, means, momentum)  # (R, D) (1 - beta) mu + beta means
        norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)  # (R, 1)
        r = norm.reciprocal().masked_fill_(norm <= 1e-12, 0.0)  # (R, 1)
        out = v.mul_(r)
        ctx.save_for_backward(out, r)
        ctx.momentum = momentum
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        out, r = ctx.saved_tensors
        dot = torch.linalg.vecdot(g, out).unsqueeze(-1)  # (R, 1)
        return None, g.addcmul(out, dot, value=-1.0).mul_(r * ctx.momentum), None


def blend_prototypes(mu: Tensor, means: Tensor, momentum: float) -> Tensor:
    """mu~ = normalize((1 - beta) mu.detach() + beta * means), row-wise, (R, D).

    ``means`` are this batch's class means, so mu~ carries the batch gradient (the fix to the
    sketch). A never-seen class (mu = 0) starts at its normalised batch mean.
    """
    return _BlendedPrototypes.apply(mu.detach(), means, momentum)


def confusion_sums(logits: Tensor, y: Tensor, topk: int = 0, num_slots: int | None = None) -> Tensor:
    """Sum over the samples of each slot ``y`` (a class, or a batch slot) of their softmax
    probabilities, with ``topk > 0`` only each sample's ``topk`` largest, (num_slots, K) (K x K
    by default), no grad. A sample keeps every probability at or above its ``topk``-th largest:
    where several tie at that value all of them count (``torch.topk`` would keep an arbitrary
    few). The sums are :func:`carrot.geometry.slot_sums` of the kept probabilities."""
    k = logits.shape[1]
    slots = k if num_slots is None else num_slots
    with torch.no_grad():
        p = F.softmax(logits.detach().float(), dim=1)  # (B, K)
        if 0 < topk < k:
            p.mul_(p >= kth_largest(p, topk)[:, None])
        return slot_sums(p, y, slots)


def blend_confusion_rows(rows: Tensor, sums: Tensor, counts: Tensor, labels: Tensor, momentum: float,
                         all_present: bool = False) -> Tensor:
    """New confusion rows, (R, K): ``(1 - m) rows + m sums / n`` where ``n > 0`` (kept
    otherwise), each row's own class (``labels``, (R,)) at 0. No grad. ``all_present``: every
    ``n`` is > 0 (the host's used slots), so no row is kept."""
    with torch.no_grad():
        if all_present:
            return torch.lerp(rows, sums / counts[:, None], momentum).scatter_(1, labels[:, None], 0.0)
        mean = sums / counts.clamp_min(1.0)[:, None]  # (R, K)
        step = (counts > 0).to(rows.dtype).mul_(momentum)[:, None]  # (R, 1) m, or 0 on rows without samples
        return torch.lerp(rows, mean, step).scatter_(1, labels[:, None], 0.0)


def update_confusion(conf: Tensor, sums: Tensor, counts: Tensor, momentum: float) -> Tensor:
    """conf_c <- (1 - m) conf_c + m sums_c / n_c for present classes; others kept; diag 0."""
    return blend_confusion_rows(conf, sums, counts, torch.arange(conf.shape[0], device=conf.device), momentum)


def neighbour_pairs(omega: Tensor, top_m: int, valid: Tensor) -> Tensor:
    """Unordered pairs {i, j} with j among i's top-m neighbours by omega (or i among j's).

    Only classes with ``valid`` (K,) bool take part and only pairs with omega > 0 are kept.
    A row's neighbours are the classes at or above its m-th largest weight: where several tie
    at that value all of them are kept (``torch.topk`` would keep an arbitrary few).
    Returns a (K, K) bool mask, strictly upper-triangular (each pair once).
    """
    k = omega.shape[0]
    m = min(top_m, k - 1)
    if m < 1:
        return torch.zeros(k, k, dtype=torch.bool, device=omega.device)
    # Only positive weights between two valid classes count, so everything else may rank as 0:
    # it never displaces a positive neighbour, and the threshold's floor (the smallest positive
    # number) drops every 0.
    v = valid.to(omega.dtype)
    score = omega * torch.outer(v, v)  # (K, K)
    score.fill_diagonal_(0.0)
    info = torch.finfo(score.dtype)
    chosen = score >= kth_largest(score, m).clamp_min(info.smallest_normal * info.eps)[:, None]  # (K, K)
    return (chosen | chosen.T).triu(1)


def _weighted_overlap(ctx, raw: Tensor, weight: Tensor, alpha: float, gram: Tensor,
                      *saved: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The end of both pair losses' forward. From the raw squared distances (G_ii + G_jj -
    2 G_ij, any shape): ``d2`` clamped >= 0 against round-off and the loss ``sum weight
    exp(-alpha d2)``; saves for the backward its terms where the clamp passes the gradient (0
    elsewhere), which the backward scales, then ``saved``. Returns ``(loss, gram, d2)``, the
    last two not differentiable."""
    d2 = raw.clamp_min(0.0)
    weighted = torch.mul(d2, -alpha).exp_().mul_(weight)
    loss = weighted.sum()
    ctx.save_for_backward(weighted.mul_(raw >= 0), *saved)
    ctx.alpha = alpha
    ctx.mark_non_differentiable(gram, d2)
    ctx.set_materialize_grads(False)  # the backward reads g_loss only, None where the loss is not used
    return loss, gram, d2


class _PairGramLoss(torch.autograd.Function):
    """``sum_ij W_ij exp(-alpha d2_ij)`` from the Gram rows of the present classes, closed-form backward.

    Forward (see :func:`prototype_pair_loss`): ``R = t_slots stop(t_buffer)^T`` (S, K), its
    rows moved to their classes by the (K, S) one-hot, spliced into the stored Gram
    (``r_ij + r_ji - stop(r_ij)`` where both classes are present), ``d2_ij = G_ii + G_jj -
    2 G_ij`` clamped >= 0, and the weighted sum. Backward, with ``E = -alpha W exp(-alpha d2)``
    where the clamp passes the gradient and ``A = E + E^T``: ``dL/dG + (dL/dG)^T =
    2 (diag(A 1) - A)`` (d2 is a Laplacian form of G), every present row ``r_i`` reads
    both ``G_ij`` and ``G_ji``, so ``dL/dR = 2 (onehot^T diag(A 1) - onehot^T A)`` and
    ``dL/dt_slots = dL/dR t_buffer``: one (S, K) x (K, D) product after two K x K passes
    (autograd's graph of the splice would keep and walk a dozen K x K buffers).

    Returns ``loss`` (0-dim), and, not differentiable, ``gram`` and ``d2`` (K, K).
    """

    @staticmethod
    def forward(ctx, t_slots: Tensor, t_buffer: Tensor, one_hot: Tensor, stored_gram: Tensor, weight: Tensor,
                alpha: float):
        present = one_hot.sum(1) > 0  # (K,)
        rows = one_hot @ (t_slots @ t_buffer.T)  # (K, K): row c from its slot, 0 if absent
        # column j of a present class from its row (where both are present, r_ji: the value of
        # r_ij + r_ji - stop(r_ij)), row i of a present class from its row, else the stored Gram
        gram = torch.where(present, rows.T, torch.where(present[:, None], rows, stored_gram))
        sq = gram.diagonal()
        raw = torch.add(sq[:, None], sq[None, :]).sub_(gram, alpha=2.0)  # (K, K)
        return _weighted_overlap(ctx, raw, weight, alpha, gram, one_hot, t_buffer)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss: Tensor | None, *_unused):
        if g_loss is None:
            return None, None, None, None, None, None
        weighted, one_hot, t_buffer = ctx.saved_tensors
        e = weighted * (-ctx.alpha * g_loss)  # (K, K) dL/dd2
        a = e + e.T
        onehot_t = one_hot.T  # (S, K)
        g_r = (onehot_t * a.sum(1)).sub_(onehot_t @ a).mul_(2.0)  # (S, K) dL/dR
        return g_r @ t_buffer, None, None, None, None, None


class _PairListLoss(torch.autograd.Function):
    """:class:`_PairGramLoss` over the list of selected pairs instead of every K x K entry, for
    a step whose slots are all used and whose pairs the host can list (CPU).

    Forward: ``R = t_slots stop(t_buffer)^T`` (C, K); the new Gram is the stored one with the
    present classes' rows, then columns, copied from R (where both are present the column
    write leaves ``r_ji``, the value of ``r_ij + r_ji - stop(r_ij)``); over the P selected pairs
    (i < j) ``d2 = G_ii + G_jj - 2 G_ij`` clamped >= 0 and ``sum_p w_p exp(-alpha d2_p)``.
    Backward, with ``e_p = -alpha w_p exp(-alpha d2_p)`` where the clamp passes the gradient:
    the dense ``dL/dR = 2 (onehot^T diag(A 1) - onehot^T A)``, ``A = E + E^T``, has on the row
    of a present class c ``2 sum_{p ∋ c} e_p`` at column c and ``-2 e_p`` at the pair's other
    class: scatters of the P pairs' e_p, then ``dL/dR t_buffer``.
    Returns ``loss`` (0-dim) and, not differentiable, the new Gram (K, K) and ``d2`` (P,).
    """

    @staticmethod
    def forward(ctx, t_slots: Tensor, t_buffer: Tensor, labels: Tensor, stored_gram: Tensor, first: Tensor,
                second: Tensor, weight: Tensor, alpha: float):
        rows = t_slots @ t_buffer.T  # (C, K) the present classes' rows
        gram = stored_gram.clone().index_copy_(0, labels, rows).index_copy_(1, labels, rows.T)  # (K, K)
        sq = gram.diagonal()
        raw = sq.index_select(0, first).add_(sq.index_select(0, second)).sub_(gram[first, second], alpha=2.0)  # (P,)
        return _weighted_overlap(ctx, raw, weight, alpha, gram, labels, first, second, t_buffer)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss: Tensor | None, *_unused):
        if g_loss is None:
            return (None,) * 8
        weighted, labels, first, second, t_buffer = ctx.saved_tensors
        k = t_buffer.shape[0]
        e = weighted.new_zeros(k, k).index_put_((first, second), weighted)  # (K, K) upper: pairs are unique
        rows = (e + e.T).index_select(0, labels)  # (C, K) rows of A / (-alpha g) at the present classes
        own = (torch.arange(labels.shape[0], device=labels.device), labels)
        g_r = rows.index_put_(own, -rows.sum(1)).mul_(2.0 * ctx.alpha * g_loss)  # A's diagonal is 0
        return g_r @ t_buffer, None, None, None, None, None, None, None


def prototype_pair_loss(t_slots: Tensor, t_buffer: Tensor, one_hot: Tensor | None, stored_gram: Tensor, omega: Tensor,
                        mask: Tensor, alpha: float,
                        labels: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """L_carrot = sum_{mask} omega_ij exp(-alpha d2_ij) / |mask| (0 when the mask is empty).

    ``t_slots`` (S, D) are this step's prototypes in the metric space (with the gradient),
    ``t_buffer`` (K, D) every class's stored one with the present rows already replaced
    (detached), ``one_hot`` (K, S) maps each present class to its slot, ``stored_gram``
    (K, K) is the Gram of the stored prototypes. d2_ij = G_ii + G_jj - 2 G_ij (clamped >= 0
    against round-off) from the Gram G of the prototypes: the stored Gram with the rows and
    columns of the present classes recomputed; where both classes are present
    ``G_ij = r_ij + r_ji - stop(r_ij)``, ``r_ij = t_i . stop(t_j)``, which has the value
    t_i . t_j and its exact gradient with respect to both prototypes. omega and the mask
    carry no gradient (:class:`_PairGramLoss` has the backward).

    ``labels`` (C,), the class of each slot, says that every slot is used and that the host
    can list the selected pairs (CPU): the loss then runs over that list
    (:class:`_PairListLoss`, the same numbers) instead of every K x K entry, and ``one_hot``
    is not read (None will do).

    Returns the loss, the new Gram (K, K, detached) and ``pairs``, ``omega_mean``, ``d2_mean``
    over the selected pairs (the means NaN when no pair is selected).
    """
    if labels is not None:  # every slot used and the host can list the pairs (CPU): the pair list
        with torch.no_grad():
            first, second = mask.nonzero(as_tuple=True)  # (P,) each, i < j
            count = max(1, first.shape[0])
            weight = omega.detach()[first, second] / count  # (P,)
        loss, gram, d2 = _PairListLoss.apply(t_slots, t_buffer.detach(), labels, stored_gram, first, second, weight,
                                            alpha)
        pairs = torch.tensor(float(first.shape[0]), device=t_slots.device)
        if not first.shape[0]:  # no pair: the means are undefined, not 0
            undefined = torch.full((), float("nan"), device=t_slots.device)
            return loss, gram, {"pairs": pairs, "omega_mean": undefined, "d2_mean": undefined.clone()}
        return loss, gram, {"pairs": pairs, "omega_mean": weight.sum(), "d2_mean": d2.sum() / count}
    with torch.no_grad():
        w = mask.to(t_slots.dtype)
        count = w.sum()
        w = w / count.clamp_min(1.0)
        weight = omega.detach() * w  # (K, K) omega_ij / |mask| on the selected pairs
    loss, gram, d2 = _PairGramLoss.apply(t_slots, t_buffer.detach(), one_hot, stored_gram, weight, alpha)
    some = count > 0  # no pair: the means are undefined, not 0
    stats = {"pairs": count, "omega_mean": torch.where(some, weight.sum(), float("nan")),
             "d2_mean": torch.where(some, (d2 * w).sum(), float("nan"))}
    return loss, gram, stats


def within_class_scatter(h: Tensor, group: Tensor, means: Tensor) -> Tensor:
    """sum_i (h_i - mu_{g_i})(h_i - mu_{g_i})^T, (D, D), no grad.

    ``group`` (B,) indexes the rows of ``means`` (class means, by class or by batch slot).
    """
    with torch.no_grad():
        dev = h.detach().float() - means.detach()[group]  # (B, D)
        return dev.T @ dev


def shrunk_metric_factor(cov: Tensor, shrinkage: float) -> Tensor:
    """L (D, D) with (mu_i - mu_j) L L^T (mu_i - mu_j)^T = Delta^T Sigma_s^{-1} Delta.

    Sigma_s = (1 - s) Sigma / (tr Sigma / D) + s I (identity when tr Sigma = 0); with the
    Cholesky factor Sigma_s = C C^T, L = C^{-T}. Computed in float64, returned in cov.dtype.
    """
    with torch.no_grad():
        d = cov.shape[0]
        c64 = cov.double()
        tr = torch.diagonal(c64).sum()
        eye = torch.eye(d, dtype=torch.float64, device=cov.device)
        scaled = torch.where(tr > 0, c64 * (d / tr.clamp_min(1e-300)), eye)
        sigma = (1.0 - shrinkage) * scaled + shrinkage * eye
        chol, _ = torch.linalg.cholesky_ex(0.5 * (sigma + sigma.T))
        chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)  # C^{-1}
        return chol_inv.T.to(cov.dtype)


def orthogonality_penalty(v: Tensor, probes: int = 0, generator: torch.Generator | None = None) -> Tensor:
    """||V^T V - I||_F^2, exactly (probes = 0, O(D^3)) or by Hutchinson with Rademacher probes.

    With A = V^T V - I and g uniform on {-1, 1}^D, E||A g||^2 = ||A||_F^2, so the estimate and
    its gradient are unbiased; each probe costs two matrix-vector products, O(D^2).
    """
    v = v.float()
    d = v.shape[1]
    if probes <= 0:
        a = v.T @ v - torch.eye(d, dtype=v.dtype, device=v.device)
        return (a * a).sum()
    g = torch.randint(0, 2, (d, probes), generator=generator, device=v.device).to(v.dtype) * 2.0 - 1.0  # (D, s)
    ag = v.T @ (v @ g) - g  # (D, s)
    return (ag * ag).sum() / probes


# ------------------------------------------------------------------ variant
@dataclass
class PrototypeHparams(BaseHparams):
    lam: float = 1.0  # weight of L_carrot after the ramp
    alpha: float = 10.0  # steepness of exp(-alpha d2) (the note: 5 to 30, 10 to start)
    top_m: int = 20  # neighbours per class (the note: 10-30 for CUB/Cars); clamped to K-1
    mu_momentum: float = 0.05  # beta, prototype EMA
    conf_momentum: float = 0.05  # soft-confusion EMA
    conf_topk: int = 20  # top-k probabilities per sample in the confusion update (0 = all)
    metric: str = "euclidean"  # euclidean | mahalanobis | whitening
    warmup_epochs: float = 2.0  # lambda ramps 0 -> lam over these epochs (the note: 1-5)
    cov_refresh_every: int = 100  # steps between refreshes of the Mahalanobis factor
    cov_shrinkage: float = 0.1  # s in Sigma_s = (1 - s) Sigma_w / (tr/D) + s I
    cov_momentum: float = 0.05  # within-class covariance EMA
    whiten_weight: float = 0.1  # weight of ||V^T V - I||_F^2 (metric = whitening)
    whiten_probes: int = 4  # Hutchinson probes for that penalty (0 = exact, O(D^3))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        for name in ("mu_momentum", "conf_momentum", "cov_momentum"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 < self.cov_shrinkage <= 1.0:
            raise ValueError(f"cov_shrinkage must be in (0, 1], got {self.cov_shrinkage}")
        if self.top_m < 1 or self.cov_refresh_every < 1:
            raise ValueError("top_m and cov_refresh_every must be >= 1")
        if min(self.lam, self.alpha, self.warmup_epochs, self.whiten_weight) < 0 or self.conf_topk < 0 \
                or self.whiten_probes < 0:
            raise ValueError("lam, alpha, warmup_epochs, whiten_weight, conf_topk, whiten_probes must be >= 0")


_STATE = ("mu", "seen", "conf", "gram", "cov", "metric_factor", "mu_metric")


@register_variant
class PrototypeVariant(Variant):
    """CE + lambda(t) * confusion-weighted exp(-alpha d2) between EMA class prototypes."""

    name = "prototype"
    Hparams = PrototypeHparams
    search_space = {
        "lam": FloatDistribution(0.1, 30.0, log=True),
        "alpha": FloatDistribution(5.0, 30.0),
        "top_m": IntDistribution(10, 30),
        "mu_momentum": FloatDistribution(0.01, 0.3, log=True),
        "conf_momentum": FloatDistribution(0.01, 0.3, log=True),
        "conf_topk": CategoricalDistribution([0, 5, 10, 20]),
        "metric": CategoricalDistribution(METRICS),
        "warmup_epochs": FloatDistribution(1.0, 5.0),
        "cov_refresh_every": IntDistribution(20, 500, log=True),
        "cov_shrinkage": FloatDistribution(0.01, 0.9, log=True),
        "whiten_weight": FloatDistribution(1e-3, 1.0, log=True),
    }
    statistics = ("l_carrot", "lambda", "pairs", "omega_mean", "d2_mean")
    maybe_undefined = ("omega_mean", "d2_mean")  # no pair selected yet (the first step): averaged as missing
    default_sampler = "random"

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        for name in _STATE:
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._steps = 0  # host mirror of ``steps``: the refresh schedule needs no device read
        self._whitener: list[nn.Linear] = []  # the neck's V; a plain list so it is not a submodule twice

    def floor_products(self, batch: int, num_classes: int, dim: int,
                       slots: int | None = None) -> tuple[tuple[int, int, int], ...]:
        """The Gram rows of the batch's class slots, ``t_slots stop(t_buffer)^T`` and its backward
        (one head pass without the weight gradient), over ``slots`` rows (the C classes of the
        batch on CPU, all B slots on CUDA); with the metric's D x D map, its products."""
        s = batch if slots is None else slots
        gram = ((s, dim, num_classes), (s, num_classes, dim))
        if self.hp.metric == "mahalanobis":  # t = mu L forward and backward
            return gram + ((s, dim, dim), (s, dim, dim))
        if self.hp.metric == "whitening":  # the neck's V: forward, and the input and weight gradients
            return gram + ((batch, dim, dim), (batch, dim, dim), (dim, batch, dim))
        return gram

    # ------------------------------------------------------------- state handling
    def build_neck(self, dim: int) -> nn.Module:
        """L2 normalisation, then (metric = whitening) V: bias-free Linear(dim, dim), V = I."""
        if self.hp.metric != "whitening":
            return L2Normalize()
        v = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            v.weight.copy_(torch.eye(dim))
        self._whitener = [v]
        return nn.Sequential(L2Normalize(), v)

    def initialize_state(self, num_classes: int, dim: int, device: torch.device | str | None = None) -> None:
        """Allocate the state for K = ``num_classes`` and D = ``dim`` (done lazily otherwise)."""
        if self.mu.shape == (num_classes, dim):
            return
        if self.mu.numel():
            raise ValueError(f"prototype state is {tuple(self.mu.shape)}, got K={num_classes}, D={dim}")
        device = self.steps.device if device is None else device
        f32 = {"dtype": torch.float32, "device": device}
        self.mu = torch.zeros(num_classes, dim, **f32)
        self.seen = torch.zeros(num_classes, dtype=torch.bool, device=device)
        self.conf = torch.zeros(num_classes, num_classes, **f32)
        self.gram = torch.zeros(num_classes, num_classes, **f32)
        if self.hp.metric == "mahalanobis":
            self.cov = torch.zeros(dim, dim, **f32)
            self.metric_factor = torch.eye(dim, **f32)
            self.mu_metric = torch.zeros(num_classes, dim, **f32)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        for name in _STATE:  # lazily allocated buffers take the checkpoint's shape
            key = prefix + name
            if key in state_dict and self._buffers[name].numel() == 0:
                src = state_dict[key]
                self._buffers[name] = torch.empty(src.shape, dtype=src.dtype, device=self.steps.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._steps = int(self.steps)

    # ------------------------------------------------------------- one step
    def compute(self, batch: StepBatch, ce: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        # float32 even under autocast (SPEC): bf16 dot products of unit vectors carry ~1e-2
        # errors in d2, i.e. ~10 % in exp(-alpha d2) at alpha = 10.
        with torch.autocast(batch.embedding.device.type, enabled=False):
            return self._compute(batch)

    def _compute(self, batch: StepBatch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        hp = self.hp
        h = batch.embedding.float()  # (B, D): what the head sees (normalised, or V h)
        y = batch.labels.long()
        b, k, d = h.shape[0], batch.logits.shape[1], h.shape[1]
        self.initialize_state(k, d, h.device)
        update = self.training

        with torch.no_grad():
            # Class slots of all ranks' samples (S = world size x B under DDP). On CUDA all S
            # slots, one_hot mapping each present class to its slot: fixed shapes, no host sync.
            # On the CPU the C classes' slots only (slot_counts, slot_labels (C,)).
            y_all = gather_rows_no_grad(y)  # (S,)
            inv_all, slot_counts, slot_labels, used = used_class_slots(y_all)
            if used is None:
                one_hot = (torch.arange(k, device=h.device)[:, None] == slot_labels[None, :]) & (slot_counts > 0)
                one_hot = one_hot.float()  # (K, S)
                present = one_hot.sum(1) > 0  # (K,)
                rows_of = (y_all,), inv_all  # the buffers' rows: every sample writes its class's row
            else:  # the C used slots hold distinct classes: no one-hot, one write per class
                one_hot = None
                present = torch.zeros(k, dtype=torch.bool, device=h.device).index_fill_(0, slot_labels, True)
                rows_of = (slot_labels,), None
            slots = len(slot_counts)
            # The confusion rows of the present classes, by slot: (S, K) sums, not (K, K).
            inv = local_rows(inv_all, b)  # (B,) this rank's samples
            slot_conf = all_reduce_sum_no_grad(confusion_sums(batch.logits, inv, hp.conf_topk, slots))  # (S, K)
            rows = blend_confusion_rows(self.conf.index_select(0, slot_labels), slot_conf, slot_counts, slot_labels,
                                        hp.conf_momentum, all_present=used is not None)  # (S, K)
            target = slot_labels
            if used is None:  # unused slots (label 0) write slot 0's row again: repeated indices, equal values
                in_use = slot_counts > 0
                target, rows = torch.where(in_use, slot_labels, slot_labels[:1]), torch.where(in_use[:, None], rows,
                                                                                              rows[:1])
            conf = self.conf.index_put_((target,), rows) if update else self.conf.index_put((target,), rows)
            omega = symmetric_confusion(conf)
            seen = self.seen | present
            mask = neighbour_pairs(omega, hp.top_m, seen)  # (K, K)

        sums = all_reduce_sum(slot_sums(h, inv, slots))  # (S, D) over all ranks, with gradient
        slot_means = sums / slot_counts.clamp_min(1.0)[:, None]  # (S, D) class means, 0 on unused slots
        if hp.metric == "mahalanobis" and update:
            self._update_covariance(h, inv, slot_means, slot_counts)

        # mu~ of the present classes, carrying the batch gradient (the fix), (S, D); rows of
        # unused slots are never read.
        mu_slots = blend_prototypes(self.mu.index_select(0, slot_labels), slot_means, hp.mu_momentum)
        t_slots = mu_slots @ self.metric_factor if hp.metric == "mahalanobis" else mu_slots  # (S, D)
        # The stored prototypes with the present rows replaced by mu~ (detached). Training
        # writes them into the buffer in place before the graph reads it; evaluation copies.
        # With all B slots, every sample writes its class's row: repeated indices, equal values.
        with torch.no_grad():
            where, pick = rows_of

            def written(t: Tensor) -> Tensor:  # (S, D) by slot -> the rows written at ``where``
                return t.detach() if pick is None else t.detach().index_select(0, pick)

            buffer = self.mu_metric if hp.metric == "mahalanobis" else self.mu
            new = written(t_slots)
            t_buffer = buffer.index_put_(where, new) if update else buffer.index_put(where, new)  # (K, D)
            if update and hp.metric == "mahalanobis":
                self.mu.index_put_(where, written(mu_slots))
        # Gram matrix of the prototypes: the rows of present classes are one (S, D) x (D, K)
        # product, the step's O(B K D) part, with the gradient on the row side.
        l_carrot, gram, pair_stats = prototype_pair_loss(t_slots, t_buffer, one_hot, self.gram, omega, mask,
                                                         hp.alpha, labels=None if used is None else slot_labels)
        lam_t = hp.lam * linear_ramp(batch.progress, hp.warmup_epochs)

        if update:
            with torch.no_grad():
                self.seen = seen
                self.conf = conf
                self.gram = gram
                self._steps += 1
                self.steps.fill_(self._steps)

        terms = {"carrot": lam_t * l_carrot}
        if hp.metric == "whitening":
            penalty = (orthogonality_penalty(self._whitener[0].weight, hp.whiten_probes)
                       if self._whitener else l_carrot.new_zeros(()))
            terms["whiten"] = hp.whiten_weight * penalty
        stats = {"l_carrot": l_carrot, "lambda": torch.full((), lam_t, device=h.device), **pair_stats}
        return terms, stats

    def _update_covariance(self, h: Tensor, slot: Tensor, slot_means: Tensor, slot_counts: Tensor) -> None:
        """EMA of the within-class covariance; refresh the metric factor every N steps."""
        hp = self.hp
        scatter = all_reduce_sum_no_grad(within_class_scatter(h, slot, slot_means))  # (D, D), all ranks
        dof = slot_counts.sum() - (slot_counts > 0).sum()  # sum_c (n_c - 1), global
        # No bias correction for the zero start: the factor only sees Sigma / (tr Sigma / D).
        step = torch.where(dof > 0, hp.cov_momentum, 0.0)
        self.cov = (1.0 - step) * self.cov + step * scatter / dof.clamp_min(1)
        if self._steps % hp.cov_refresh_every == 0:
            self.metric_factor = shrunk_metric_factor(self.cov, hp.cov_shrinkage)
            self.mu_metric = self.mu @ self.metric_factor
            self.gram = self.mu_metric @ self.mu_metric.T
