"""``nuisance`` (seed 002): label-safe feature augmentation in the nuisance subspace.

For a sample (z, y) and a linear head (W, b), the directions that decide between y and its
top competitors c_1..c_m are d_c = w_y - w_c. Gaussian noise confined to the orthogonal
complement of their span (the *nuisance* subspace, projector P_N = I - Q Q^T) leaves those
decisions untouched; against every other class k it moves the logit difference by a
Gaussian with variance alpha * a_k, a_k = ||P_N d_k||^2, so with

    slack_k = d_k . z + (b_y - b_k) - gamma_margin,
    alpha   = min_{k != y, a_k > tol} slack_k^2 / (2 a_k log(1/delta))

the Chernoff bound P(flip against k) <= exp(-slack_k^2 / (2 alpha a_k)) <= delta holds for
every k (with ``union`` delta is split over the K-1 classes, bounding the chance of any flip
by delta). alpha = 0 (no augmentation) when some slack_k <= 0. The variant trains on

    L = CE(head(z), y) + w_aug * CE(head(z~), y),   z~ = z + sqrt(alpha) P_N eps,  eps ~ N(0, I).

Fixes to the sketch (SPEC): the minimum runs over *all* k != y (the top competitors lie in
the subspace, a_k ~ 0, and alone they gave an unbounded alpha); the augmented features go
through the head only (no second LayerNorm); everything is vectorised over the batch.

Speed: no (B, K, D) tensor. The slacks are the logit differences; with G = W W^T (K x K),
every inner product the bound needs is a combination of Gram entries,

    d_s . d_k = G_yy - G_yk - G_sy + G_sk,

so ||d_k||^2, the competitors' Gram S = D_c D_c^T (m x m) and D_c d_k (m x K) cost
O(K^2 D) once plus O(B m K) per batch. The orthonormal basis is Q = D_c^T T with T = R^{-1},
S = R^T R: the R of a QR of D_c^T, obtained by Gram-Schmidt on S (coefficient space), so
||Q^T d_k||^2 = ||T^T D_c d_k||^2 and no (B, D, m) QR is run (on the CPU that QR alone
costs ~10x the head). Directions with a tiny residual (the QR's tiny |R_kk|) are dropped
by zeroing their column of T, which keeps every shape fixed and, unlike dropping a column
of an unpivoted QR after the fact, leaves the kept columns an exact basis of the span.
The noise is projected through the head too: with u = W eps, D_c eps = u_y - u_c, and the
in-span part D_c^T T T^T D_c eps is a (K,)-sparse combination of W's rows, so no (B, m, D)
tensor is gathered either. Statistics and the noisy logits are float32 with autocast off.

Under torch.distributed nothing is gathered except for ``basis="class"``: everything is per
sample (the noise scale from the sample's own logits and the head) and the augmented CE is a
mean over the rank's own rows, which DDP's gradient average makes the global mean. With
``basis="class"`` the per-class logit sums and counts that rank the competitors are
all-reduced, so the class means are those of the global batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from torch import Tensor

from carrot.geometry import reads_on_host, stat_float
from carrot.geometry.distributed import all_reduce_sum_no_grad
from carrot.variants import register_variant
from carrot.variants.base import BaseHparams, StepBatch, Variant, linear_pass

BASES = ("sample", "class")


def _rel_tol(dtype: torch.dtype) -> float:
    """Relative tolerance for squared residuals (R_jj^2 / S_jj and a_k / ||d_k||^2).

    Gram entries carry ~eps |w|^2 of round-off, so smaller residuals are noise.
    """
    return 1e-10 if dtype == torch.float64 else 1e-5


def competitor_classes(logits: Tensor, y: Tensor, m: int, basis: str = "sample") -> Tensor:
    """Top-``m`` classes other than y, (B, m) int64.

    ``basis="sample"`` ranks each sample's own logits; ``basis="class"`` ranks the mean
    logits of the sample's class over the batch (the global batch under torch.distributed:
    the per-class sums and counts are all-reduced), so all samples of a class share the same
    competitors and hence the same subspace.
    """
    b, k = logits.shape
    score = logits.detach()
    if basis == "class":
        sums = torch.zeros(k, k, dtype=score.dtype, device=score.device).index_add_(0, y, score)  # (K, K)
        counts = torch.zeros(k, dtype=score.dtype, device=score.device).index_add_(
            0, y, torch.ones_like(y, dtype=score.dtype))  # (K,) (bincount syncs on CUDA)
        # under torch.distributed: the class means of the global batch
        sums, counts = all_reduce_sum_no_grad(sums), all_reduce_sum_no_grad(counts)
        score = (sums / counts.clamp_min(1.0)[:, None]).index_select(0, y)  # (B, K) class-mean logits
    elif basis != "sample":
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    score = score.scatter(1, y[:, None], float("-inf"))  # never pick y itself
    return score.topk(m, dim=1).indices  # (B, m)


def gram_schmidt_coefficients(s: Tensor, rel_tol: float) -> tuple[Tensor, Tensor]:
    """Orthonormalise vectors d_1..d_m known only through their Gram matrix S_ij = d_i . d_j.

    Returns T (B, m, m) and keep (B, m) such that q_j = sum_i T_ij d_i are orthonormal for
    the kept j and zero otherwise, spanning span(d_1..d_m). It is Gram-Schmidt in
    coefficient space: c_i = q_i . d_j = (T^T S)_ij, q_j ∝ d_j - sum_i c_i q_i with
    ||d_j - sum_i c_i q_i||^2 = S_jj - ||c||^2 (= R_jj^2); d_j is dropped when that is
    <= rel_tol * S_jj (the QR's tiny |R_jj|). For a full-rank S, T = R^{-1} with S = R^T R,
    i.e. Q = D_c^T R^{-1} as from a QR of D_c^T. A dropped direction is left out of the basis
    instead of being replaced by an arbitrary orthogonal one (as an unpivoted QR does), so
    the kept q's span exactly the competitors. Use float64: one classical pass then loses
    orthogonality only at ~eps * cond^2 <= 1e-16 / rel_tol. The loop runs over the m
    competitors (a hyperparameter), not over samples, and there is no linalg call, hence no
    error-check sync on CUDA. On the CPU a batch where no direction is dropped takes the
    Cholesky route (the same T to float64 round-off).
    """
    b, m, _ = s.shape
    if reads_on_host(s):
        # Where nothing is dropped the recurrence is the Cholesky factorisation S = R^T R and
        # T = R^{-1}: two batched LAPACK calls instead of ~8 ops per competitor. Reading the
        # flag is free on the CPU (on a GPU it would be a host sync, so there the loop runs).
        chol, info = torch.linalg.cholesky_ex(s)  # (B, m, m) lower, R = chol^T
        kept = (info == 0)[:, None] & (chol.diagonal(dim1=1, dim2=2).square() > rel_tol * s.diagonal(dim1=1, dim2=2))
        if bool(kept.all()):
            eye = torch.eye(m, dtype=s.dtype, device=s.device).expand(b, m, m)
            return torch.linalg.solve_triangular(chol.mT, eye, upper=True), kept
    t = torch.zeros_like(s)  # (B, m, m), column j = coefficients of q_j (upper triangular)
    diag = s.diagonal(dim1=1, dim2=2)[:, :, None, None]  # (B, m, 1, 1) S_jj
    floor = rel_tol * diag
    unit = torch.eye(m, dtype=s.dtype, device=s.device)[:, :, None].expand(m, m, 1)  # e_j = unit[:, j]
    for j in range(m):  # ~8 kernels per competitor (it is launch-bound on a GPU)
        c = t.transpose(1, 2) @ s[:, :, j:j + 1]  # (B, m, 1)  q_i . d_j
        v = torch.baddbmm(unit[:, j].expand(b, m, 1), t, c, alpha=-1.0)  # (B, m, 1)  e_j - T c
        n2 = torch.baddbmm(diag[:, j], c.transpose(1, 2), c, alpha=-1.0)  # (B, 1, 1)  S_jj - ||c||^2
        scale = torch.where(n2 > floor[:, j], n2.clamp_min(1e-300).rsqrt(), 0.0)
        torch.mul(v, scale, out=t[:, :, j:j + 1])
    keep = t.diagonal(dim1=1, dim2=2) > 0  # T_jj = 1 / R_jj for kept directions
    return t, keep


def nuisance_geometry(
    weight: Tensor, y: Tensor, comp: Tensor, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Everything the bound needs about the subspaces, from the Gram matrix W W^T.

    Computed in ``dtype`` with autocast off.

    Args:
        weight: (K, D) head weight (detached here).
        y: (B,) labels; comp: (B, m) competitor classes (none equal to y).
    Returns a dict of
        ``d2`` (B, K): ||d_k||^2 = ||w_y - w_k||^2;
        ``a`` (B, K): ||P_N d_k||^2 = ||d_k||^2 - ||Q^T d_k||^2, clamped >= 0;
        ``T`` (B, m, m): basis coefficients, Q = D_c^T T (D_c the (m, D) competitor
            directions), zero columns for dropped directions (:func:`gram_schmidt_coefficients`);
        ``keep`` (B, m) bool: kept basis directions; ``rank`` (B,): their number;
        ``gram`` (K, K): the Gram matrix of the centred rows of W;
        ``row_dot_mean`` (K,): w_k . mean(W), so that W W^T = gram + r 1^T + 1 r^T - mean(r).
    """
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        w = weight.detach().to(dtype)
        mean = w.mean(0)  # (D,)
        w = w - mean  # differences are unchanged; less cancellation in G
        gram = w @ w.T  # (K, K)
        row_dot_mean = torch.mv(w, mean).add_(mean.dot(mean))  # (K,) (w_k - mean) . mean + |mean|^2
        g_diag = gram.diagonal()  # (K,)
        g_y = gram.index_select(0, y)  # (B, K)  G_yk
        g_yy = g_diag[y]  # (B,)
        d2 = (g_yy[:, None] + g_diag[None, :] - 2.0 * g_y).clamp_min(0.0)  # (B, K)
        g_cy = g_y.gather(1, comp)  # (B, m)  G_{c_s y}
        gram_c = gram.index_select(0, comp.reshape(-1)).view(*comp.shape, -1)  # (B, m, K) G_{c_s k}
        inner = g_yy[:, None, None] - g_y[:, None, :] - g_cy[:, :, None] + gram_c  # (B, m, K) d_s . d_k
        m = comp.shape[1]
        s = inner.gather(2, comp[:, None, :].expand(-1, m, m))  # (B, m, m) competitors' Gram
        t, keep = gram_schmidt_coefficients(s.double(), _rel_tol(dtype))  # small: float64 is cheap
        t = t.to(dtype)  # (B, m, m)
        proj = t.transpose(1, 2) @ inner  # (B, m, K)  Q^T d_k
        a = (d2 - (proj * proj).sum(1)).clamp_min(0.0)  # (B, K)
    return {"d2": d2, "a": a, "T": t, "keep": keep, "rank": keep.sum(-1), "gram": gram,
            "row_dot_mean": row_dot_mean}


def nuisance_alpha(
    slack: Tensor, a: Tensor, d2: Tensor, y: Tensor, delta: float, union: bool = False
) -> Tensor:
    """Per-sample noise variance alpha, (B,).

    alpha = min over k != y with a_k > tol * ||d_k||^2 of slack_k^2 / (2 a_k log(1/delta')),
    delta' = delta / (K-1) with ``union`` else delta; alpha = 0 when some slack_k <= 0
    (k != y) or when no class constrains the noise (every a_k ~ 0: nothing to bound, so
    nothing is added rather than an unbounded amount).
    """
    b, k = slack.shape
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    delta_eff = delta / max(1, k - 1) if union else delta
    log_term = math.log(1.0 / delta_eff)
    other = torch.ones(b, k, dtype=torch.bool, device=slack.device).scatter_(1, y[:, None], False)  # (B, K)
    valid = other & (a > _rel_tol(a.dtype) * d2) & (a > 0)
    bound = slack * slack / (2.0 * a.clamp_min(torch.finfo(a.dtype).tiny) * log_term)  # (B, K)
    bound = torch.where(valid, bound, torch.full_like(bound, float("inf")))
    alpha = bound.min(dim=1).values  # (B,)
    safe = ((slack > 0) | ~other).all(dim=1) & valid.any(dim=1)
    return torch.where(safe, alpha, torch.zeros_like(alpha))


def label_safety(logits_aug: Tensor, y_aug: Tensor, augmented_rows: Tensor) -> Tensor:
    """Fraction of the *augmented* rows whose argmax is still their label (1 when none).

    Rows left unchanged (alpha = 0: misclassified or inside the margin) are not counted,
    otherwise the statistic would measure accuracy rather than the augmentation's safety.
    """
    ok = (logits_aug.detach().argmax(dim=1) == y_aug) & augmented_rows  # (B n,)
    count = augmented_rows.sum()
    return torch.where(count > 0, ok.sum().float() / count.clamp_min(1).float(), torch.ones((), device=ok.device))


def nuisance_augment(
    z: Tensor,
    y: Tensor,
    logits: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    topk: int = 10,
    gamma_margin: float = 0.0,
    delta: float = 0.05,
    n_aug: int = 1,
    generator: torch.Generator | None = None,
    *,
    union: bool = False,
    basis: str = "sample",
    check_safety: bool = True,
    return_logits: bool = False,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Label-safe Gaussian augmentation of z in its nuisance subspace (see module doc).

    z~ = z + sqrt(alpha) * P_N eps, eps ~ N(0, I_D), ``n_aug`` draws per sample; the noise
    scale, the basis and the competitors are detached, so z~ carries the gradient of z.

    Args:
        z: (B, D) embeddings the head sees (computed in float32, float64 if z is float64).
        y: (B,) int labels.
        logits: (B, K) = z W^T + b: competitor ranking and the slacks (logit differences).
        weight: (K, D) head weight; bias: (K,) or None.
        topk: competitors per sample (clamped to K-1).
        gamma_margin: required logit margin subtracted from every slack.
        delta: allowed flip probability per class (overall with ``union``).
        n_aug: draws per sample; generator: optional RNG on z's device.
        union: split delta over the K-1 classes (union bound: P(any flip) <= delta).
        basis: ``"sample"`` (own top-k) or ``"class"`` (the class's top-k by mean logit).
        check_safety: compute ``label_safety`` (from the noisy rows' logits below).
        return_logits: add ``logits`` (B * n_aug, K), no grad: the noisy rows' logits under
            (weight, bias), ``z~ W^T + b``, as logits + sqrt(alpha) W P_N eps from the Gram
            matrix the bound needs anyway, without a head pass.
    Returns:
        z_aug: (B * n_aug, D), sample-major (rows i*n_aug .. i*n_aug+n_aug-1 belong to i);
        y_aug: (B * n_aug,) = y repeated;
        stats: ``alpha`` (B,), ``augmented`` (B,) bool, ``rank`` (B,), 0-dim ``alpha_mean``,
            ``frac_augmented``, ``subspace_rank`` (mean rank), ``label_safety`` (fraction of
            augmented rows still argmax-y under (weight, bias); 1 when none; only with
            ``check_safety``), ``logits`` (only with ``return_logits``).
    """
    if n_aug < 1:
        raise ValueError(f"n_aug must be >= 1, got {n_aug}")
    b, d = z.shape
    k = weight.shape[0]
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    y = y.long()
    m = min(topk, k - 1)
    # float32 statistics even under autocast (SPEC): bf16 Gram entries would swamp the margins
    with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
        lg = logits.detach().to(dtype)  # (B, K)
        if m < 1:  # one class: nothing to protect against, nothing to add
            alpha = lg.new_zeros(b)
            rank = torch.zeros(b, dtype=torch.long, device=z.device)
            root = lg.new_zeros(b, 1, 1)
            noise = lg.new_zeros(b, n_aug, d)
            shift = lg.new_zeros(b, n_aug, k)
        else:
            comp = competitor_classes(lg, y, m, basis)  # (B, m)
            geo = nuisance_geometry(weight, y, comp, dtype)
            slack = lg.gather(1, y[:, None]) - lg - gamma_margin  # (B, K)
            alpha = nuisance_alpha(slack, geo["a"], geo["d2"], y, delta, union)  # (B,)
            rank = geo["rank"]
            w = weight.detach().to(dtype)
            eps = torch.randn(b, n_aug, d, generator=generator, device=z.device, dtype=dtype)  # (B, n, D)
            # Through the head instead of gathering the (B, m, D) directions: u = W eps, so
            # D_c eps = u_y - u_c; the projection onto span(D_c) is C W with C (B, n, K)
            # holding +sum(coef) at y and -coef at the competitors (rows sum to 0).
            u = eps @ w.T  # (B, n, K)
            u_dirs = u.gather(2, y[:, None, None].expand(-1, n_aug, 1)) - u.gather(
                2, comp[:, None, :].expand(-1, n_aug, -1))  # (B, n, m)  D_c eps
            t = geo["T"]
            coef = (u_dirs @ t) @ t.transpose(1, 2)  # (B, n, m)  (T T^T D_c eps)^T
            mix = torch.zeros_like(u).scatter_(2, comp[:, None, :].expand(-1, n_aug, -1), -coef)
            mix = mix.scatter_add(2, y[:, None, None].expand(-1, n_aug, 1), coef.sum(2, keepdim=True))  # (B, n, K)
            root = alpha.sqrt()[:, None, None]  # (B, 1, 1)
            # P_N eps = eps - C W, as one product that accumulates into eps (no longer needed)
            noise = eps.view(b * n_aug, d).addmm_(mix.view(b * n_aug, k), w, alpha=-1.0).view(b, n_aug, d)
            if check_safety or return_logits:
                # head(z~) - head(z) = noise W^T = sqrt(alpha) (u - C W W^T). With C's rows
                # summing to 0, C W W^T = C gram + (C r) 1^T (r = row_dot_mean): the centred
                # Gram's product plus a per-row constant.
                in_span = (mix @ geo["gram"]).add_((mix @ geo["row_dot_mean"])[..., None])  # (B, n, K) C W W^T
                shift = u.sub_(in_span)  # (B, n, K) (u - C W W^T), unscaled
    # z~ = z + sqrt(alpha) P_N eps in one operation (the gradient reaches z only)
    z_aug = torch.addcmul(z.to(dtype)[:, None, :], root, noise).reshape(b * n_aug, d)  # (B n, D)
    y_aug = y.repeat_interleave(n_aug)  # (B n,)
    augmented = alpha > 0
    stats: dict[str, Tensor] = {
        "alpha": alpha,
        "augmented": augmented,
        "rank": rank,
        "alpha_mean": alpha.mean(),
        "frac_augmented": augmented.float().mean(),
        "subspace_rank": rank.float().mean(),
    }
    if check_safety or return_logits:
        logits_aug = torch.addcmul(lg[:, None, :], root, shift).reshape(b * n_aug, k)  # (B n, K) float
        if check_safety:
            stats["label_safety"] = label_safety(logits_aug, y_aug, augmented.repeat_interleave(n_aug))
        if return_logits:
            stats["logits"] = logits_aug
    return z_aug, y_aug, stats


@dataclass
class NuisanceHparams(BaseHparams):
    topk: int = 10  # competitors spanning the discriminative subspace
    gamma_margin: float = 0.0  # logit margin the noise must preserve
    delta: float = 0.05  # allowed flip probability (per class; overall with union)
    union: bool = False  # split delta over the K-1 classes
    n_aug: int = 1  # noisy copies per sample
    w_aug: float = 1.0  # weight of CE on the augmented features
    warmup_epochs: float = 2.0  # CE only before this (the note: 1-3 epochs)
    basis: str = "sample"  # "sample": own top-k; "class": shared per class

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.n_aug < 1:
            raise ValueError(f"n_aug must be >= 1, got {self.n_aug}")
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {self.basis!r}")
        if self.gamma_margin < 0 or self.w_aug < 0 or self.warmup_epochs < 0:
            raise ValueError("gamma_margin, w_aug and warmup_epochs must be >= 0")


@register_variant
class Nuisance(Variant):
    """CE + w_aug * CE on label-safe nuisance-subspace noisy copies of the embeddings."""

    name = "nuisance"
    Hparams = NuisanceHparams
    search_space = {
        "topk": IntDistribution(2, 20),
        "gamma_margin": FloatDistribution(0.0, 2.0),
        "delta": FloatDistribution(0.01, 0.3, log=True),
        "union": CategoricalDistribution([False, True]),
        "n_aug": IntDistribution(1, 4),
        "w_aug": FloatDistribution(0.1, 2.0, log=True),
        "warmup_epochs": FloatDistribution(1.0, 3.0),
        "basis": CategoricalDistribution(BASES),
    }
    statistics = ("alpha_mean", "frac_augmented", "label_safety", "subspace_rank")
    maybe_undefined = ("label_safety", "subspace_rank")  # nothing augmented / still warming up
    default_sampler = "random"

    def floor_products(self, batch: int, num_classes: int, dim: int,
                       slots: int | None = None) -> tuple[tuple[int, int, int], ...]:
        """The head's Gram W W^T (every bound reads it: K x K x D), the noise through the head and
        back into D (u = W eps, then its in-span part), and the noisy rows' input and weight
        gradients. Their logits need no product of their own, and the step computes none:
        logits + sqrt(alpha) (u - C W W^T), from the Gram (``nuisance_augment(return_logits=True)``)."""
        rows = batch * self.hp.n_aug
        return ((num_classes, dim, num_classes), (rows, dim, num_classes), (rows, num_classes, dim),
                (rows, num_classes, dim), (num_classes, rows, dim))

    def floor_normal_draws(self, batch: int, dim: int) -> int:
        """The noise eps ~ N(0, I_D) of every noisy row: B n_aug D draws (torch's CPU generator
        draws them one after another, about a third of the CE head's step at B=64, D=2048)."""
        return batch * self.hp.n_aug * dim

    def compute(self, batch: StepBatch, ce: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        hp = self.hp
        z, y, head = batch.embedding, batch.labels.long(), batch.head
        if batch.progress < hp.warmup_epochs:
            zero = ce.detach().new_zeros(())
            undefined = zero + float("nan")  # no noise drawn: safety and rank are not defined
            return {"aug": ce * 0.0}, {
                "alpha_mean": zero, "frac_augmented": zero, "label_safety": undefined, "subspace_rank": undefined,
            }
        logits = batch.logits
        if logits.dtype not in (torch.float32, torch.float64):
            # bf16 logits under autocast are too coarse for slacks; one float32 head pass.
            with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
                bias = None if head.bias is None else head.bias.float()
                logits = F.linear(z.detach().float(), head.weight.float(), bias)
        # With topk >= K-1 every class is a competitor, nothing outside the subspace bounds the
        # noise and no sample would be augmented; keep at least one class outside it.
        topk = min(hp.topk, max(1, logits.shape[1] - 2))
        z_aug, y_aug, st = nuisance_augment(
            z, y, logits, head.weight, head.bias, topk=topk, gamma_margin=hp.gamma_margin,
            delta=hp.delta, n_aug=hp.n_aug, union=hp.union, basis=hp.basis, check_safety=False,
            return_logits=True,
        )
        # Through the head only, in float32 even under autocast: z~ moves each logit by far
        # more than the logit differences it must preserve, which bf16 would round away. The
        # forward's value comes from the Gram matrix (no head-sized product); the backward is
        # the head's.
        with torch.autocast(z.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.to(z_aug.dtype)
            logits_aug = linear_pass(z_aug, head.weight.to(z_aug.dtype), bias, value=st.pop("logits"))  # (B n, K)
        rows = st["augmented"].repeat_interleave(hp.n_aug)  # (B n,)
        ce_rows = F.cross_entropy(stat_float(logits_aug), y_aug, reduction="none",
                                  label_smoothing=batch.label_smoothing)
        # SPEC: w_aug * CE(head(z~), y) over every row; a row with alpha = 0 has z~ = z
        aug_ce = ce_rows.mean()
        safety = torch.where(rows.any(), label_safety(logits_aug, y_aug, rows), float("nan"))
        return {"aug": hp.w_aug * aug_ce}, {
            "alpha_mean": st["alpha_mean"],
            "frac_augmented": st["frac_augmented"],
            "label_safety": safety,  # NaN when no row was augmented: averaged as missing
            "subspace_rank": st["subspace_rank"],
        }
