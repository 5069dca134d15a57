"""``barrier`` (seed 004): variance barrier + effective-rank barrier.

Log barriers that blow up as a class collapses, either in spread (its within-class scatter
shrinking relative to the whole batch's) or in dimension (its covariance spectrum
concentrating on few directions):

    R_var  = mean_c -log(S_c / S_bar),   R_rank = mean_c -log(erank_c / D),
    L = CE + w (R_var + R_rank)          (parameter-free: w = 1, both on).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution
from torch import Tensor

from carrot.geometry import block_spectrum, class_slots, no_autocast, stat_float
from carrot.geometry.distributed import gather_rows, gather_rows_no_grad
from carrot.variants import register_variant
from carrot.variants.base import BaseHparams, StepBatch, Variant


class _BarrierTerms(torch.autograd.Function):
    """R_var and R_rank of a batch with a closed-form backward through the block spectrum.

    One function that queues everything not needing the spectrum first: R_var, its
    statistics and its gradient operator; then the spectrum (on CUDA without a host sync, the
    resolvent route of :class:`carrot.geometry.BlockSpectrum`; ``eigh`` on the CPU), R_rank
    and its gradient operator (both terms are linear in z's Gram, so each gradient is
    ``M @ z`` for a B x B ``M`` from :meth:`carrot.geometry.BlockSpectrum.operator`);
    backward is then ``(g_var M_var + g_rank M_rank) @ z``.

    Forward returns ``r_var, r_rank`` (0-dim) and, not differentiable, ``ratio`` (S,) r_c,
    ``erank`` (S,), ``min_r``, ``min_erank_ratio`` (0-dim).
    """

    @staticmethod
    def forward(ctx, z: Tensor, inv: Tensor, counts: Tensor, eps: float, resolvent: bool | None = None):
        ctx.set_materialize_grads(False)
        b, d = z.shape
        spec = block_spectrum(z, inv, inv, b, resolvent)
        used = counts >= 2  # (S,)
        any_used = used.any()
        w = used.to(z.dtype) / used.sum().clamp_min(1)  # (S,) weights of the class means
        one = torch.ones((), dtype=z.dtype, device=z.device)
        inf = torch.full_like(w, float("inf"))
        grads = ctx.needs_input_grad[0]

        # Before the eigh. Variance barrier: S_bar = total / B, r_c = T_c / (n_c S_bar). A
        # trace within the round-off of centring identical samples counts as 0 (no spread:
        # the clamps below then hold with a zero gradient, instead of a gradient ~ 1 / round-off).
        spread, _, inv_t = spec.trace_terms  # (S,) spread of each class; H_c = 0 (erank 1) without
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        trace = torch.where(spread, spec.trace, zero)
        scatter_all = torch.where(spec.total_spread, spec.total / b, zero)
        s_bar = scatter_all.clamp_min(eps)
        ratio_raw = trace / counts.clamp_min(1.0) / s_bar
        ratio = ratio_raw.clamp_min(eps)  # (S,)
        r_var = -torch.dot(w, torch.log(ratio))
        min_r = torch.where(any_used, torch.where(used, ratio, inf).min(), one)
        if grads:
            # r_var = -sum_c a_c log(T_c / (n_c S_bar)): dT_c = -a_c / T_c, dS_bar = sum a / S_bar
            # (a_c = 0 where a clamp is active: clamp_min passes the gradient where input >= min).
            a_var = w * (ratio_raw >= eps)
            g_total = a_var.sum() / s_bar * (scatter_all >= eps) / b
            ctx.op_var = spec.operator(-a_var * inv_t, None, g_total)
            w_spread_inv_t = w * spread * inv_t

        # Rank barrier: H_c = log T_c - tr(G_c log G_c) / T_c, -log(max(erank / D, eps)) = -q_c.
        xlogx = spec.xlogx()
        entropy = spec.entropy(xlogx)  # (S,)
        log_ratio = entropy - math.log(d)
        q = log_ratio.clamp_min(math.log(eps))  # (S,) log(max(erank_c / D, eps))
        r_rank = -torch.dot(w, q)
        min_er = torch.where(any_used, torch.exp(torch.where(used, q, inf).min()), one)
        if grads:
            # dr_rank/dH_c = -a_c;  dH/dT = (1 + xlogx / T) / T,  dH/dxlogx = -1 / T.
            a_inv_t = w_spread_inv_t * (log_ratio >= math.log(eps))
            ctx.op_rank = spec.operator(-a_inv_t - a_inv_t * xlogx * inv_t, a_inv_t)
            ctx.z = z
        erank = torch.exp(entropy)
        ctx.mark_non_differentiable(ratio, erank, min_r, min_er)
        return r_var, r_rank, ratio, erank, min_r, min_er

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_var: Tensor | None, g_rank: Tensor | None, *_unused):
        if g_var is None and g_rank is None:
            return None, None, None, None, None
        op = ctx.op_var * g_var if g_var is not None else 0.0
        if g_rank is not None:
            op = op + ctx.op_rank * g_rank
        return op @ ctx.z, None, None, None, None


def barrier_terms(z: Tensor, y: Tensor, eps: float = 1e-12,
                  resolvent: bool | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Variance and effective-rank barriers of a batch, batched over classes.

    S_bar = mean_i ||z_i - zbar||^2 (trace of the batch covariance, floored at eps); for
    every class c with n_c >= 2: S_c = mean_{i in c} ||z_i - mu_c||^2,
    r_c = max(S_c / S_bar, eps), erank_c = exp(H(p)) with p the normalised eigenvalues of
    the class covariance.

        R_var = mean_c -log r_c,   R_rank = mean_c -log(max(erank_c / D, eps))

    Everything comes from the B x B within-class Gram matrix (samples centred on their class
    mean by one matrix product, rows in class order so it is block diagonal): S_c are traces
    of its blocks and one spectral computation serves every class
    (:class:`carrot.geometry.BlockSpectrum`: ``eigh`` on the CPU; on CUDA the resolvent
    integral, which needs no error check and so no host sync; ``resolvent`` forces either);
    the gradient is written out by hand (:class:`_BarrierTerms`). Float32 with autocast off.

    Both are 0 (with finite, zero gradients) when no class has two samples. No host sync on CUDA.

    Args:
        z: (B, D) embeddings (computed in float32); y: (B,) labels.
    Returns:
        r_var, r_rank (0-dim float32) and stats: ``r_var``, ``r_rank``, ``min_r``,
        ``min_erank_ratio`` (min erank_c / D; both 1 when no class qualifies),
        ``classes_used``, and per-slot ``r`` / ``erank`` with ``used`` mask (S,).
    """
    with no_autocast(z):
        inv, counts, _ = class_slots(y)
        used = counts >= 2
        classes_used = used.sum().float()
        # erank is 1 (H = 0) for a slot with fewer than two samples: no spread.
        r_var, r_rank, ratio, erank, min_r, min_er = _BarrierTerms.apply(stat_float(z), inv, counts, eps, resolvent)
    stats = {
        "r_var": r_var.detach(),
        "r_rank": r_rank.detach(),
        "min_r": min_r,
        "min_erank_ratio": min_er,
        "classes_used": classes_used,
        "r": ratio,
        "erank": erank,
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
        "use_var": CategoricalDistribution([True, False]),
        "use_rank": CategoricalDistribution([True, False]),
        "weight": FloatDistribution(0.01, 10.0, log=True),
    }
    statistics = ("r_var", "r_rank", "min_r", "min_erank_ratio", "classes_used")
    default_sampler = "pk"
    hp: BarrierHparams

    def compute(self, batch: StepBatch, ce: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        hp = self.hp
        # Under torch.distributed the barriers of the global batch, the same on every rank: the
        # embeddings are all-gathered with gradients (carrot.geometry.distributed).
        r_var, r_rank, st = barrier_terms(gather_rows(batch.embedding), gather_rows_no_grad(batch.labels))
        terms: dict[str, Tensor] = {}
        # (no multiply at the parameter-free weight 1)
        if hp.use_var:
            terms["r_var"] = r_var if hp.weight == 1.0 else hp.weight * r_var
        if hp.use_rank:
            terms["r_rank"] = r_rank if hp.weight == 1.0 else hp.weight * r_rank
        return terms, {k: st[k] for k in self.statistics}
