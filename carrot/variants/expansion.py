"""``expansion`` (seed 001): the parameter-free expansion operator.

On L2-normalised embeddings, every class in the batch is blown up about its centroid until
its RMS radius reaches half the distance to the nearest other centroid,

    gamma_c = max(1, m_c / (2 r_c + eps)),   z+ = normalize(mu_c + gamma_c (z - mu_c)),

and the model is asked to classify z+ like z (mode ``kl``) or to treat z and z+ as two
views of one sample (mode ``supcon``). Needs P x K batches (every class >= 2 samples).

Under torch.distributed the statistics (centroids, radii, gamma) come from the all-gathered
z and y and each rank transforms its own z: the KL and auxiliary CE are means over the
rank's own samples, SupCon is taken over the two views of the whole gathered batch (the same
value on every rank). The gather is autograd-aware, so with ``detach_stats=False`` the
gradient through the statistics reaches every rank's samples
(:mod:`carrot.geometry.distributed`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution
from torch import Tensor, nn

from carrot.geometry import (
    class_deviations, class_means, pairwise_sq_distance, rms_radius, slot_variance, sq_distance_to_distance,
    used_class_slots,
)
from carrot.geometry.distributed import gather_rows, gather_rows_no_grad, local_rows
from carrot.variants import register_variant
from carrot.variants.base import BaseHparams, L2Normalize, StepBatch, Variant, head_pass, linear_pass

MODES = ("kl", "supcon")


def _class_geometry(h: Tensor, inv: Tensor, counts: Tensor, eps: float) -> dict[str, Tensor]:
    """Centroids, deviations, radii, nearest other centroid and gamma of every class slot of ``h``.

    ``h`` (B, D) float32, unit rows; ``inv``, ``counts`` from :func:`carrot.geometry.used_class_slots`.
    Differentiable (``detach_stats=False``) or run under no_grad (the default path).
    """
    s = counts.shape[0]  # slots: B, or the C classes present where the host knows them
    mu, dev, _ = class_deviations(h, inv, s)  # (S, D), (B, D) = h - mu[inv]
    radius = rms_radius(slot_variance(dev, inv, counts))  # (S,)
    present = counts > 0  # (S,)
    eligible = counts >= 2  # (S,) classes whose radius means something

    # The nearest other centroid from the squared distances: ||.|| = f(d2) with f non-decreasing
    # (pairwise_distance's sqrt, 0 at 0), so min f = f(min), taken on (S,) instead of (S, S).
    d2 = pairwise_sq_distance(mu)  # (S, S)
    other = present[:, None] & present[None, :] & ~torch.eye(s, dtype=torch.bool, device=h.device)
    nearest = sq_distance_to_distance(torch.where(other, d2, torch.full_like(d2, float("inf"))).min(1).values)
    has_other = torch.isfinite(nearest)
    nearest = torch.where(has_other, nearest, torch.zeros_like(nearest))

    gamma = torch.clamp(nearest / (2.0 * radius + eps), min=1.0)  # (S,)
    gamma = torch.where(eligible & has_other, gamma, torch.ones_like(gamma))
    return {"mu": mu, "dev": dev, "gamma": gamma, "radius": radius, "nearest": nearest, "present": present,
            "eligible": eligible}


def _normalize_backward(g: Tensor, unit: Tensor, norm: Tensor, eps: float) -> Tensor:
    """Adjoint of ``F.normalize`` at ``x = unit * max(||x||, eps)``: ``(g - unit (g . unit)) / max(||x||, eps)``,
    the projection only where ``||x|| >= eps`` (where the clamp passes the gradient). A new (B, D) tensor."""
    dot = torch.linalg.vecdot(g, unit).unsqueeze(1) * (norm >= eps)  # (B, 1) g . unit
    return g.addcmul(unit, dot, value=-1.0).div_(norm.clamp_min(eps))


class _Expansion(torch.autograd.Function):
    """z+ of :func:`expansion_operator` with the statistics detached, closed-form backward.

    With mu and gamma constant, ``z+ = N(mu_i + gamma_i (h_i - mu_i))``, ``h = N(z)`` (``N`` =
    ``F.normalize``), so ``dz = N'(z)^T (gamma_i N'(e_i)^T g)``, each ``N'^T`` a projection and a
    scale per row: three (B, D) buffers in all (autograd's graph of the two normalisations, the
    moments and the blend would keep and walk about twenty).
    Returns ``z+`` (B, D) and, not differentiable, the slot statistics ``gamma``, ``radius``,
    ``nearest``, ``eligible``, ``present`` (S,), the norms ``||e_i||`` (B, 1), the 0-dim
    flag "two classes or more" and the centroids (S, D).
    """

    @staticmethod
    def forward(ctx, z: Tensor, inv: Tensor, counts: Tensor, eps: float, unit: bool):
        if unit:  # rows already unit (or 0): h = z, and the caller's normalisation projects the gradient
            h, z_norm = z, None
        else:
            z_norm = torch.linalg.vector_norm(z, dim=1, keepdim=True)  # (B, 1)
            h = z / z_norm.clamp_min(eps)  # F.normalize(z)
        geo = _class_geometry(h, inv, counts, eps)
        gamma_i = geo["gamma"][inv, None]  # (B, 1)
        e = geo["dev"].mul_(gamma_i).add_(geo["mu"].index_select(0, inv))  # (B, D) mu_i + gamma_i (h - mu_i), in dev's buffer
        e_norm = torch.linalg.vector_norm(e, dim=1, keepdim=True)
        expanded = e.div_(e_norm.clamp_min(eps))  # F.normalize(e)
        two_classes = geo["present"].sum() >= 2  # 0-dim device bool
        z_plus = torch.where(two_classes, expanded, h, out=expanded)
        ctx.save_for_backward(h, z_norm, expanded, e_norm, gamma_i, two_classes)
        ctx.eps, ctx.unit = eps, unit
        stats = [geo[k] for k in ("gamma", "radius", "nearest", "eligible", "present")] + [e_norm, two_classes,
                                                                                           geo["mu"]]
        ctx.mark_non_differentiable(*stats)
        ctx.set_materialize_grads(False)  # the backward reads g only, None where z+ is not used
        return (z_plus, *stats)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor | None, *_unused):
        if g is None:
            return None, None, None, None, None
        h, z_norm, expanded, e_norm, gamma_i, two_classes = ctx.saved_tensors
        g_h = _normalize_backward(g, expanded, e_norm, ctx.eps).mul_(gamma_i)  # (B, D) through e = mu + gamma (h - mu)
        g_h = torch.where(two_classes, g_h, g, out=g_h)
        if ctx.unit:
            return g_h, None, None, None, None
        return _normalize_backward(g_h, h, z_norm, ctx.eps), None, None, None, None


def _expanded_logits(logits: Tensor, bias: Tensor | None, inv: Tensor, gamma_i: Tensor, e_norm: Tensor,
                     two_classes: Tensor, eps: float) -> Tensor:
    """``z+ W^T + b`` from the logits ``h W^T + b`` of the unit rows h, (B, K), no grad.

    z+_i = (gamma_i h_i + (1 - gamma_i) mu_c) / ||e_i|| is a per-row combination of h_i and its
    class mean, so its logits are the same combination of ``A = logits - b`` and A's class mean.
    The combination cancels where gamma is large, so its float32 rounding grows with gamma: at
    B=64, D=2048, K=200 the largest error was 3e-7 at gamma 1 and 2e-6 at gamma 8 (z+ through
    the head: 3e-7), on logits of about 1.
    """
    with torch.no_grad():
        a = logits.detach().float()  # (B, K) float32, as z+
        if bias is not None:
            a = a - bias.detach().float()
        means = class_means(a, inv, a.shape[0])[0].index_select(0, inv)  # (B, K) A's class mean, row by row
        mixed = (a * gamma_i).add_(means * (1.0 - gamma_i)).div_(e_norm.clamp_min(eps))  # (B, K)
        out = torch.where(two_classes, mixed, a, out=mixed)
        return out if bias is None else out.add_(bias.detach().float())


class _FoldedLogits(torch.autograd.Function):
    """z+'s logits ``z+ W^T + b`` (given as ``value``) with their gradients folded into the
    batch's logits, for detached statistics (``detach_stats``) and unit rows h.

    With ``z+_i = (gamma_i h_i + (1 - gamma_i) mu_c) / ||e_i||`` (mu_c and gamma constant), the
    gradient ``g`` of z+'s logits reaches

    - h through ``g W`` projected off z+ and scaled: ``s_i (g_i W - (g_i . (l+_i - b)) z+_i)``
      with ``s_i = gamma_i / ||e_i||``; the ``s g W`` part is what the batch's logits
      ``h W^T + b`` pass on with ``s g`` as their gradient, so ``s g`` goes to the logits and
      only the rank-one correction along z+ to h;
    - W as ``g^T z+ = (s g)^T h + G^T mu``, G the per-class sums of ``(1 - gamma_i) / ||e_i|| g_i``:
      the first part again comes with the logits' gradient (the head's weight gradient), the
      second is a (K, C) x (C, D) product over the C classes present (C slots of ``mu``);
    - b as ``sum g``, of which ``sum s g`` comes with the logits.

    So the head's own two backward products carry z+'s gradient too, and the step needs no
    (B, K) x (K, D) product of its own. With fewer than two classes z+ = h: ``s = 1``, no
    correction and no G (``two_classes``, a device flag).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, value: Tensor, z_plus: Tensor,
                gamma_i: Tensor, e_norm: Tensor, two_classes: Tensor, inv: Tensor, mu: Tensor, eps: float) -> Tensor:
        inv_norm = e_norm.clamp_min(eps).reciprocal()  # (B, 1)
        scale = torch.where(two_classes, gamma_i * inv_norm, torch.ones_like(inv_norm))  # (B, 1) s
        centre = torch.where(two_classes, (1.0 - gamma_i) * inv_norm, torch.zeros_like(inv_norm))  # (B, 1)
        centred = value if bias is None else value - bias.detach().to(value.dtype)  # (B, K) l+ - b
        ctx.save_for_backward(centred, z_plus, scale, centre, inv, mu, two_classes)
        ctx.has_bias = bias is not None
        ctx.dtypes = (logits.dtype, h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return value.detach().to(logits.dtype, copy=True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        centred, z_plus, scale, centre, inv, mu, two_classes = ctx.saved_tensors
        logits_dtype, h_dtype, weight_dtype, bias_dtype = ctx.dtypes
        g = g.to(centred.dtype)
        g_logits = g * scale  # (B, K) s g, through the head's own backward
        dot = torch.linalg.vecdot(g_logits, centred).unsqueeze(1)  # (B, 1)
        g_h = z_plus * dot.mul_(two_classes.to(dot.dtype)).neg_()  # (B, D) the correction along z+
        g_w = g_b = None
        if ctx.needs_input_grad[2]:
            g_centre = torch.zeros(mu.shape[0], g.shape[1], dtype=g.dtype, device=g.device).index_add_(
                0, inv, g * centre)  # (C, K) per-class sums
            g_w = (g_centre.T @ mu.to(g.dtype)).to(weight_dtype)  # (K, D) G^T mu
        if ctx.has_bias and ctx.needs_input_grad[3]:
            g_b = (g.sum(0) - g_logits.sum(0)).to(bias_dtype)
        return (g_logits.to(logits_dtype), g_h.to(h_dtype), g_w, g_b) + (None,) * 8


def folded_logits(logits: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, stats: dict[str, Tensor],
                  rows: int, eps: float = 1e-12) -> Tensor:
    """z+'s logits with their gradient folded into the batch's ``logits = h W^T + b``
    (:class:`_FoldedLogits`; the model's logits are its head on the embedding h), from the
    statistics :func:`expansion_operator` returns given the logits and detached statistics;
    ``rows``: this rank's rows of the gathered batch (all of them when not distributed)."""
    pick = (lambda t: local_rows(t, rows))
    return _FoldedLogits.apply(logits, h, weight, bias, pick(stats["logits_plus"]),
                               pick(stats["z_plus"]), pick(stats["gamma"])[:, None], pick(stats["e_norm"]),
                               stats["two_classes"], pick(stats["slots"]), stats["centroids"], eps)


def expansion_operator(
    z: Tensor, y: Tensor, eps: float = 1e-12, detach_stats: bool = True, unit: bool = False,
    logits: Tensor | None = None, bias: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Expand each class of a batch about its centroid on the unit sphere.

    With h = z / ||z|| (computed here, a no-op for normalised z), per class c present:
    mu_c the centroid of its h, r_c = sqrt(mean ||h - mu_c||^2) the RMS radius,
    m_c = min_{c' != c} ||mu_c - mu_c'|| the nearest other centroid (over all classes
    present, singletons included), gamma_c = max(1, m_c / (2 r_c + eps)) and

        z+_i = normalize(mu_{y_i} + gamma_{y_i} (h_i - mu_{y_i})).

    A class with one sample has h = mu, so z+ = h whatever gamma; its gamma is set to 1.
    With fewer than two classes present z+ = h (chosen with ``torch.where`` on a device
    flag, no host sync). ``detach_stats`` stops the gradient through mu and gamma, so the
    gradient reaches z only through (h - mu) and the final normalisation (with a closed-form
    backward, :class:`_Expansion`).

    ``unit=True`` says the rows of ``z`` are unit (or zero) already, as after the variant's
    L2-normalising neck: h = z without a second normalisation, and the gradient reaches z
    without its projection onto the sphere's tangent space, which the neck's own backward
    applies (so the gradient before the neck is the same, two (B, D) passes and four
    backward passes cheaper).

    With ``unit=True`` and ``logits = z W^T + b`` of a linear head (``bias`` its b, or None),
    ``stats["logits_plus"]`` is ``z+ W^T + b`` (B, K), no grad, obtained from the logits
    (:func:`_expanded_logits`) without a product with W; with ``detach_stats`` the stats also
    hold what :func:`folded_logits` needs to pass their gradient on through the logits
    (``z_plus`` detached, ``e_norm``, ``two_classes``, ``slots``, ``centroids``).

    Args:
        z: (B, D) embeddings (any float dtype; computed in float32).
        y: (B,) int labels.
    Returns:
        z_plus: (B, D) float32, unit norm.
        stats: ``gamma`` (B,) per-sample gamma of its class; 0-dim ``gamma_mean``,
            ``gamma_max``, ``frac_expanded`` (share of classes with gamma > 1),
            ``radius_mean``, ``margin_mean`` (mean m_c), ``classes_used`` — all over
            classes with >= 2 samples (gamma 1, radius/margin 0 when there are none);
            ``logits_plus`` when ``logits`` is given.
    """
    if logits is not None and not unit:
        raise ValueError("logits of z+ come from the logits of unit rows: pass unit=True")
    inv, counts, _, _ = used_class_slots(y)  # CPU: the C classes' slots only (no sync to avoid there)
    if detach_stats:
        z_plus, gamma, radius, nearest, eligible, _, e_norm, two_classes, mu = _Expansion.apply(
            z.float(), inv, counts, eps, unit)
    else:
        h = z.float() if unit else F.normalize(z.float(), dim=1)  # (B, D)
        geo = _class_geometry(h, inv, counts, eps)
        gamma, radius, nearest, eligible = geo["gamma"], geo["radius"], geo["nearest"], geo["eligible"]
        mu_i = geo["mu"].index_select(0, inv)  # (B, D)
        e = mu_i + gamma[inv, None] * geo["dev"]  # (B, D)
        e_norm = None if logits is None else torch.linalg.vector_norm(e.detach(), dim=1, keepdim=True)
        two_classes = geo["present"].sum() >= 2
        z_plus = torch.where(two_classes, F.normalize(e, dim=1), h)

    with torch.no_grad():
        n_used = eligible.sum()
        denom = n_used.clamp_min(1).float()
        w = eligible.float()
        g = gamma.detach()
        stats = {
            "gamma": g[inv],
            "gamma_mean": torch.where(n_used > 0, (g * w).sum() / denom, torch.ones_like(denom)),
            "gamma_max": torch.where(eligible, g, torch.ones_like(g)).max(),
            "frac_expanded": ((g > 1) & eligible).float().sum() / denom,
            "radius_mean": (radius.detach() * w).sum() / denom,
            "margin_mean": (nearest.detach() * w).sum() / denom,
            "classes_used": n_used.float(),
        }
        if logits is not None:
            stats["logits_plus"] = _expanded_logits(logits, bias, inv, g[inv, None], e_norm, two_classes, eps)
            if detach_stats:  # what folded_logits needs
                stats.update(z_plus=z_plus.detach(), e_norm=e_norm, two_classes=two_classes, slots=inv, centroids=mu)
    return z_plus, stats


def supcon_loss(features: Tensor, labels: Tensor, tau: float = 0.1) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out), vectorised.

    For anchors i over the N rows of unit-norm ``features`` (N, D), positives P(i) = rows
    with the same label other than i, and

        L = mean_i  -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / tau) / sum_{a != i} exp(s_ia / tau) )

    with s the cosine similarity; anchors without a positive are left out (L = 0 if none).
    """
    f = F.normalize(features.float(), dim=1)
    n = f.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=f.device)
    logits = (f @ f.T) / tau  # (N, N)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (N, N), -inf on diag
    positive = (labels[:, None] == labels[None, :]) & ~self_mask  # (N, N)
    n_pos = positive.sum(1)  # (N,)
    pos_log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(1)
    per_anchor = -pos_log_prob / n_pos.clamp_min(1)
    has_pos = (n_pos > 0).float()
    return (per_anchor * has_pos).sum() / has_pos.sum().clamp_min(1.0)


def expansion_kl(logits: Tensor, logits_plus: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(p+ || p)``, p = softmax(logits / T), p+ = softmax(logits_plus / T).

    Batch mean. This is ``F.kl_div(log p, p+)`` (PyTorch's ``kl_div(input, target)`` is
    KL(target || exp(input))), the direction of the design note. Gradient flows into both
    distributions.
    """
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    log_q = F.log_softmax(logits_plus.float() / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2


@dataclass
class ExpansionHparams(BaseHparams):
    mode: str = "kl"  # "kl": CE + lam T^2 KL(p+ || p); "supcon": CE + lam SupCon([z, z+])
    lam: float = 1.0  # weight of the kl / supcon term
    T: float = 1.0  # softmax temperature of the kl term
    tau: float = 0.1  # SupCon temperature
    detach_stats: bool = True  # stop-grad through the batch centroids and gamma
    aux_ce_weight: float = 0.0  # weight of CE(head(z+), y); 0 turns it off

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.lam < 0 or self.aux_ce_weight < 0:
            raise ValueError("lam and aux_ce_weight must be >= 0")
        if self.T <= 0 or self.tau <= 0:
            raise ValueError("T and tau must be > 0")


@register_variant
class Expansion(Variant):
    """CE + lam * (T^2 KL(p(z+) || p(z)) | SupCon([z, z+])) [+ aux CE(head(z+), y)]."""

    name = "expansion"
    Hparams = ExpansionHparams
    search_space = {
        "mode": CategoricalDistribution(MODES),
        "lam": FloatDistribution(0.05, 10.0, log=True),
        "T": FloatDistribution(0.5, 8.0, log=True),
        "tau": FloatDistribution(0.03, 0.5, log=True),
        "detach_stats": CategoricalDistribution([True, False]),
        "aux_ce_weight": FloatDistribution(0.0, 1.0),
    }
    statistics = ("gamma_mean", "gamma_max", "frac_expanded", "radius_mean", "margin_mean", "classes_used")
    default_sampler = "pk"
    hp: ExpansionHparams

    def build_neck(self, dim: int) -> nn.Module:
        """The head sees the L2-normalised embedding (the note's logits come from h)."""
        return L2Normalize()

    def floor_products(self, batch: int, num_classes: int, dim: int,
                       slots: int | None = None) -> tuple[tuple[int, int, int], ...]:
        """With detached statistics (the default) z+'s logits need no product and their
        gradient goes through the head's own backward (:class:`_FoldedLogits`), apart from a
        (K, C) x (C, D) product over the batch's classes: no head-sized product, no floor.
        With ``detach_stats=False`` z+'s head pass keeps its z+ and weight gradients; ``supcon``
        adds the (2B, 2B) similarity of the two views and its backward."""
        out: tuple[tuple[int, int, int], ...] = ()
        if (self.hp.mode == "kl" or self.hp.aux_ce_weight > 0) and not self.hp.detach_stats:
            out += ((batch, num_classes, dim), (num_classes, batch, dim))
        if self.hp.mode == "supcon":
            out += ((2 * batch, dim, 2 * batch), (2 * batch, 2 * batch, dim))
        return out

    def compute(self, batch: StepBatch, ce: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        hp = self.hp
        # all ranks' rows (this batch's when not distributed); this rank's rows of z+ after
        z_all, y_all = gather_rows(batch.embedding), gather_rows_no_grad(batch.labels)  # (W B, D), (W B,)
        head, rows = batch.head, batch.embedding.shape[0]
        needs_logits = hp.mode == "kl" or hp.aux_ce_weight > 0
        # z+'s logits from the batch's float32 logits (no product with W); bf16 logits under
        # autocast are too coarse to combine, so there z+ goes through the head
        from_logits = needs_logits and batch.logits.dtype in (torch.float32, torch.float64)
        # the neck (L2Normalize) made the rows unit: the operator does not normalise them again
        z_plus_all, op_stats = expansion_operator(
            z_all, y_all, detach_stats=hp.detach_stats, unit=True,
            logits=gather_rows_no_grad(batch.logits) if from_logits else None, bias=head.bias)
        z_plus = local_rows(z_plus_all, rows)  # (B, D)
        terms: dict[str, Tensor] = {}
        logits_plus = None
        if from_logits and hp.detach_stats:  # no product of its own: the gradient goes through the logits
            logits_plus = folded_logits(batch.logits, batch.embedding, head.weight, head.bias, op_stats, rows).float()
        elif from_logits:  # the head's backward, the value from the logits
            value = local_rows(op_stats["logits_plus"], rows).to(head.weight.dtype)
            logits_plus = linear_pass(z_plus.to(head.weight.dtype), head.weight, head.bias, value=value).float()
        elif needs_logits:
            logits_plus = head_pass(head, z_plus.to(head.weight.dtype)).float()  # (B, K)
        if hp.mode == "kl":
            terms["kl"] = hp.lam * expansion_kl(batch.logits, logits_plus, hp.T)
        else:
            h = F.normalize(z_all.float(), dim=1)
            views = torch.cat([h, z_plus_all], 0)  # (2 W B, D)
            terms["supcon"] = hp.lam * supcon_loss(views, y_all.repeat(2), hp.tau)
        if hp.aux_ce_weight > 0:
            terms["aux_ce"] = hp.aux_ce_weight * F.cross_entropy(
                logits_plus, batch.labels, label_smoothing=batch.label_smoothing
            )
        stats = {k: op_stats[k] for k in self.statistics}
        return terms, stats
