"""Per-epoch diagnostics over a whole evaluation split (SPEC: "What every trial logs").

Pure functions: tensors in, tensors out, on the device the inputs live on, vectorised over
samples and classes. They run once per epoch on all N samples of a split, never inside a
training step, so reading a scalar back (``.item()``) for a shape decision is acceptable here.

Precision: statistics are computed in float64 whatever the input dtype (float16/bfloat16
features from autocast included). Sizes are small (N ~ 6000, D <= 2048, K <= 200), so the cost
is negligible next to a training epoch, and ties, ranks and near-singular covariances
(``nc1``'s pseudo-inverse) come out the same on CPU and CUDA. Two exceptions: rho goes
through the shared float32 ``carrot.geometry`` code (the same numbers the ``bhattacharyya``
variant computes), and the linear probe optimises in float32 (``dtype`` argument) because
L-BFGS makes hundreds of full passes.

Absent classes (no sample of that class in the split) never raise: per-class quantities are
NaN for them (per-class accuracy, prototypes, Gaussian moments), pair quantities involving
them are NaN where undefined, and aggregates ignore them (``mean_class_accuracy`` is a
nanmean, ``offdiag_cosine_stats`` and ``nc1`` use the present classes only). Use
``torch.nanmean`` when averaging a pair metric that may contain NaN.

Typical epoch-end use (``pred``, ``labels``: (N,); ``emb``: (N, D); ``feats[layer]``: (N, D_l))::

    cm = confusion_matrix(pred, labels, K)                       # artifact
    top = confusable_pairs(cm, top_n=20)                         # (P, 2)
    pair_error(cm, top).nanmean()                                # pairs/top_error
    protos = class_prototypes(emb, labels, K)
    prototype_cosine(protos, top).nanmean()                      # proto_cos/top_mean
    mean, std = offdiag_cosine_stats(protos)                     # proto_cos/offdiag_*
    pair_bhattacharyya(feats[layer], labels, K, top)[1].nanmean()  # rho/<layer>/top_mean
    nc1(emb, labels, K)                                          # nc/nc1
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from carrot import contract
from carrot.geometry import bhattacharyya_pairs, class_means, class_moments, l2_normalize

STAT_DTYPE = torch.float64  # the diagnostics compute in this dtype (rho and the probe aside)

__all__ = [
    "confusion_matrix",
    "per_class_accuracy",
    "mean_class_accuracy",
    "accuracy",
    "confusable_pairs",
    "pair_error",
    "class_prototypes",
    "prototype_cosine",
    "offdiag_cosine_stats",
    "class_diag_gaussians",
    "pair_bhattacharyya",
    "nc1",
    "stratified_holdout",
    "fit_logistic_regression",
    "linear_probe",
]


# ----------------------------------------------------------------------------- helpers
def _check_labels(labels: Tensor, num_classes: int, name: str = "labels") -> Tensor:
    """Flatten to int64 (N,) and check every entry lies in [0, num_classes)."""
    labels = torch.as_tensor(labels).reshape(-1).long()
    if labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        assert 0 <= lo and hi < num_classes, (
            f"{name} must lie in [0, {num_classes}), got range [{lo}, {hi}]"
        )
    return labels


def _check_features(x: Tensor, labels: Tensor, name: str = "features") -> Tensor:
    assert x.ndim == 2, f"{name} must be (N, D) pooled features, got shape {tuple(x.shape)}"
    assert x.shape[0] == labels.shape[0], (
        f"{name} has {x.shape[0]} rows but labels has {labels.shape[0]}"
    )
    return x.to(STAT_DTYPE)


def _as_pairs(pairs: Tensor | Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """(P, 2) int64 on ``device``; accepts a tensor or a list of [i, j] (e.g. read from JSON)."""
    return torch.as_tensor(pairs, dtype=torch.long, device=device).reshape(-1, 2)


def _class_counts(labels: Tensor, num_classes: int) -> Tensor:
    return torch.bincount(labels, minlength=num_classes)  # (K,) int64


def _nan_absent(rows: Tensor, counts: Tensor) -> Tensor:
    """Per-class rows (K, D) with NaN for the classes that have no sample (counts (K,))."""
    return rows.masked_fill((counts == 0).unsqueeze(1), torch.nan)


# ----------------------------------------------------------------- confusion and accuracy
def confusion_matrix(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Confusion counts C (K, K) int64: C[i, j] = number of samples of true class i
    predicted as j (rows = true class, columns = prediction), same layout as
    ``sklearn.metrics.confusion_matrix(labels, pred, labels=range(K))``.
    """
    labels = _check_labels(labels, num_classes, "labels")
    pred = _check_labels(pred, num_classes, "pred").to(labels.device)
    assert pred.shape == labels.shape, f"pred {tuple(pred.shape)} vs labels {tuple(labels.shape)}"
    flat = labels * num_classes + pred  # (N,) row-major cell index
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _row_counts(cm: Tensor) -> Tensor:
    assert cm.ndim == 2 and cm.shape[0] == cm.shape[1], f"cm must be (K, K), got {tuple(cm.shape)}"
    return cm.to(STAT_DTYPE).sum(1)  # (K,) n_i, samples of each true class


def per_class_accuracy(cm: Tensor) -> Tensor:
    """Recall of each class, C_ii / n_i (K,) float64; NaN for classes with no sample."""
    n = _row_counts(cm)
    return torch.where(n > 0, cm.diagonal().to(STAT_DTYPE) / n.clamp_min(1), torch.nan)


def mean_class_accuracy(cm: Tensor) -> Tensor:
    """Mean per-class accuracy over the classes present in the split (0-dim float64;
    NaN if none is). Equals sklearn's ``balanced_accuracy_score``."""
    return torch.nanmean(per_class_accuracy(cm))


def accuracy(cm: Tensor) -> Tensor:
    """Top-1 accuracy trace(C) / sum(C) (0-dim float64; NaN for an empty split)."""
    cm64 = cm.to(STAT_DTYPE)
    total = cm64.sum()
    return torch.where(total > 0, cm64.trace() / total.clamp_min(1), torch.nan)


# -------------------------------------------------------------------------------- pairs
# The formulas are ``carrot.contract``'s (NumPy), shared with the analysis that re-scores
# finished runs; here they take and return tensors on the confusion matrix's device.
def _numpy(cm: Tensor):
    assert cm.ndim == 2 and cm.shape[0] == cm.shape[1], f"cm must be (K, K), got {tuple(cm.shape)}"
    return cm.detach().cpu().numpy()


def confusable_pairs(cm: Tensor, top_n: int = 20, include_zero: bool = False) -> Tensor:
    """The top-``top_n`` unordered pairs (i < j) by the symmetric confusability
    S_ij = (C_ij / n_i + C_ji / n_j) / 2 (:func:`carrot.contract.pair_scores`), as (P, 2) int64.

    Order: S descending, ties broken by i then j (ascending); the float64 scores are computed
    on the host whatever ``cm``'s device, so the pair set is deterministic.

    Zero-score pairs: by default a pair with S_ij = 0 (never confused either way) is *not*
    returned, because below the last confused pair the order would be only the index
    tie-break, i.e. arbitrary pairs. So P = min(top_n, number of pairs with S > 0) and can be
    0 for a perfect classifier (then pair means are NaN). ``include_zero=True`` always returns
    exactly min(top_n, K (K - 1) / 2) pairs, filling up with zero-score pairs in index order.
    """
    assert top_n >= 0, f"top_n must be >= 0, got {top_n}"
    pairs = contract.confusable_pairs(_numpy(cm), top_n, include_zero)  # (P, 2)
    return torch.from_numpy(pairs).to(cm.device)


def pair_error(cm: Tensor, pairs: Tensor | Sequence[Sequence[int]]) -> Tensor:
    """Pair error e_ij = (C_ij + C_ji) / (n_i + n_j) for each pair (P,) float64: the fraction
    of the two classes' samples mistaken for the other class of the pair. NaN when both
    classes are absent from the split (:func:`carrot.contract.pair_error`)."""
    pairs = _as_pairs(pairs, torch.device("cpu")).numpy()  # (P, 2)
    return torch.from_numpy(contract.pair_error(_numpy(cm), pairs)).to(cm.device)


# ----------------------------------------------------------------------- prototypes
def class_prototypes(embeddings: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Class means of the L2-normalised embeddings (K, D) float64.

    The means are *not* renormalised (their norm < 1 measures the class's spread; cosines do
    not depend on it). Rows of classes absent from the split are NaN, so every cosine
    involving them is NaN rather than a misleading 0.
    """
    labels = _check_labels(labels, num_classes)
    h = l2_normalize(_check_features(embeddings, labels, "embeddings"))  # (N, D)
    means, counts = class_means(h, labels.to(h.device), num_classes, dtype=STAT_DTYPE)  # (K, D), (K,)
    return _nan_absent(means, counts)


def prototype_cosine(prototypes: Tensor, pairs: Tensor | Sequence[Sequence[int]]) -> Tensor:
    """cos(mu_i, mu_j) for each pair (P,) float64; NaN if either class is absent
    (NaN prototype row); 0 for an exactly zero prototype."""
    unit = l2_normalize(prototypes.to(STAT_DTYPE))  # (K, D)
    pairs = _as_pairs(pairs, prototypes.device)
    return (unit[pairs[:, 0]] * unit[pairs[:, 1]]).sum(1)


def offdiag_cosine_stats(prototypes: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and spread of cos(mu_i, mu_j) over all pairs i != j of present classes
    (rows without NaN): the equiangularity of neural collapse (a simplex ETF has mean
    -1/(K-1) and std 0). The std is the population std (divide by the number of pairs),
    which is the same whether each unordered pair is counted once or twice. Both are NaN
    with fewer than two present classes. Returns two 0-dim float64 tensors.
    """
    present = ~torch.isnan(prototypes).any(dim=1)  # (K,)
    unit = l2_normalize(prototypes[present].to(STAT_DTYPE))  # (K', D)
    k = unit.shape[0]
    if k < 2:
        nan = unit.new_tensor(torch.nan)
        return nan, nan.clone()
    iu = torch.triu_indices(k, k, offset=1, device=unit.device)
    cos = (unit @ unit.T)[iu[0], iu[1]]  # (K'(K'-1)/2,)
    return cos.mean(), cos.std(correction=0)


# --------------------------------------------------------------------- rho (overlap)
def class_diag_gaussians(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Diagonal-Gaussian moments of each class: ``(mu, var, counts)``.

    Computed by the shared ``carrot.geometry.class_moments`` (the same statistics the
    ``bhattacharyya`` variant uses in a batch), so in float32: mu (K, D), var (K, D) the
    maximum-likelihood (population, divide by n_c) per-dimension variance, two-pass. A class
    with one sample has var 0 (``pair_bhattacharyya`` floors it at eps); absent classes have NaN rows.
    counts (K,) int64.
    """
    labels = _check_labels(labels, num_classes)
    assert features.ndim == 2 and features.shape[0] == labels.shape[0], (
        f"features must be (N, D) with N = len(labels), got {tuple(features.shape)}"
    )
    labels = labels.to(features.device)
    mu, var, counts = class_moments(features, labels, num_classes)  # (K, D), (K, D), (K,) float32
    return _nan_absent(mu, counts), _nan_absent(var, counts), counts.long()


def pair_bhattacharyya(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    pairs: Tensor | Sequence[Sequence[int]],
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Bhattacharyya distance D_B and coefficient rho_ij = exp(-D_B), (P,) and (P,) float32,
    between the diagonal Gaussians fitted to the features of classes i and j
    (``class_diag_gaussians``), via ``carrot.geometry.bhattacharyya_pairs`` (variances floored
    at / smoothed by ``eps``; float32 like the ``bhattacharyya`` variant's own rho, so the two
    are comparable). NaN for a pair with an absent class. On wide layers D_B sums over many
    dimensions and rho underflows to 0 in float32; D_B keeps the information, so the
    evaluation logs both. To score several pair sets on one layer, pass them concatenated and
    split the result (the moments are computed once per call).
    """
    mu, var, _ = class_diag_gaussians(features, labels, num_classes)
    pairs = _as_pairs(pairs, mu.device)
    return bhattacharyya_pairs(mu, var, pairs[:, 0], pairs[:, 1], eps)


# ------------------------------------------------------------------------ collapse
def nc1(embeddings: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Within-class variability collapse NC1 = Tr(Sigma_W Sigma_B^+) / K' (Papyan, Han &
    Donoho 2020), 0-dim float64, on the embeddings as given (normalise them first if wanted).

    Exact normalisation, with N samples h_n, the K' classes present in the split, n_c samples
    of class c, mu_c their mean and mu_G = (1/N) sum_n h_n the global sample mean:

        Sigma_W = (1/N)  sum_n (h_n - mu_{y_n}) (h_n - mu_{y_n})^T   (all samples pooled)
        Sigma_B = (1/K') sum_c (mu_c - mu_G) (mu_c - mu_G)^T         (present classes)
        NC1     = trace(Sigma_W pinv(Sigma_B)) / K'

    pinv drops eigenvalues of Sigma_B below D * eps(float64) times the largest
    (``torch.linalg.pinv``'s default). Sigma_B = M^T M / K' for the (K', D) matrix M of
    centred means, so with M = U S V^T, trace(Sigma_W pinv(Sigma_B)) = K' sum_k
    ||(H - mu_y) v_k||^2 / (N s_k^2): no D x D matrix is formed and the cost is one
    (N, D) x (D, K') product. NaN with fewer than two present classes or when all class
    means coincide (Sigma_B = 0, where the formula would give a misleading 0).
    """
    labels = _check_labels(labels, num_classes)
    h = _check_features(embeddings, labels, "embeddings")  # (N, D)
    labels = labels.to(h.device)
    mu, counts = class_means(h, labels, num_classes, dtype=STAT_DTYPE)  # (K, D), (K,)
    present = counts > 0
    k = int(present.sum())
    if k < 2:
        return h.new_tensor(torch.nan)
    d, eps = h.shape[1], torch.finfo(h.dtype).eps
    global_mean = h.mean(0)  # (D,)
    centred_means = mu[present] - global_mean  # (K', D) rows mu_c - mu_G
    _, s, vh = torch.linalg.svd(centred_means, full_matrices=False)  # s (r,), vh (r, D)
    keep = s.square() > d * eps * s[0].square()  # the eigenvalues of Sigma_B that pinv keeps
    within = (h - mu[labels]) @ vh[keep].T  # (N, r') within-class deviations along the kept directions
    # trace(Sigma_W pinv(Sigma_B)) / K' = sum_k (within_k^T within_k / N) / s_k^2
    value = (within.square().sum(0) / s[keep].square()).sum() / h.shape[0]
    # All class means equal up to rounding: Sigma_B is 0 and NC1 undefined (pinv would say 0).
    rounding = d * eps * (mu[present].norm() + global_mean.norm())
    return torch.where(s[0] > rounding, value, torch.nan)


# --------------------------------------------------------------------- linear probe
def _standardise(x: Tensor, mean: Tensor, std: Tensor, dtype: torch.dtype) -> Tensor:
    return ((x.to(STAT_DTYPE) - mean) / std).to(dtype)


def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Feature mean and population std (float64); a constant feature gets std 1."""
    x = x.to(STAT_DTYPE)
    mean = x.mean(0)
    std = x.std(0, correction=0)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def stratified_holdout(labels: Tensor, num_classes: int, fraction: float, seed: int = 0) -> Tensor:
    """Boolean mask (N,) of a stratified held-out part: the project's one stratified split
    (:func:`carrot.data.stratified_split`: round(fraction * n_c) random samples of each class c,
    never a class's last sample), drawn on the host: the same mask on every device."""
    from carrot.data import stratified_split

    labels = _check_labels(labels, num_classes)
    _, held = stratified_split(labels.cpu().numpy(), fraction, seed)
    mask = torch.zeros(labels.numel(), dtype=torch.bool)
    mask[torch.from_numpy(held)] = True
    return mask.to(labels.device)


def fit_logistic_regression(
    x: Tensor,
    y: Tensor,
    l2: float,
    init: tuple[Tensor, Tensor] | None = None,
    max_iter: int = 200,
    tol: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression: ``(weight (C, D), bias (C,))`` minimising

        mean_n CE(W x_n + b, y_n) + (l2 / 2) ||W||_F^2       (bias unpenalised)

    over C = max(y) + 1 classes, by full-batch L-BFGS (strong-Wolfe line search; stops when
    the largest gradient entry < ``tol``, the loss stops changing, or after ``max_iter``
    iterations), in ``x``'s dtype and on its device, from ``init`` (zeros by default). This is
    scikit-learn's ``LogisticRegression(C=1 / (n * l2))`` objective divided by ``C n``.
    """
    if init is None:
        num_out = int(y.max()) + 1
        init = (x.new_zeros(num_out, x.shape[1]), x.new_zeros(num_out))
    # Callers may sit in an eval loop under no_grad or inference_mode; inference tensors
    # cannot be saved for backward, hence the clones.
    with torch.inference_mode(False), torch.enable_grad():
        x = x.clone() if x.is_inference() else x
        y = y.clone() if y.is_inference() else y
        weight = init[0].to(x).clone().requires_grad_(True)  # (C, D)
        bias = init[1].to(x).clone().requires_grad_(True)  # (C,)
        opt = torch.optim.LBFGS(
            [weight, bias],
            lr=1.0,
            max_iter=max_iter,
            tolerance_grad=tol,
            tolerance_change=1e-12,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            opt.zero_grad()
            logits = torch.addmm(bias, x, weight.T)  # (N, C)
            loss = F.cross_entropy(logits, y) + 0.5 * l2 * weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
    return weight.detach(), bias.detach()


def _accuracy_of(x: Tensor, y: Tensor, params: tuple[Tensor, Tensor]) -> float:
    if y.numel() == 0:
        return math.nan
    pred = torch.addmm(params[1], x, params[0].T).argmax(1)
    return float((pred == y).to(STAT_DTYPE).mean())


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    eval_x: Tensor,
    eval_y: Tensor,
    num_classes: int,
    l2_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    holdout_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 200,
    tol: float = 1e-5,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Linear-probe accuracy of frozen pooled features (SPEC: "Linear-probe accuracy").

    1. Features are standardised with the mean and population std of the training
       features (a constant feature gets std 1); the evaluation features with the same.
    2. Multinomial logistic regression over the classes present in ``train_y``, minimising

           mean_n CE(W x_n + b, y_n) + (l2 / 2) ||W||_F^2        (intercept b unpenalised)

       by full-batch L-BFGS (``torch.optim.LBFGS``, strong-Wolfe line search, stop when the
       largest gradient entry < ``tol`` or after ``max_iter`` iterations) on ``device``
       (default: where ``train_x`` is). This is scikit-learn's ``LogisticRegression``
       objective ``C sum_n CE + ||W||^2 / 2`` divided by ``C n``: **C = 1 / (n * l2)** with
       n the number of samples fitted.
    3. l2 is chosen on a stratified held-out part of the training set (``holdout_fraction``
       of each class, rounded, never a class's last sample; standardised with the fit
       part's moments): the grid value with the best held-out accuracy, ties going to the
       larger l2. The grid is fitted from the largest l2 down, each fit warm-started from the
       previous one. If the held-out part is empty the middle grid value (in sorted order)
       is used.
    4. Refit on the whole training set with that l2 (warm-started) and score ``eval_x``.
       Evaluation samples of classes absent from ``train_y`` count as errors.

    Deterministic for a fixed ``seed`` (the split is drawn by a CPU generator).

    Returns ``{"acc", "l2", "holdout_acc", "n_train", "n_eval", "num_train_classes"}``
    (floats / ints) plus ``"holdout_acc/l2_<l2:g>"`` for every grid value (names MLflow accepts). Safe to call under
    ``torch.no_grad`` / ``torch.inference_mode`` (see ``fit_logistic_regression``).
    """
    train_y = _check_labels(train_y, num_classes, "train_y")
    eval_y = _check_labels(eval_y, num_classes, "eval_y")
    assert train_x.ndim == 2 and eval_x.ndim == 2, "probe features must be (N, D) pooled features"
    assert train_x.shape[0] == train_y.numel() > 0, "train_x and train_y must be non-empty and match"
    assert eval_x.shape[0] == eval_y.numel(), "eval_x and eval_y must match"
    assert train_x.shape[1] == eval_x.shape[1], "train and eval features differ in dimension"
    assert 0.0 <= holdout_fraction < 1.0, f"holdout_fraction must be in [0, 1), got {holdout_fraction}"
    grid = sorted((float(v) for v in l2_grid), reverse=True)
    assert grid and all(v >= 0 for v in grid), f"l2_grid must be non-empty and >= 0, got {l2_grid}"
    device = torch.device(device) if device is not None else train_x.device

    train_x, eval_x = train_x.to(device), eval_x.to(device)
    train_y, eval_y = train_y.to(device), eval_y.to(device)

    # fit only the classes seen in training (as scikit-learn does): index remap K -> K'
    classes = torch.nonzero(_class_counts(train_y, num_classes)).squeeze(1)  # (K',)
    remap = torch.full((num_classes,), -1, dtype=torch.long, device=device)
    remap[classes] = torch.arange(classes.numel(), device=device)
    y_train = remap[train_y]  # (N,) in [0, K')
    y_eval = remap[eval_y]  # (M,) -1 for classes never trained on: always wrong

    zeros = (
        torch.zeros(classes.numel(), train_x.shape[1], device=device, dtype=dtype),
        torch.zeros(classes.numel(), device=device, dtype=dtype),
    )

    # 1) choose l2 on a stratified held-out part of the training set
    hold = stratified_holdout(y_train, classes.numel(), holdout_fraction, seed)  # (N,) bool
    fit_x, hold_x = train_x[~hold], train_x[hold]
    mean, std = _moments(fit_x)
    fit_x, hold_x = _standardise(fit_x, mean, std, dtype), _standardise(hold_x, mean, std, dtype)
    fit_y, hold_y = y_train[~hold], y_train[hold]
    result: dict[str, float] = {}
    params, fitted = zeros, {}
    best_l2, best_acc = grid[len(grid) // 2], -math.inf
    if hold_y.numel() > 0 and len(grid) > 1:
        for l2 in grid:  # largest first: strict '>' keeps the larger l2 on ties
            params = fit_logistic_regression(fit_x, fit_y, l2, params, max_iter, tol)
            fitted[l2] = params
            acc = _accuracy_of(hold_x, hold_y, params)
            result[f"holdout_acc/l2_{l2:g}"] = acc
            if acc > best_acc:
                best_l2, best_acc = l2, acc
    elif len(grid) == 1:
        best_l2 = grid[0]

    # 2) refit on the whole training set with the chosen l2 and score the eval split
    mean, std = _moments(train_x)
    x_all = _standardise(train_x, mean, std, dtype)
    params = fit_logistic_regression(x_all, y_train, best_l2, fitted.get(best_l2, zeros), max_iter, tol)
    acc = _accuracy_of(_standardise(eval_x, mean, std, dtype), y_eval, params)

    result.update(
        acc=acc,
        l2=best_l2,
        holdout_acc=best_acc if best_acc > -math.inf else math.nan,
        n_train=int(train_y.numel()),
        n_eval=int(eval_y.numel()),
        num_train_classes=int(classes.numel()),
    )
    return result
