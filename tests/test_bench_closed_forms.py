"""The hand-written backwards and solvers behind the bench's cost targets give the numbers of
the plain autograd formulas they stand for: same values, gradients to round-off (float64), and
on CUDA a spectrum without a host sync that matches ``eigh``."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from carrot.geometry import block_spectrum, class_slots, l2_normalize
from carrot.variants.barrier import barrier_terms
from carrot.variants.base import linear_pass
from carrot.variants.expansion import expansion_operator
from carrot.variants.nuisance import gram_schmidt_coefficients
from carrot.variants.prototype import blend_prototypes, prototype_pair_loss


def _grad(fn, *inputs, seed=0):
    """Value of ``fn(*inputs)`` and the gradient of ``<fn(...), g>`` for a fixed random g."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad((out * g).sum(), leaves)
    return out.detach(), grads


def _reference_l2_normalize(x, eps=1e-12):
    """The autograd formula: x * rsqrt(||x||^2), 0 where ||x|| <= eps (squares summed, not
    vector_norm: an independent route to the same numbers up to rounding)."""
    sq = (x * x).sum(-1, keepdim=True)
    no_norm = sq <= eps * eps
    scaled = x * torch.rsqrt(torch.where(no_norm, torch.ones_like(sq), sq))
    return torch.where(no_norm, torch.zeros_like(scaled), scaled)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l2_normalize_value_and_gradient(dtype):
    x = torch.randn(9, 13, dtype=dtype)
    x[2] = 0.0
    x[5] = 1e-14
    out, (g,) = _grad(l2_normalize, x)
    ref, (g_ref,) = _grad(_reference_l2_normalize, x)
    # the same forward to a couple of ulps (unit rows: entries below 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=3e-7 if dtype == torch.float32 else 1e-15)
    torch.testing.assert_close(g, g_ref, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-7)
    assert (g[2] == 0).all() and (g[5] == 0).all()  # no direction: zero gradient


def test_blended_prototypes_value_and_gradient():
    mu = F.normalize(torch.randn(6, 10, dtype=torch.float64), dim=1)
    mu[4] = 0.0  # a never-seen class starts at its normalised batch mean
    means = torch.randn(6, 10, dtype=torch.float64)
    out, (g,) = _grad(lambda m: blend_prototypes(mu, m, 0.3), means)
    ref, (g_ref,) = _grad(lambda m: _reference_l2_normalize(0.7 * mu + 0.3 * m), means)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-15)  # the blend is a lerp: a few ulps
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)


def _reference_pair_loss(t_slots, t_buffer, one_hot, stored, weight, alpha):
    """The Gram splice and the loss as autograd ops (the formula of the prototype variant's doc)."""
    present = one_hot.sum(1) > 0
    rows = one_hot @ (t_slots @ t_buffer.T)
    gram = torch.where(present[:, None], rows, torch.where(present, rows.T, stored))
    gram = torch.where(present[:, None] & present, rows + rows.T - rows.detach(), gram)
    sq = gram.diagonal()
    d2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(0.0)
    return (weight * torch.exp(-alpha * d2)).sum()


def test_prototype_pair_loss_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    k, s, d = 12, 8, 5
    labels = torch.tensor([1, 4, 4, 7, 9, 0, 0, 0])  # slots 5.. unused (label 0, count 0)
    used = torch.tensor([1, 1, 0, 1, 1, 0, 0, 0], dtype=torch.bool)
    one_hot = ((torch.arange(k)[:, None] == labels[None, :]) & used).double()  # (K, S)
    t_buffer = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    stored = t_buffer @ t_buffer.T
    t_slots = F.normalize(torch.randn(s, d, generator=g, dtype=torch.float64), dim=1)
    omega = torch.rand(k, k, generator=g, dtype=torch.float64)
    mask = torch.rand(k, k, generator=g) > 0.6
    mask = mask.triu(1)
    count = mask.sum().clamp_min(1)
    weight = omega * mask / count

    def fused(t):
        return prototype_pair_loss(t, t_buffer, one_hot, stored, omega, mask, 3.0)[0]

    out, (grad,) = _grad(fused, t_slots)
    ref, (grad_ref,) = _grad(lambda t: _reference_pair_loss(t, t_buffer, one_hot, stored, weight, 3.0), t_slots)
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-14)
    assert (grad[~used] == 0).all()  # unused slots reach no class


@pytest.mark.parametrize("labels", [[3, 3, 3, 1, 1, 8, 5, 5, 5, 5], [2, 2, 2, 2]])
def test_expansion_operator_value_and_gradient(labels):
    """The detached-statistics operator against its autograd form (mu and gamma detached)."""
    y = torch.tensor(labels)
    z = torch.randn(len(y), 7, dtype=torch.float64)

    def reference(z):
        h = F.normalize(z, dim=1)
        _, stats = expansion_operator(z.detach(), y)  # gamma per sample
        inv, counts, _ = class_slots(y)
        mu = torch.zeros(len(y), 7, dtype=z.dtype).index_add_(0, inv, h.detach()) / counts.clamp_min(1)[:, None]
        mu_i = mu[inv]
        expanded = F.normalize(mu_i + stats["gamma"].to(z.dtype)[:, None] * (h - mu_i), dim=1)
        return expanded if len(set(labels)) >= 2 else h

    out, (g,) = _grad(lambda t: expansion_operator(t, y)[0], z)
    ref, (g_ref,) = _grad(reference, z)
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-7)  # the operator works in float32
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-6)
    z32 = z.float()
    free, _ = _grad(lambda t: expansion_operator(t, y, detach_stats=False)[0], z32)
    assert torch.equal(expansion_operator(z32, y)[0], free)  # both paths: the same z+


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("labels", [[3, 3, 3, 1, 1, 8, 5, 5, 5, 5], [2, 2, 2, 2]])
def test_expansion_on_unit_rows_after_the_neck(labels, detach):
    """``unit=True`` (the variant, after its L2-normalising neck): the same z+ and, through the
    neck, the same gradient as the operator that normalises again; without the neck the
    gradient keeps the radial part that the neck projects out."""
    y = torch.tensor(labels)
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(10, 7, generator=g, dtype=torch.float64) * 3.0
    x = centres[y] + 0.2 * torch.randn(len(y), 7, generator=g, dtype=torch.float64)  # tight classes: gamma > 1
    if len(set(labels)) >= 2:
        assert expansion_operator(x, y)[1]["gamma"].max() > 1.5
    twice, (g_twice,) = _grad(lambda t: expansion_operator(l2_normalize(t), y, detach_stats=detach)[0], x)
    once, (g_once,) = _grad(lambda t: expansion_operator(l2_normalize(t), y, detach_stats=detach, unit=True)[0], x)
    # float32 inside; gamma ~ 14 scales the rounding of h
    torch.testing.assert_close(once, twice, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_once, g_twice, rtol=1e-4, atol=1e-5)
    h = l2_normalize(x)
    _, (g_h,) = _grad(lambda t: expansion_operator(t, y, detach_stats=detach, unit=True)[0], h)
    if len(set(labels)) >= 2:  # the radial part, which the neck removes, is there before it
        assert (g_h * h).sum(1).abs().max() > 1e-3


def test_linear_pass_matches_linear():
    x, w, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64), torch.randn(3)
    b = b.double()
    out, grads = _grad(linear_pass, x, w, b)
    ref, grads_ref = _grad(F.linear, x, w, b)
    assert torch.equal(out, ref)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
        assert got.is_contiguous()
    # a value computed elsewhere is the forward; the backward is still the linear map's
    value = ref.detach() + 1e-3
    out, grads = _grad(lambda x, w, b: linear_pass(x, w, b, value=value), x, w, b)
    assert torch.equal(out, value)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


def _gram_schmidt_loop(s, rel_tol):
    """Gram-Schmidt in coefficient space as an obvious loop (float64)."""
    b, m, _ = s.shape
    t = torch.zeros_like(s)
    for i in range(b):
        for j in range(m):
            c = t[i].T @ s[i, :, j]  # q_r . d_j for every earlier r (0 for the rest)
            v = -(t[i] @ c)
            v[j] += 1.0
            n2 = s[i, j, j] - (c * c).sum()
            if n2 > rel_tol * s[i, j, j]:
                t[i, :, j] = v / n2.sqrt()
    return t


def test_gram_schmidt_cholesky_route_and_loop_agree():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(6, 4, 9, generator=g, dtype=torch.float64)
    full = d @ d.transpose(1, 2)  # full rank: the Cholesky route on the CPU
    t, keep = gram_schmidt_coefficients(full, 1e-10)
    assert keep.all()
    torch.testing.assert_close(t, _gram_schmidt_loop(full, 1e-10), rtol=1e-10, atol=1e-12)
    q = d.transpose(1, 2) @ t  # (B, D, m) orthonormal columns
    torch.testing.assert_close(q.transpose(1, 2) @ q, torch.eye(4, dtype=torch.float64).expand(6, 4, 4))
    d[:, 2] = d[:, 0] + d[:, 1]  # a dependent competitor: dropped, through the loop
    deficient = d @ d.transpose(1, 2)
    t, keep = gram_schmidt_coefficients(deficient, 1e-10)
    assert keep[:, 2].logical_not().all() and keep[:, [0, 1, 3]].all()
    torch.testing.assert_close(t, _gram_schmidt_loop(deficient, 1e-10), rtol=1e-10, atol=1e-12)


def _scipy_entropies(x: np.ndarray, y: np.ndarray) -> dict[int, float]:
    """Spectral entropy of each class's covariance, from scipy's eigensolver (float64)."""
    from scipy.linalg import eigh

    out = {}
    for c in sorted(set(y.tolist())):
        xc = x[y == c] - x[y == c].mean(0)
        lam = np.clip(eigh(xc @ xc.T, eigvals_only=True), 0, None)
        if lam.sum() <= 0:
            out[c] = 0.0
            continue
        p = lam[lam > 0] / lam.sum()
        out[c] = float(-(p * np.log(p)).sum())
    return out


@pytest.mark.parametrize("case", ["pk", "random", "degenerate", "spread"])
def test_resolvent_spectrum_matches_eigh_and_scipy(case):
    """The sync-free route (taken on CUDA) gives eigh's tr(G log G) and entropies, to 1e-9 in float64."""
    g = torch.Generator().manual_seed(3)
    if case == "pk":
        y, x = torch.arange(8).repeat_interleave(4), torch.randn(32, 40, generator=g, dtype=torch.float64)
    elif case == "random":
        y = torch.randint(0, 6, (40,), generator=g)
        x = torch.randn(40, 30, generator=g, dtype=torch.float64) * torch.rand(40, 1, generator=g, dtype=torch.float64)
    elif case == "degenerate":  # repeated samples, a rank-1 class, identical samples, a singleton
        base = torch.eye(6, dtype=torch.float64)[:2]
        x = torch.cat([base, -base, base, 2 * base, torch.ones(4, 6, dtype=torch.float64),
                       torch.zeros(1, 6, dtype=torch.float64)])
        y = torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [3])
    else:  # features on scales 1e-3 .. 1e3
        y = torch.arange(6).repeat_interleave(5)
        x = torch.randn(30, 25, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 25, dtype=torch.float64)
    inv, counts, labels = class_slots(y)
    eig = block_spectrum(x, inv, inv, len(y), resolvent=False)
    res = block_spectrum(x, inv, inv, len(y), resolvent=True)
    xe, xr = eig.xlogx(), res.xlogx()
    scale = eig.trace.abs().max()
    torch.testing.assert_close(xr, xe, rtol=0, atol=1e-9 * float(scale))
    h_res = res.entropy(xr)
    want = _scipy_entropies(x.numpy(), y.numpy())
    for s in range(len(y)):
        if counts[s] > 0:
            assert h_res[s].item() == pytest.approx(want[int(labels[s])], abs=1e-9)
    # f'(G) acts on the centred samples alike (its null-space part is never read)
    torch.testing.assert_close(res.fprime @ res.xc, eig.fprime @ eig.xc, rtol=1e-7, atol=1e-9 * float(scale))


def test_barrier_resolvent_route_values_and_gradient():
    """The barrier's terms and gradient through the sync-free route equal the eigh route's:
    to float32 round-off in the variant (which works in float32), to 1e-8 in float64."""
    from carrot.variants.barrier import _BarrierTerms

    g = torch.Generator().manual_seed(4)
    y = torch.tensor([4, 4, 4, 4, 1, 1, 6, 2, 2, 2, 9, 9, 3, 3, 3, 3])
    z = torch.randn(16, 24, generator=g, dtype=torch.float64) * torch.rand(16, 1, generator=g, dtype=torch.float64)
    inv, counts, _ = class_slots(y)
    for dtype, tol in ((torch.float32, {"rtol": 1e-5, "atol": 1e-6}), (torch.float64, {"rtol": 1e-8, "atol": 1e-10})):
        got = []
        for resolvent in (False, True):
            leaf = z.to(dtype).requires_grad_(True)
            r_var, r_rank, _, erank, _, _ = _BarrierTerms.apply(leaf, inv, counts.to(dtype), 1e-12, resolvent)
            (grad,) = torch.autograd.grad(r_var + 2.0 * r_rank, leaf)
            got.append((r_var.detach(), r_rank.detach(), erank, grad))
        for a, b in zip(*got):
            torch.testing.assert_close(b, a, **tol)
    r_var, r_rank, stats = barrier_terms(z.float(), y, resolvent=True)
    assert torch.isfinite(r_rank) and r_rank.item() > 0 and stats["classes_used"].item() == 5


def test_barrier_resolvent_route_gradcheck():
    """Finite differences through the sync-free route (float64)."""
    from carrot.variants.barrier import _BarrierTerms

    g = torch.Generator().manual_seed(2)
    z = torch.randn(10, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 5])
    inv, counts, _ = class_slots(y)
    assert torch.autograd.gradcheck(lambda t: _BarrierTerms.apply(t, inv, counts.double(), 1e-12, True)[:2], (z,))


def test_hand_written_backwards_gradcheck():
    """Finite differences (float64) through each hand-written backward."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(l2_normalize, (x,))
    mu = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    assert torch.autograd.gradcheck(lambda m: blend_prototypes(mu, m, 0.2), (x,))
    w = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_pass, (x, w, b))
    k = 6
    labels, used = torch.tensor([1, 3, 0]), torch.tensor([True, True, False])
    one_hot = ((torch.arange(k)[:, None] == labels[None, :]) & used).double()
    t_buffer = F.normalize(torch.randn(k, 4, generator=g, dtype=torch.float64), dim=1)
    omega = torch.rand(k, k, generator=g, dtype=torch.float64)
    mask = torch.ones(k, k, dtype=torch.bool).triu(1)
    t_slots = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)

    def pair_loss(t):  # the buffer holds this step's prototypes in the present rows, as in the variant
        buffer = t_buffer.index_put((labels[:2],), t[:2].detach())
        return prototype_pair_loss(t, buffer, one_hot, t_buffer @ t_buffer.T, omega, mask, 2.0)[0]

    assert torch.autograd.gradcheck(pair_loss, (t_slots,))
