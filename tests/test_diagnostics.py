"""Per-epoch diagnostics against independent references: scikit-learn, NumPy, slow Python
loops over the confusion matrix, and closed forms for Gaussians with known parameters."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from carrot import contract
from carrot import diagnostics as dg


def _predictions(num_classes: int = 12, n: int = 400, seed: int = 0):
    """Labels and noisy predictions where classes 3 (true and predicted) and 7 (true only)
    are absent, and a few classes are confused with a neighbour."""
    rng = np.random.default_rng(seed)
    present = np.array([c for c in range(num_classes) if c not in (3, 7)])
    labels = rng.choice(present, size=n)
    pred = labels.copy()
    noisy = rng.random(n) < 0.35
    pred[noisy] = np.where(rng.random(noisy.sum()) < 0.6, (labels[noisy] + 1) % num_classes, rng.choice(present, noisy.sum()))
    pred[pred == 3] = 4  # nothing predicted as 3 either
    return torch.from_numpy(pred), torch.from_numpy(labels)


# ------------------------------------------------------------------ confusion, accuracy
def test_confusion_matrix_and_accuracies_match_sklearn():
    k = 12
    pred, labels = _predictions(k)
    cm = dg.confusion_matrix(pred, labels, k)
    ref = metrics.confusion_matrix(labels.numpy(), pred.numpy(), labels=list(range(k)))
    assert cm.dtype == torch.int64 and cm.shape == (k, k)
    np.testing.assert_array_equal(cm.numpy(), ref)
    assert ref[7].sum() == 0 and ref[:, 3].sum() == 0  # the absent classes really are absent

    recall = metrics.recall_score(
        labels.numpy(), pred.numpy(), labels=list(range(k)), average=None, zero_division=np.nan
    )
    np.testing.assert_allclose(dg.per_class_accuracy(cm).numpy(), recall, rtol=0, atol=1e-15, equal_nan=True)
    assert torch.isnan(dg.per_class_accuracy(cm)[[3, 7]]).all()
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": intended here
        warnings.simplefilter("ignore", UserWarning)
        balanced = metrics.balanced_accuracy_score(labels.numpy(), pred.numpy())
    assert math.isclose(float(dg.mean_class_accuracy(cm)), balanced, abs_tol=1e-12)
    assert math.isclose(float(dg.accuracy(cm)), metrics.accuracy_score(labels.numpy(), pred.numpy()), abs_tol=1e-12)


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(AssertionError):
        dg.confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 5)
    assert torch.isnan(dg.accuracy(torch.zeros(4, 4, dtype=torch.long)))


# --------------------------------------------------------------------------- pairs
def _loop_scores(cm: np.ndarray) -> dict[tuple[int, int], float]:
    n = cm.sum(1)
    scores = {}
    for i in range(len(cm)):
        for j in range(i + 1, len(cm)):
            a = cm[i, j] / n[i] if n[i] > 0 else 0.0
            b = cm[j, i] / n[j] if n[j] > 0 else 0.0
            scores[(i, j)] = (a + b) / 2
    return scores


def _random_cm(k: int, seed: int, absent=(), density: float = 0.15, high: int = 3) -> torch.Tensor:
    """Small integer counts: many exactly tied scores, some zero-score pairs."""
    rng = np.random.default_rng(seed)
    cm = rng.integers(0, high, size=(k, k)) * (rng.random((k, k)) < density)
    np.fill_diagonal(cm, 10)  # equal n_i for most rows -> ties between different pairs
    for c in absent:
        cm[c] = 0
    return torch.from_numpy(cm.astype(np.int64))


def test_pair_scores_and_pair_error_match_a_double_loop():
    cm = _random_cm(9, seed=1, absent=(2,))
    cm[5, 2] = 4  # absent class 2 is still predicted: pair (2, 5) has a score and an error
    c = cm.numpy()
    n = c.sum(1)
    scores = contract.pair_scores(c)  # the formula diagnostics and analysis share
    ref = _loop_scores(c)
    for (i, j), s in ref.items():
        assert scores[i, j].item() == s and scores[j, i].item() == s  # bitwise: same float ops
    assert (scores.diagonal() == 0).all()

    pairs = torch.tensor(list(ref))  # every i < j
    errors = dg.pair_error(cm, pairs)
    assert errors.dtype == torch.float64 and errors.device == cm.device
    for p, (i, j) in enumerate(ref):
        assert math.isclose(errors[p].item(), (c[i, j] + c[j, i]) / (n[i] + n[j]), rel_tol=1e-15)
    assert errors[pairs.tolist().index([2, 5])].item() == 4 / n[5]


def test_pair_error_is_nan_only_when_both_classes_are_absent():
    cm = torch.zeros(4, 4, dtype=torch.long)
    cm[0, 0], cm[0, 1], cm[1, 1] = 3, 1, 2
    e = dg.pair_error(cm, [[0, 1], [0, 2], [2, 3]])
    assert e[0].item() == pytest.approx(1 / 6) and e[1].item() == 0.0 and math.isnan(e[2].item())
    assert dg.pair_error(cm, torch.zeros(0, 2, dtype=torch.long)).shape == (0,)


@pytest.mark.parametrize(
    "k, seed, top_n, density", [(9, 1, 20, 0.15), (9, 2, 5, 0.15), (6, 3, 100, 0.5), (40, 4, 20, 0.15)]
)
def test_confusable_pairs_match_a_sorted_loop(k, seed, top_n, density):
    cm = _random_cm(k, seed, absent=(1,), density=density)
    scores = _loop_scores(cm.numpy())
    ranked = sorted(scores, key=lambda p: (-scores[p], p[0], p[1]))
    positive = [p for p in ranked if scores[p] > 0]
    # the data must exercise the tie-break and the zero-score rule
    top_scores = [scores[p] for p in positive[: top_n + 1]]
    assert len(set(top_scores)) < len(top_scores), "test data has no tied scores"
    assert len(positive) < len(ranked)

    got = dg.confusable_pairs(cm, top_n=top_n)
    assert got.dtype == torch.int64 and got.shape == (min(top_n, len(positive)), 2)
    assert [tuple(p) for p in got.tolist()] == positive[:top_n]

    with_zero = dg.confusable_pairs(cm, top_n=top_n, include_zero=True)
    assert [tuple(p) for p in with_zero.tolist()] == ranked[:top_n]
    assert with_zero.shape[0] == min(top_n, k * (k - 1) // 2)


def test_confusable_pairs_of_a_perfect_classifier_is_empty():
    cm = torch.diag(torch.tensor([5, 3, 0, 2]))
    assert dg.confusable_pairs(cm, top_n=3).shape == (0, 2)
    assert torch.isnan(dg.pair_error(cm, dg.confusable_pairs(cm)).mean())
    assert dg.confusable_pairs(cm, top_n=3, include_zero=True).tolist() == [[0, 1], [0, 2], [0, 3]]


# ---------------------------------------------------------------------- prototypes
def _embeddings(k=7, d=16, n=300, absent=(4,), seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    for c in absent:
        labels[labels == c] = (c + 1) % k
    labels[0] = 6
    labels[labels == 6] = 5
    labels[0] = 6  # class 6 has exactly one sample
    centres = torch.randn(k, d, generator=g) * 2
    x = centres[labels] + torch.randn(n, d, generator=g) * (0.5 + torch.rand(d, generator=g))
    return x, labels


def test_prototypes_and_cosines_match_numpy():
    k = 7
    x, labels = _embeddings(k)
    protos = dg.class_prototypes(x, labels, k)
    xn = x.double().numpy()
    xn = xn / np.linalg.norm(xn, axis=1, keepdims=True)
    y = labels.numpy()
    ref = np.stack([xn[y == c].mean(0) if (y == c).any() else np.full(xn.shape[1], np.nan) for c in range(k)])
    np.testing.assert_allclose(protos.numpy(), ref, rtol=1e-12, atol=1e-14, equal_nan=True)
    assert torch.isnan(protos[4]).all() and not torch.isnan(protos[6]).any()

    pairs = torch.tensor([[0, 1], [2, 5], [1, 6], [3, 4]])
    cos = dg.prototype_cosine(protos, pairs)
    for p, (i, j) in enumerate(pairs.tolist()):
        want = ref[i] @ ref[j] / (np.linalg.norm(ref[i]) * np.linalg.norm(ref[j]))
        if np.isnan(want):
            assert math.isnan(cos[p].item())
        else:
            assert cos[p].item() == pytest.approx(want, abs=1e-12)

    mean, std = dg.offdiag_cosine_stats(protos)
    present = [c for c in range(k) if c != 4]
    unit = ref[present] / np.linalg.norm(ref[present], axis=1, keepdims=True)
    g = unit @ unit.T
    off = g[~np.eye(len(present), dtype=bool)]  # every ordered pair i != j
    assert mean.item() == pytest.approx(off.mean(), abs=1e-12)
    assert std.item() == pytest.approx(off.std(), abs=1e-12)


def test_offdiag_cosines_of_a_simplex_etf():
    k = 6
    m = torch.eye(k, dtype=torch.float64) - 1.0 / k  # simplex ETF, rows in a (k-1)-dim subspace
    x = torch.cat([m * 3.0, torch.zeros(k, 2, dtype=torch.float64)], 1)  # embed in D = k + 2
    protos = dg.class_prototypes(x, torch.arange(k), k)
    mean, std = dg.offdiag_cosine_stats(protos)
    assert mean.item() == pytest.approx(-1 / (k - 1), abs=1e-12) and std.item() == pytest.approx(0, abs=1e-12)
    one = dg.class_prototypes(x[:1], torch.zeros(1, dtype=torch.long), k)
    assert all(math.isnan(v.item()) for v in dg.offdiag_cosine_stats(one))


# ------------------------------------------------------------------------------ rho
def _bhattacharyya_coefficient_1d(m1, s1, m2, s2):
    """Textbook Bhattacharyya coefficient of N(m1, s1^2) and N(m2, s2^2)."""
    v = s1**2 + s2**2
    return np.sqrt(2 * s1 * s2 / v) * np.exp(-((m1 - m2) ** 2) / (4 * v))


def test_rho_converges_to_the_closed_form_of_the_true_gaussians():
    rng = np.random.default_rng(0)
    d, n = 3, 60_000
    mean = np.array([[0.0, 1.0, -0.5], [0.6, 0.4, 0.0], [0.0, 1.0, -0.5]])
    sd = np.array([[1.0, 0.5, 2.0], [1.5, 0.7, 1.0], [0.4, 0.5, 2.0]])
    labels = np.repeat(np.arange(3), n)
    x = mean[labels] + sd[labels] * rng.standard_normal((3 * n, d))
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2]])
    dist, rho = dg.pair_bhattacharyya(torch.from_numpy(x), torch.from_numpy(labels), 3, pairs)
    torch.testing.assert_close(rho, torch.exp(-dist))
    for p, (i, j) in enumerate(pairs.tolist()):
        want = np.prod(_bhattacharyya_coefficient_1d(mean[i], sd[i], mean[j], sd[j]))
        assert rho[p].item() == pytest.approx(want, rel=0.01), (i, j)
    assert rho.max() < 0.95  # the pairs really overlap only partly


def test_rho_matches_a_loop_over_the_empirical_moments():
    k, eps = 7, 1e-6
    x, labels = _embeddings(k, d=24)
    mu, var, counts = dg.class_diag_gaussians(x, labels, k)
    xn, y = x.double().numpy(), labels.numpy()
    for c in range(k):
        if (y == c).any():
            np.testing.assert_allclose(mu[c].numpy(), xn[y == c].mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(var[c].numpy(), xn[y == c].var(0), rtol=1e-4, atol=1e-6)
        else:
            assert torch.isnan(mu[c]).all() and torch.isnan(var[c]).all()
    assert counts.tolist() == np.bincount(y, minlength=k).tolist()
    assert (var[6] == 0).all()  # one sample

    pairs = [[i, j] for i in range(k) for j in range(i + 1, k)]
    db, rho = dg.pair_bhattacharyya(x, labels, k, pairs, eps=eps)
    for p, (i, j) in enumerate(pairs):
        if not ((y == i).any() and (y == j).any()):
            assert math.isnan(rho[p].item()) and math.isnan(db[p].item())
            continue
        mi, mj = xn[y == i].mean(0), xn[y == j].mean(0)
        vi, vj = np.maximum(xn[y == i].var(0), eps), np.maximum(xn[y == j].var(0), eps)
        vbar = (vi + vj) / 2 + eps
        dist = np.sum((mi - mj) ** 2 / vbar) / 8 + 0.5 * (np.sum(np.log(vbar)) - 0.5 * (np.sum(np.log(vi)) + np.sum(np.log(vj))))
        assert db[p].item() == pytest.approx(dist, rel=1e-4), (i, j)
        assert rho[p].item() == pytest.approx(np.exp(-dist), rel=1e-4, abs=1e-30), (i, j)


# ----------------------------------------------------------------------------- NC1
def _nc1_numpy(h: np.ndarray, y: np.ndarray) -> float:
    classes = [c for c in np.unique(y)]
    mu_g = h.mean(0)
    d = h.shape[1]
    sigma_w = np.zeros((d, d))
    sigma_b = np.zeros((d, d))
    for c in classes:
        hc = h[y == c]
        mu_c = hc.mean(0)
        for row in hc:
            sigma_w += np.outer(row - mu_c, row - mu_c)
        sigma_b += np.outer(mu_c - mu_g, mu_c - mu_g)
    sigma_w /= len(h)
    sigma_b /= len(classes)
    return float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, rcond=d * np.finfo(float).eps)) / len(classes))


@pytest.mark.parametrize("k, d", [(7, 16), (12, 5)])  # D > K (Sigma_B rank-deficient) and D < K
def test_nc1_matches_a_direct_numpy_computation(k, d):
    x, labels = _embeddings(k, d=d, n=250)  # imbalanced, class 4 absent, class 6 a singleton
    got = dg.nc1(x, labels, k)
    want = _nc1_numpy(x.double().numpy(), labels.numpy())
    assert got.dtype == torch.float64 and got.item() == pytest.approx(want, rel=1e-9)
    assert want > 0.01


def test_nc1_is_zero_when_every_sample_sits_on_its_class_mean():
    k, d = 5, 12
    g = torch.Generator().manual_seed(0)
    means = torch.randn(k, d, generator=g)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 4, 4])  # class 3 absent
    assert dg.nc1(means[labels], labels, k).item() == pytest.approx(0.0, abs=1e-12)
    noisy = means[labels] + 0.1 * torch.randn(len(labels), d, generator=g)
    assert dg.nc1(noisy, labels, k).item() > 1e-3
    assert math.isnan(dg.nc1(means[[1, 1]], torch.tensor([1, 1]), k).item())  # one class: undefined
    same = torch.randn(4, d, generator=g, dtype=torch.float64) * 5 + 3
    same = torch.cat([same, same[[2, 0, 3, 1]]])  # two classes, equal means up to rounding
    assert math.isnan(dg.nc1(same, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), k).item())


def test_statistics_accept_half_precision_inputs():
    k = 7
    x, labels = _embeddings(k)
    h = x.half()
    ref = x.half().double()  # the same values, upcast by hand
    torch.testing.assert_close(dg.class_prototypes(h, labels, k), dg.class_prototypes(ref, labels, k), equal_nan=True)
    torch.testing.assert_close(dg.nc1(h, labels, k), dg.nc1(ref, labels, k))
    assert all(torch.isfinite(t).all() for t in dg.pair_bhattacharyya(h, labels, k, [[0, 1]]))


# -------------------------------------------------------------------- linear probe
def test_stratified_holdout_takes_a_rounded_fraction_of_every_class():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 1 + [4] * 7)  # class 3 absent
    mask = dg.stratified_holdout(labels, 5, 0.2, seed=0)
    held = torch.bincount(labels[mask], minlength=5).tolist()
    assert held == [2, 1, 0, 0, 1]  # floor(0.2 n + 1/2)
    half = dg.stratified_holdout(labels, 5, 0.5, seed=0)
    assert torch.bincount(labels[half], minlength=5).tolist() == [5, 2, 0, 0, 4]  # never a class's last sample
    assert torch.equal(mask, dg.stratified_holdout(labels, 5, 0.2, seed=0))
    masks = {tuple(dg.stratified_holdout(labels, 5, 0.2, seed=s).tolist()) for s in range(5)}
    assert len(masks) > 1  # the seed changes which samples are held out


def _objective(x, y, w, b, l2):
    logits = x @ w.T + b
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return -logp[np.arange(len(y)), y].mean() + 0.5 * l2 * np.sum(w**2)


def _digits():
    x, y = load_digits(return_X_y=True)
    return train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)


@pytest.mark.parametrize("l2", [1e-1, 1e-3])
def test_logistic_regression_minimises_sklearns_objective_with_c_equal_one_over_n_l2(l2):
    xtr, _, ytr, _ = _digits()
    xs = StandardScaler().fit_transform(xtr)
    n = len(ytr)
    sk = LogisticRegression(C=1.0 / (n * l2), max_iter=5000, tol=1e-10).fit(xs, ytr)
    w, b = dg.fit_logistic_regression(torch.from_numpy(xs), torch.from_numpy(ytr), l2, max_iter=500, tol=1e-9)
    ours = _objective(xs, ytr, w.numpy(), b.numpy(), l2)
    theirs = _objective(xs, ytr, sk.coef_, sk.intercept_, l2)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-8)
    # the same minimiser (the softmax fixes the biases only up to a common shift)
    np.testing.assert_allclose(w.numpy(), sk.coef_, atol=2e-3 * np.abs(sk.coef_).max())
    np.testing.assert_allclose(b.numpy() - b.numpy().mean(), sk.intercept_ - sk.intercept_.mean(), atol=2e-3)


def test_logistic_regression_leaves_the_bias_unpenalised():
    # Under a huge l2 the weights vanish and the bias alone must fit the class priors:
    # softmax(b) = n_c / n, i.e. b = log n_c + const. A penalised bias would stay near 0.
    counts = torch.tensor([60, 30, 10])
    y = torch.repeat_interleave(torch.arange(3), counts)
    x = torch.randn(len(y), 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w, b = dg.fit_logistic_regression(x, y, l2=1e4, tol=1e-10)
    assert w.abs().max() < 1e-4
    log_prior = counts.double().log()
    torch.testing.assert_close(b - b.mean(), log_prior - log_prior.mean(), atol=1e-4, rtol=0)


def test_linear_probe_accuracy_matches_sklearn_on_digits():
    xtr, xte, ytr, yte = _digits()
    out = dg.linear_probe(torch.from_numpy(xtr).float(), torch.from_numpy(ytr), torch.from_numpy(xte).float(), torch.from_numpy(yte), 10)
    assert out["l2"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    assert out["holdout_acc"] == max(out[f"holdout_acc/l2_{v:g}"] for v in (1e-4, 1e-3, 1e-2, 1e-1, 1.0))
    scaler = StandardScaler().fit(xtr)
    sk = LogisticRegression(C=1.0 / (len(ytr) * out["l2"]), max_iter=2000).fit(scaler.transform(xtr), ytr)
    sk_acc = sk.score(scaler.transform(xte), yte)
    assert abs(out["acc"] - sk_acc) <= 0.02
    assert out["acc"] > 0.9 and out["n_train"] == len(ytr) and out["n_eval"] == len(yte)


def test_linear_probe_selects_l2_by_holdout_accuracy():
    # K=10 Gaussian blobs, D=40 with few samples per class: heavy and light regularisation differ
    g = torch.Generator().manual_seed(1)
    k, d = 10, 40
    centres = torch.randn(k, d, generator=g) * 0.35
    ytr, yte = torch.arange(200) % k, torch.arange(400) % k
    xtr = centres[ytr] + torch.randn(200, d, generator=g)
    xte = centres[yte] + torch.randn(400, d, generator=g)
    grid = (1e-3, 1e-1, 10.0)
    out = dg.linear_probe(xtr, ytr, xte, yte, k, l2_grid=grid, seed=3)
    # recompute the selection by hand with the public pieces
    hold = dg.stratified_holdout(ytr, k, 0.2, seed=3)
    scaler = StandardScaler().fit(xtr[~hold].numpy())
    accs = {}
    for l2 in grid:
        w, b = dg.fit_logistic_regression(torch.from_numpy(scaler.transform(xtr[~hold].numpy())).float(), ytr[~hold], l2)
        pred = (torch.from_numpy(scaler.transform(xtr[hold].numpy())).float() @ w.T + b).argmax(1)
        accs[l2] = (pred == ytr[hold]).double().mean().item()
    assert len(set(accs.values())) > 1, "grid values must differ for the test to mean anything"
    best = max(accs.values())
    assert out["l2"] == max(l2 for l2 in grid if accs[l2] == best)  # ties go to the larger l2
    for l2 in grid:
        assert out[f"holdout_acc/l2_{l2:g}"] == pytest.approx(accs[l2], abs=1.01 / hold.sum().item())
    assert dg.linear_probe(xtr, ytr, xte, yte, k, l2_grid=grid, seed=3) == out  # deterministic


def test_linear_probe_handles_absent_and_singleton_classes_under_inference_mode():
    g = torch.Generator().manual_seed(0)
    k, d = 6, 8
    centres = torch.randn(k, d, generator=g) * 4
    ytr = torch.tensor([0] * 20 + [1] * 20 + [2] * 1 + [4] * 20)  # 3, 5 absent from training
    yte = torch.tensor([0] * 10 + [1] * 10 + [4] * 10 + [5] * 10)  # class 5 never trained on
    xtr = centres[ytr] + 0.3 * torch.randn(len(ytr), d, generator=g)
    xte = centres[yte] + 0.3 * torch.randn(len(yte), d, generator=g)
    with torch.inference_mode():
        out = dg.linear_probe(xtr, ytr, xte, yte, k)
    assert out["num_train_classes"] == 4
    assert out["acc"] == pytest.approx(0.75)  # well separated: all of 0, 1, 4 right, all of 5 wrong
    single = dg.linear_probe(xtr, ytr, xte, yte, k, l2_grid=(0.5,))
    assert single["l2"] == 0.5 and math.isnan(single["holdout_acc"])


# --------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    k = 7
    x, labels = _embeddings(k, d=32)
    pred, plabels = _predictions(k, n=300)
    cm = dg.confusion_matrix(pred, plabels, k)
    cm_gpu = dg.confusion_matrix(pred.cuda(), plabels.cuda(), k)
    assert torch.equal(cm_gpu.cpu(), cm)
    assert torch.equal(dg.confusable_pairs(cm_gpu, 10).cpu(), dg.confusable_pairs(cm, 10))
    pairs = dg.confusable_pairs(cm, 10, include_zero=True)
    torch.testing.assert_close(dg.pair_error(cm_gpu, pairs.cuda()).cpu(), dg.pair_error(cm, pairs), equal_nan=True)
    xc, lc = x.cuda(), labels.cuda()
    protos, protos_gpu = dg.class_prototypes(x, labels, k), dg.class_prototypes(xc, lc, k)
    torch.testing.assert_close(protos_gpu.cpu(), protos, equal_nan=True)
    torch.testing.assert_close(dg.prototype_cosine(protos_gpu, pairs.cuda()).cpu(), dg.prototype_cosine(protos, pairs), equal_nan=True)
    for a, b in zip(dg.offdiag_cosine_stats(protos_gpu), dg.offdiag_cosine_stats(protos)):
        torch.testing.assert_close(a.cpu(), b)
    torch.testing.assert_close(
        dg.pair_bhattacharyya(xc, lc, k, pairs.cuda())[1].cpu(), dg.pair_bhattacharyya(x, labels, k, pairs)[1],
        equal_nan=True, rtol=1e-4, atol=1e-6,
    )
    torch.testing.assert_close(dg.nc1(xc, lc, k).cpu(), dg.nc1(x, labels, k))
    xtr, xte, ytr, yte = (torch.from_numpy(a) for a in _digits())
    cpu = dg.linear_probe(xtr.float(), ytr, xte.float(), yte, 10)
    gpu = dg.linear_probe(xtr.float().cuda(), ytr.cuda(), xte.float().cuda(), yte.cuda(), 10)
    assert abs(cpu["acc"] - gpu["acc"]) <= 0.01
