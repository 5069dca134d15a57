"""barrier: barrier_terms against a numpy loop and closed forms; the variant's switches."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from carrot.variants import StepBatch, create_variant
from carrot.variants.barrier import barrier_terms


def _reference(z: np.ndarray, y: np.ndarray, eps: float = 1e-12):
    """Straight from the formulas, one class at a time (numpy, float64)."""
    d = z.shape[1]
    s_bar = max(((z - z.mean(0)) ** 2).sum(1).mean(), eps)
    r_var, r_rank, rs, ers = [], [], [], []
    for c in sorted(set(y.tolist())):
        x = z[y == c]
        if len(x) < 2:
            continue
        xc = x - x.mean(0)
        s_c = (xc**2).sum(1).mean()
        r = max(s_c / s_bar, eps)
        lam = np.clip(np.linalg.eigvalsh(xc.T @ xc / len(x)), 0, None)
        p = lam / lam.sum()
        p = p[p > 0]
        erank = math.exp(-(p * np.log(p)).sum())
        r_var.append(-math.log(r))
        r_rank.append(-math.log(max(erank / d, eps)))
        rs.append(r)
        ers.append(erank / d)
    if not r_var:
        return 0.0, 0.0, 1.0, 1.0, 0
    return np.mean(r_var), np.mean(r_rank), min(rs), min(ers), len(r_var)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_barrier_terms_against_loop(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([4, 4, 4, 4, 1, 1, 6, 2, 2, 2, 9, 9])[torch.randperm(12, generator=g)]
    z = torch.randn(12, 5, generator=g, dtype=torch.float64) * torch.rand(12, 1, generator=g, dtype=torch.float64)
    r_var, r_rank, stats = barrier_terms(z, y)
    ref = _reference(z.numpy(), y.numpy())
    assert r_var.dtype == torch.float64  # float64 in, float64 out (float32 from half or float32 input)
    assert r_var.item() == pytest.approx(ref[0], rel=1e-4)
    assert r_rank.item() == pytest.approx(ref[1], rel=1e-4)
    assert stats["min_r"].item() == pytest.approx(ref[2], rel=1e-4)
    assert stats["min_erank_ratio"].item() == pytest.approx(ref[3], rel=1e-4)
    assert stats["classes_used"].item() == ref[4] == 4


def test_rank_barrier_closed_form() -> None:
    """Each class spans r orthogonal directions with equal variance: erank_c = r exactly."""
    d, r = 8, 3
    base = torch.eye(d)[:r] * 2.0  # (r, D)
    cls0 = torch.cat([base, -base])  # centred, covariance (4/3) on r axes
    cls1 = torch.cat([base, -base]) * 0.5 + 1.0
    z = torch.cat([cls0, cls1])
    y = torch.tensor([0] * 6 + [1] * 6)
    _, r_rank, stats = barrier_terms(z, y)
    assert r_rank.item() == pytest.approx(-math.log(r / d), rel=1e-5)
    assert stats["erank"][:2].tolist() == pytest.approx([r, r], rel=1e-5)
    # S_c = 4 and 1; S_bar adds the between-class spread of the two means (0 and 1 per dim)
    s_bar = ((z - z.mean(0)) ** 2).sum(1).mean().item()
    assert stats["r"][:2].tolist() == pytest.approx([4 / s_bar, 1 / s_bar], rel=1e-5)


@pytest.mark.parametrize("y", [torch.arange(6), torch.tensor([3])])
def test_no_class_with_two_samples(y: torch.Tensor) -> None:
    z = torch.randn(len(y), 4, requires_grad=True)
    r_var, r_rank, stats = barrier_terms(z, y)
    assert r_var.item() == 0 and r_rank.item() == 0 and stats["classes_used"].item() == 0
    assert stats["min_r"].item() == 1.0 and stats["min_erank_ratio"].item() == 1.0
    (r_var + r_rank).backward()
    assert torch.isfinite(z.grad).all()


def test_identical_embeddings_finite() -> None:
    z = torch.ones(8, 4, requires_grad=True)
    r_var, r_rank, stats = barrier_terms(z, torch.arange(4).repeat(2))
    (r_var + r_rank).backward()
    assert torch.isfinite(r_var) and torch.isfinite(r_rank) and torch.isfinite(z.grad).all()
    assert r_rank.item() == pytest.approx(math.log(4), rel=1e-5)  # erank 1 of a zero spectrum


@pytest.mark.parametrize("value", [0.7, 123.456])
def test_identical_embeddings_give_no_round_off_gradient(value: float) -> None:
    """Centring identical samples leaves round-off (~1e-7 of the values), not a spread: the
    barriers sit at their clamps (r_c = eps, erank 1) with a zero gradient, where 1 / round-off
    gave ~1e7 to 1e8 (and inf once cast to float16)."""
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 5])
    z = torch.full((len(y), 12), value, requires_grad=True)
    r_var, r_rank, stats = barrier_terms(z, y)
    (r_var + r_rank).backward()
    assert r_var.item() == pytest.approx(-math.log(1e-12), rel=1e-6)  # r_c clamped at eps
    assert r_rank.item() == pytest.approx(math.log(12), rel=1e-6)  # erank 1
    assert z.grad.abs().max().item() == 0.0


def test_gradient_pushes_collapsed_class_apart() -> None:
    g = torch.Generator().manual_seed(7)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    z = torch.randn(6, 3, generator=g)
    z[:3] = z[0] + 0.01 * torch.randn(3, 3, generator=g)  # class 0 nearly collapsed
    z.requires_grad_(True)
    r_var, _, _ = barrier_terms(z, y)
    r_var.backward()
    step = z.detach() - 1e-4 * z.grad
    spread = lambda x: ((x[:3] - x[:3].mean(0)) ** 2).sum()  # noqa: E731
    assert spread(step) > spread(z.detach())


def test_variant_switches_and_weight() -> None:
    y = torch.arange(3).repeat_interleave(4)
    emb = torch.randn(12, 5, requires_grad=True)
    head = nn.Linear(5, 3)
    batch = StepBatch(emb, head(emb), y, head, progress=10.0)
    r_var, r_rank, _ = barrier_terms(emb, y)
    full = create_variant("barrier")(batch)
    assert set(full.terms) == {"ce", "r_var", "r_rank"}
    assert full.loss.item() == pytest.approx((full.terms["ce"] + r_var + r_rank).item(), rel=1e-5)
    half = create_variant("barrier", weight=0.5, use_rank=False)(batch)
    assert set(half.terms) == {"ce", "r_var"}
    assert half.terms["r_var"].item() == pytest.approx(0.5 * r_var.item(), rel=1e-6)
    with pytest.raises(ValueError):
        create_variant("barrier", weight=-1.0)


def _torch_reference(z: torch.Tensor, y: torch.Tensor, eps: float = 1e-12):
    """(R_var, R_rank) from a per-class loop with autograd (float64, eigvalsh per class)."""
    d = z.shape[1]
    s_bar = ((z - z.mean(0)) ** 2).sum(1).mean().clamp_min(eps)
    r_var, r_rank = [], []
    for c in sorted(set(y.tolist())):
        x = z[y == c]
        if len(x) < 2:
            continue
        xc = x - x.mean(0)
        r_var.append(-torch.log(((xc**2).sum(1).mean() / s_bar).clamp_min(eps)))
        lam = torch.linalg.eigvalsh(xc @ xc.T / len(x)).clamp_min(0)  # same non-zero spectrum as the covariance
        p = lam / lam.sum()
        erank = torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum())
        r_rank.append(-torch.log((erank / d).clamp_min(eps)))
    return torch.stack(r_var).mean(), torch.stack(r_rank).mean()


@pytest.mark.parametrize("case", ["random", "shared_spectra"])
def test_barrier_gradient_against_loop(case: str) -> None:
    """The one-eigh backward equals autograd through a per-class eigvalsh loop, also when
    classes share eigenvalues (a class and its translate) and a class has a repeated sample."""
    g = torch.Generator().manual_seed(5)
    if case == "random":
        y = torch.tensor([3, 0, 3, 1, 1, 3, 2, 0, 0, 3, 4, 1, 1])
        z = torch.randn(13, 9, generator=g, dtype=torch.float64) + 2.0
    else:
        a = torch.randn(4, 9, generator=g, dtype=torch.float64)
        dup = torch.randn(3, 9, generator=g, dtype=torch.float64)
        dup[2] = dup[0]
        z = torch.cat([a, a + 5.0, dup, torch.randn(1, 9, generator=g, dtype=torch.float64)])
        y = torch.tensor([0] * 4 + [1] * 4 + [2] * 3 + [3])
    z.requires_grad_(True)
    r_var, r_rank, _ = barrier_terms(z, y)
    (r_var + 0.5 * r_rank).backward()
    got = z.grad.clone()
    z.grad = None
    ref_var, ref_rank = _torch_reference(z, y)
    (ref_var + 0.5 * ref_rank).backward()
    assert r_var.item() == pytest.approx(ref_var.item(), rel=1e-5)
    assert r_rank.item() == pytest.approx(ref_rank.item(), rel=1e-5)
    torch.testing.assert_close(got.double(), z.grad, rtol=1e-4, atol=1e-5)


def test_barrier_under_bf16_autocast_matches_float32() -> None:
    """SPEC: float32 statistics under autocast, so the bf16 context changes nothing."""
    y = torch.arange(8).repeat_interleave(4)
    z = torch.randn(32, 64) + 3.0
    ref = barrier_terms(z, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = barrier_terms(z, y)
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-6)
    assert got[1].item() == pytest.approx(ref[1].item(), rel=1e-6)


def test_barrier_backward_gradcheck() -> None:
    """The hand-written backward of both barriers, float64 finite differences (classes of
    2, 3 and 4 samples, a singleton, and two classes with the same spectrum)."""
    from carrot.geometry import class_slots
    from carrot.variants.barrier import _BarrierTerms

    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 6, generator=g, dtype=torch.float64)
    z = torch.cat([a, a + 1.0, torch.randn(6, 6, generator=g, dtype=torch.float64)]).requires_grad_(True)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 5])
    inv, counts, _ = class_slots(y)
    assert torch.autograd.gradcheck(lambda t: _BarrierTerms.apply(t, inv, counts.double(), 1e-12)[:2], (z,))
