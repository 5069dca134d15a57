"""carrot.geometry against slow loops and closed forms."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from carrot.geometry import (
    bhattacharyya_diag, bhattacharyya_pairs, block_spectrum, class_means, class_moments, class_slots, class_sums,
    compact_slots, device_routes, effective_rank, kth_largest, l2_normalize, pairwise_distance, rms_radius,
    sample_pair_bhattacharyya, soft_confusion, spectral_entropy, symmetric_confusion, used_class_slots, xlogx_sum,
)
from carrot.geometry import bhattacharyya as bhattacharyya_module
from carrot.geometry.slots import _class_slots_on_host, _class_slots_sync_free


def _labels(seed: int = 0) -> torch.Tensor:
    # classes with 1, 2 and many samples, shuffled, non-contiguous label values
    y = torch.tensor([9, 2, 2, 7, 7, 7, 7, 4, 11, 11, 11, 0])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]


# ------------------------------------------------------------------------- slots
SLOT_FUNCTIONS = {"class_slots": class_slots, "sync_free": _class_slots_sync_free, "on_host": _class_slots_on_host}


@pytest.mark.parametrize("name", SLOT_FUNCTIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_slots_matches_unique(seed: int, name: str) -> None:
    """Both routes (CPU tensors take the host's; CUDA the sync-free one) against torch.unique
    written out."""
    y = _labels(seed)
    inv, counts, labels = SLOT_FUNCTIONS[name](y)
    classes, ref_inv, ref_counts = torch.unique(y, sorted=True, return_inverse=True, return_counts=True)
    c = len(classes)
    assert inv.dtype == torch.long and counts.dtype == torch.float32
    assert inv.shape == counts.shape == labels.shape == (len(y),)
    assert torch.equal(inv, ref_inv)
    assert torch.equal(counts[:c], ref_counts.float())
    assert torch.all(counts[c:] == 0)
    assert torch.equal(labels[:c], classes)
    assert torch.equal(labels[inv], y)


@pytest.mark.parametrize("name", SLOT_FUNCTIONS)
def test_class_slots_single_class_and_all_distinct(name: str) -> None:
    inv, counts, labels = SLOT_FUNCTIONS[name](torch.full((5,), 3))
    assert inv.tolist() == [0] * 5 and counts.tolist() == [5, 0, 0, 0, 0] and labels[0] == 3
    inv, counts, _ = SLOT_FUNCTIONS[name](torch.tensor([4, 1, 3]))
    assert inv.tolist() == [2, 0, 1] and counts.tolist() == [1, 1, 1]


@pytest.mark.parametrize("name", SLOT_FUNCTIONS)
def test_class_slots_with_negative_labels(name: str) -> None:
    inv, counts, labels = SLOT_FUNCTIONS[name](torch.tensor([-2, 5, -2, 0]))
    assert inv.tolist() == [0, 2, 0, 1] and counts.tolist() == [2, 1, 1, 0] and labels[:3].tolist() == [-2, 0, 5]


@pytest.mark.parametrize("on_host", [True, False])
def test_used_class_slots_is_class_slots_with_the_used_count(on_host: bool) -> None:
    """The host keeps the C used slots and says C; the device route keeps all B and says None."""
    y = _labels(1)
    ref_inv, ref_counts, ref_labels = class_slots(y)
    c = int((ref_counts > 0).sum())
    with contextlib.nullcontext() if on_host else device_routes():
        inv, counts, labels, used = used_class_slots(y)
    assert used == (c if on_host else None)
    assert counts.dtype == torch.float32 and inv.dtype == labels.dtype == torch.long
    assert torch.equal(inv, ref_inv)
    assert torch.equal(counts, ref_counts[:c] if on_host else ref_counts)
    assert torch.equal(labels[:c], ref_labels[:c]) and labels.shape == counts.shape


@pytest.mark.parametrize("on_host", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_largest_against_a_sort(on_host: bool, dtype: torch.dtype) -> None:
    """Both routes (numpy's sort on the host, topk elsewhere) give each row's m-th largest value,
    ties counted with their multiplicity, for every m from 1 to N."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (7, 9), generator=g).to(dtype) / 4  # many ties
    x[2] = torch.randn(9, generator=g, dtype=dtype)
    x[3] = 0.25  # one value only
    for m in range(1, 10):
        with contextlib.nullcontext() if on_host else device_routes():
            got = kth_largest(x, m)
        expect = torch.tensor([sorted(row.tolist(), reverse=True)[m - 1] for row in x], dtype=dtype)
        assert got.dtype == dtype and torch.equal(got, expect), m


def test_compact_slots() -> None:
    keep = torch.tensor([False, True, True, False, True])
    assert compact_slots(keep).tolist() == [-1, 0, 1, -1, 2]


# ------------------------------------------------------------------------ moments
def test_class_moments_against_loop() -> None:
    y = _labels()
    x = torch.randn(len(y), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    inv, counts, labels = class_slots(y)
    mu, var, n = class_moments(x.half(), inv, len(y))
    assert mu.dtype == var.dtype == n.dtype == torch.float32
    mu, var, n = class_moments(x, inv, len(y))
    for s in range(int((counts > 0).sum())):
        rows = x[y == labels[s]].numpy()
        assert n[s] == len(rows)
        np.testing.assert_allclose(mu[s].numpy(), rows.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var[s].numpy(), rows.var(0), rtol=1e-4, atol=1e-6)  # biased
    assert torch.all(mu[counts == 0] == 0) and torch.all(var[counts == 0] == 0)
    means, _ = class_means(x, inv, len(y))
    torch.testing.assert_close(means, mu)
    sums, n64 = class_sums(x, inv, len(y), dtype=torch.float64)
    means64, _ = class_means(x, inv, len(y), dtype=torch.float64)
    assert sums.dtype == means64.dtype == n64.dtype == torch.float64
    torch.testing.assert_close(means64, sums / n64.clamp_min(1)[:, None])
    torch.testing.assert_close(means64.float(), mu)
    s7 = labels.tolist().index(7)  # the class with four samples
    rows = x[y == 7]
    np.testing.assert_allclose(
        rms_radius(var[s7:s7 + 1]).numpy(), [math.sqrt(((rows - rows.mean(0)) ** 2).sum(1).mean())], rtol=1e-5
    )


def test_l2_normalize_is_f_normalize_with_zero_gradient_at_zero() -> None:
    x = torch.cat([torch.randn(5, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)]).requires_grad_(True)
    h = l2_normalize(x)
    torch.testing.assert_close(h, torch.nn.functional.normalize(x, dim=1))
    assert torch.all(h[-1] == 0)
    (h * torch.randn_like(h)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.all(x.grad[-1] == 0)  # no direction, no gradient (F.normalize: 1 / eps = 1e12)
    # the normal rows keep F.normalize's gradient
    ref = x.detach().clone().requires_grad_(True)
    x.grad = None
    w = torch.randn(5, 4, dtype=torch.float64)
    (l2_normalize(x)[:5] * w).sum().backward()
    (torch.nn.functional.normalize(ref[:5], dim=1) * w).sum().backward()
    torch.testing.assert_close(x.grad[:5], ref.grad[:5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_l2_normalize_tiny_zero_and_nan_rows(dtype: torch.dtype) -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-13, 0.0], [float("nan"), 1.0]], dtype=dtype).requires_grad_(True)
    h = l2_normalize(x)
    assert h.dtype == dtype
    torch.testing.assert_close(h[0].float(), torch.tensor([0.6, 0.8]), rtol=1e-2, atol=1e-3)
    assert torch.all(h[1:3] == 0) and torch.isnan(h[3]).all()  # an absent class's NaN row stays NaN
    h[:3].sum().backward()
    assert torch.isfinite(x.grad[:3]).all() and torch.all(x.grad[1:3] == 0)


def test_pairwise_distance_and_zero_gradient() -> None:
    a = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(pairwise_distance(a).double(), torch.cdist(a, a), rtol=1e-4, atol=1e-4)
    same = torch.ones(3, 4, requires_grad=True)
    pairwise_distance(same).sum().backward()
    assert torch.isfinite(same.grad).all()


# ----------------------------------------------------------------- Bhattacharyya
def _db_textbook(mu1, mu2, cov1, cov2) -> float:
    """D_B = 1/8 d^T S^-1 d + 1/2 ln(det S / sqrt(det S1 det S2)), S = (S1 + S2)/2."""
    s = 0.5 * (cov1 + cov2)
    d = mu1 - mu2
    return float(d @ np.linalg.solve(s, d) / 8
                 + 0.5 * math.log(np.linalg.det(s) / math.sqrt(np.linalg.det(cov1) * np.linalg.det(cov2))))


def test_bhattacharyya_1d_closed_form_and_overlap_integral() -> None:
    m1, s1, m2, s2 = 0.3, 0.7, 1.4, 1.3
    mu = torch.tensor([[m1], [m2]])
    var = torch.tensor([[s1**2], [s2**2]])
    dist, coef = bhattacharyya_pairs(mu, var, torch.tensor([0]), torch.tensor([1]), eps=1e-12)
    closed = 0.25 * (m1 - m2) ** 2 / (s1**2 + s2**2) + 0.5 * math.log((s1**2 + s2**2) / (2 * s1 * s2))
    assert dist.item() == pytest.approx(closed, rel=1e-5)

    def dens(x, m, s):
        return math.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

    overlap, _ = integrate.quad(lambda x: math.sqrt(dens(x, m1, s1) * dens(x, m2, s2)), -30, 30)
    assert coef.item() == pytest.approx(overlap, rel=1e-5)


def test_bhattacharyya_multid_textbook() -> None:
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(4, 6, generator=g, dtype=torch.float64)
    var = torch.rand(4, 6, generator=g, dtype=torch.float64) + 0.2
    dist, coef = bhattacharyya_diag(mu, var, eps=1e-12)
    assert dist.shape == coef.shape == (4, 4) and dist.dtype == torch.float32
    for c in range(4):
        for d in range(4):
            ref = _db_textbook(mu[c].numpy(), mu[d].numpy(), np.diag(var[c].numpy()), np.diag(var[d].numpy()))
            assert dist[c, d].item() == pytest.approx(ref, rel=1e-4, abs=1e-5)
            assert coef[c, d].item() == pytest.approx(math.exp(-ref), rel=1e-4)
    torch.testing.assert_close(dist, dist.T)


def test_bhattacharyya_eps_formula_and_pairs_agree_with_diag() -> None:
    """eps: var clamped >= eps before the log, vbar = (v_c + v_d)/2 + eps, in both functions."""
    eps = 1e-2
    mu = torch.tensor([[0.0, 1.0], [0.5, -1.0], [2.0, 0.0]])
    var = torch.tensor([[0.0, 1.0], [0.5, 1e-5], [1.0, 2.0]])  # a zero and a tiny variance
    dist, coef = bhattacharyya_diag(mu, var, eps=eps)
    v = var.double().clamp_min(eps)
    for c in range(3):
        for d in range(3):
            vbar = (v[c] + v[d]) / 2 + eps
            ref = (0.125 * ((mu[c] - mu[d]).double() ** 2 / vbar).sum()
                   + 0.5 * (vbar.log().sum() - 0.5 * (v[c].log().sum() + v[d].log().sum())))
            assert dist[c, d].item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    i, j = torch.tensor([0, 2, 1, 1]), torch.tensor([1, 0, 1, 2])
    pd, pc = bhattacharyya_pairs(mu, var, i, j, eps=eps)
    torch.testing.assert_close(pd, dist[i, j])
    torch.testing.assert_close(pc, coef[i, j])


def test_bhattacharyya_diag_blocks_match_single_block(monkeypatch: pytest.MonkeyPatch) -> None:
    mu, var = torch.randn(9, 5), torch.rand(9, 5) + 0.1
    whole = bhattacharyya_diag(mu, var)
    monkeypatch.setattr(bhattacharyya_module, "_PAIR_BLOCK_ELEMENTS", 2 * 9 * 5)  # 2 rows per block
    blocked = bhattacharyya_diag(mu, var)
    torch.testing.assert_close(blocked[0], whole[0])
    torch.testing.assert_close(blocked[1], whole[1])


def test_bhattacharyya_gradient_finite_on_degenerate_input() -> None:
    mu = torch.zeros(3, 4, requires_grad=True)
    var = torch.zeros(3, 4, requires_grad=True)
    dist, coef = bhattacharyya_diag(mu, var)
    (dist.sum() + coef.sum()).backward()
    assert torch.isfinite(dist).all() and torch.isfinite(mu.grad).all() and torch.isfinite(var.grad).all()


# ---------------------------------------------------------------- effective rank
def _with_spectrum(n: int, d: int, sing: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, len(sing), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, len(sing), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sing, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("n,d", [(8, 20), (30, 6)])  # Gram path and scatter path
@pytest.mark.parametrize("r", [1, 3, 5])
def test_effective_rank_equal_singular_values_is_rank(n: int, d: int, r: int) -> None:
    x = _with_spectrum(n, d, [2.5] * r)
    er = effective_rank(x)
    assert er.dtype == torch.float32 and er.ndim == 0
    assert er.item() == pytest.approx(r, rel=1e-5)


@pytest.mark.parametrize("sing", [[3.0, 2.0, 1.0, 0.5], [3.0, 2.0, 1.0, 0.03]])  # p down to ~1e-4
def test_effective_rank_known_spectrum(sing: list[float]) -> None:
    lam = np.array(sing) ** 2
    p = lam / lam.sum()
    ref = math.exp(-(p * np.log(p)).sum())
    assert effective_rank(_with_spectrum(10, 7, sing).float()).item() == pytest.approx(ref, rel=1e-5)
    assert effective_rank(_with_spectrum(10, 7, sing).half()).item() == pytest.approx(ref, rel=1e-2)


def test_effective_rank_uses_covariance_eigenvalues_not_singular_values() -> None:
    """The definition: p = normalised eigenvalues of the covariance = squared singular values of
    the centred matrix, not Roy & Vetterli's normalised singular values. A diagonal matrix has
    its diagonal as singular values, so both conventions are known in closed form."""
    sing = np.array([4.0, 2.0, 1.0, 0.5])
    x = torch.zeros(4, 6, dtype=torch.float64)
    x[range(4), range(4)] = torch.tensor(sing)

    def erank(weights: np.ndarray) -> float:
        p = weights / weights.sum()
        return math.exp(-(p * np.log(p)).sum())

    eigen_convention, singular_convention = erank(sing**2), erank(sing)
    assert singular_convention - eigen_convention > 0.5  # the conventions really differ here
    got = effective_rank(x).item()
    assert got == pytest.approx(eigen_convention, rel=1e-6)
    assert got != pytest.approx(singular_convention, rel=1e-2)
    # the same spectrum through the Gram path (n < D) and the scatter path (n > D)
    assert effective_rank(x.T.contiguous()).item() == pytest.approx(eigen_convention, rel=1e-6)


def test_effective_rank_center_option() -> None:
    x = torch.randn(12, 5) + 10.0
    assert effective_rank(x, center=True).item() == pytest.approx(effective_rank(x - x.mean(0)).item(), rel=1e-5)
    assert effective_rank(x).item() < effective_rank(x, center=True).item()  # the mean dominates


@pytest.mark.parametrize("make", [lambda: torch.zeros(5, 8), lambda: _with_spectrum(6, 9, [1.0, 1.0, 1.0]).float()])
def test_effective_rank_gradient_finite(make) -> None:
    x = make().requires_grad_(True)
    er = effective_rank(x)
    er.backward()
    assert torch.isfinite(er) and torch.isfinite(x.grad).all()
    if x.detach().abs().sum() == 0:
        assert er.item() == pytest.approx(1.0)


def test_spectral_entropy_of_trace_and_xlogx() -> None:
    """H = log T - sum lam log lam / T equals -sum p log p; 0 for a zero spectrum."""
    lam = torch.tensor([[4.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, -1e-9, 0.0]], dtype=torch.float64)
    h = spectral_entropy(*xlogx_sum(lam))
    for row, got in zip(lam.clamp_min(0), h):
        p = row[row > 0] / row.sum() if row.sum() > 0 else row[:0]
        assert got.item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-12)
    assert h[2].item() == pytest.approx(math.log(2))


# ----------------------------------------------------------------- soft confusion
def test_soft_confusion_against_loop() -> None:
    y = _labels(2)
    k = 12
    logits = torch.randn(len(y), k, requires_grad=True)
    probs = torch.softmax(logits, 1)
    inv, counts, labels = class_slots(y)
    a = soft_confusion(probs, inv, counts, labels)
    assert not a.requires_grad and a.shape == (len(y), len(y))
    c = int((counts > 0).sum())
    ref = torch.zeros(c, c)
    for s in range(c):
        for t in range(c):
            ref[s, t] = probs.detach()[y == labels[s], labels[t]].mean()
    ref = (ref + ref.T) / 2
    ref.fill_diagonal_(0)
    torch.testing.assert_close(a[:c, :c], ref)
    assert torch.all(a[c:] == 0) and torch.all(a[:, c:] == 0)
    m = torch.rand(4, 4)
    torch.testing.assert_close(symmetric_confusion(m), (m + m.T).fill_diagonal_(0) / 2)


# ------------------------------------------- one eigh for every class, sample-level D_B
def test_block_spectrum_against_loop() -> None:
    """Traces, tr(G log G) and the spectral entropy per block and the batch scatter from one
    B x B eigh, against a per-class loop, also with rows left out (-1). (The hand-written
    backward is checked through the barrier that uses it, tests/test_barrier.py.)"""
    y = _labels(3)
    inv, counts, labels = class_slots(y)
    x = torch.randn(len(y), 7, dtype=torch.float64)
    spec = block_spectrum(x, inv, inv, len(y))
    xlogx = spec.xlogx()
    erank = torch.exp(spec.entropy(xlogx))
    torch.testing.assert_close(spec.total, ((x - x.mean(0)) ** 2).sum())
    for s in range(len(y)):
        rows = x[y == labels[s]] if counts[s] > 0 else x.new_zeros(0, 7)
        xc = rows - rows.mean(0) if len(rows) else rows
        lam = torch.linalg.eigvalsh(xc @ xc.T).clamp_min(0) if len(rows) else x.new_zeros(0)
        assert spec.trace[s].item() == pytest.approx((xc**2).sum().item(), rel=1e-10, abs=1e-12)
        ref = (lam * torch.log(lam.clamp_min(1e-30))).sum().item()
        assert xlogx[s].item() == pytest.approx(ref, rel=1e-8, abs=1e-10)
        want = effective_rank(rows, center=True).item() if len(rows) else 1.0
        assert erank[s].item() == pytest.approx(want, rel=1e-4)
    keep = compact_slots(counts >= 3)
    big = [s for s in range(len(y)) if counts[s] >= 3]
    part = block_spectrum(x, inv, keep[inv], 2)
    torch.testing.assert_close(part.trace, spec.trace[big])
    torch.testing.assert_close(part.xlogx(), xlogx[big])


def test_block_spectrum_degenerate_classes() -> None:
    """Identical samples, one-sample classes and repeated spectra: erank 2, 2, 1, 1."""
    base = torch.eye(6)[:2]
    x = torch.cat([base, -base, base, -base, torch.ones(4, 6), torch.zeros(1, 6)])
    y = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3])
    inv, _, _ = class_slots(y)
    spec = block_spectrum(x, inv, inv, len(y))
    er = torch.exp(spec.entropy(spec.xlogx()))
    assert torch.isfinite(er).all()
    assert er[:4].tolist() == pytest.approx([2.0, 2.0, 1.0, 1.0], rel=1e-5)


def test_statistics_ignore_bf16_autocast() -> None:
    """SPEC: float32 statistics even under autocast (the products inside run with it off)."""
    y = _labels(4)
    x = torch.randn(len(y), 16) + 5.0
    inv, _, _ = class_slots(y)
    ref = class_moments(x, inv, len(y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = class_moments(x, inv, len(y))
        d = pairwise_distance(x)
        er = effective_rank(x, center=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(d, pairwise_distance(x))
    assert er.item() == pytest.approx(effective_rank(x, center=True).item(), rel=1e-6)


@pytest.mark.parametrize("widths", [(5,), (2, 3), (4, 2, 6)])
def test_sample_pair_bhattacharyya_against_moments_and_gradcheck(widths: tuple[int, ...]) -> None:
    """Equals bhattacharyya_pairs on class_moments (per block of columns); float64 gradcheck
    of the hand-written backward, with a zero-variance class (the eps clamp) in the pairs.
    (4, 2, 6): blocks of 2, 1 and 3 chunks of the widths' gcd."""
    y = _labels(5)
    inv, counts, _ = class_slots(y)
    x = torch.randn(len(y), sum(widths), dtype=torch.float64)
    first = int(torch.nonzero(counts == 2)[0])  # a two-sample class made zero-variance
    x[inv == first] = x[inv == first][0]
    x.requires_grad_(True)
    pairs = torch.tensor([[0, 1, 2, first, 3], [1, 2, 3, 0, 3]])
    eps = 1e-3
    db = sample_pair_bhattacharyya(x, inv, len(y), pairs, widths, eps)
    assert db.shape == (5, len(widths)) and db.dtype == torch.float64  # float64 stays float64
    assert sample_pair_bhattacharyya(x.detach().half(), inv, len(y), pairs, widths, eps).dtype == torch.float32
    mu, var, _ = class_moments(x.detach(), inv, len(y))
    start = 0
    for k, w in enumerate(widths):
        ref, _ = bhattacharyya_pairs(mu[:, start:start + w], var[:, start:start + w], pairs[0], pairs[1], eps)
        torch.testing.assert_close(db[:, k].float(), ref, rtol=1e-5, atol=1e-5)
        start += w
    fn = lambda t: bhattacharyya_module._SamplePairBhattacharyya.apply(t, inv, pairs, len(y), widths, eps)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
