"""``nuisance``: the label-safe bound against slow references, safety, the variant."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from carrot.variants import StepBatch, create_variant
from carrot.variants.nuisance import competitor_classes, nuisance_augment


def correct_problem(b=24, k=12, d=40, seed=0, dtype=torch.float64):
    """W, b, z, y with every sample correctly classified by a clear margin."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, d, generator=g, dtype=dtype) / math.sqrt(d)
    bias = 0.1 * torch.randn(k, generator=g, dtype=dtype)
    y = torch.arange(b) % k
    z = 3.0 * w[y] * math.sqrt(d) / w[y].norm(dim=1, keepdim=True) + 0.3 * torch.randn(b, d, generator=g, dtype=dtype)
    logits = z @ w.T + bias
    assert (logits.argmax(1) == y).all(), "test problem must be correctly classified"
    return z, y, logits, w, bias


def reference_alpha(z, y, logits, w, bias, topk, gamma, delta, union=False, tol=1e-10):
    """Slow per-sample loop, numpy float64, explicit D x D projector from a QR."""
    z, logits, w, bias = (t.detach().double().numpy() for t in (z, logits, w, bias))
    y = y.numpy()
    k_cls, d = w.shape
    m = min(topk, k_cls - 1)
    log_term = math.log((k_cls - 1) / delta) if union else math.log(1.0 / delta)
    alphas, ranks, bounds = [], [], []
    for i in range(len(y)):
        masked = logits[i].copy()
        masked[y[i]] = -np.inf
        comp = np.argsort(-masked, kind="stable")[:m]
        dirs = np.stack([w[y[i]] - w[c] for c in comp], axis=1)  # (D, m)
        q, r = np.linalg.qr(dirs)
        # rank-revealing basis of the span (an SVD; equals the QR's Q when full rank)
        u, s, _ = np.linalg.svd(dirs, full_matrices=False)
        basis = u[:, s > math.sqrt(tol) * s.max()]
        proj_n = np.eye(d) - basis @ basis.T  # the explicit D x D projector
        row_bounds = np.full(k_cls, np.inf)
        alpha = np.inf
        any_valid = False
        all_positive = True
        for k in range(k_cls):
            if k == y[i]:
                continue
            dk = w[y[i]] - w[k]
            slack = dk @ z[i] + bias[y[i]] - bias[k] - gamma
            all_positive &= slack > 0
            a = float(np.sum((proj_n @ dk) ** 2))
            if a > tol * float(dk @ dk) and a > 0:
                any_valid = True
                row_bounds[k] = slack**2 / (2 * a * log_term)
                alpha = min(alpha, row_bounds[k])
        alphas.append(alpha if (all_positive and any_valid) else 0.0)
        ranks.append(basis.shape[1])
        bounds.append(row_bounds)
    return np.array(alphas), np.array(ranks), np.stack(bounds)


@pytest.mark.parametrize("union", [False, True])
def test_alpha_matches_slow_projector_loop(union):
    z, y, logits, w, bias = correct_problem()
    _, _, st = nuisance_augment(z, y, logits, w, bias, topk=4, gamma_margin=0.1, delta=0.05, union=union)
    ref_alpha, ref_rank, _ = reference_alpha(z, y, logits, w, bias, 4, 0.1, 0.05, union)
    assert (ref_alpha > 0).all()
    np.testing.assert_allclose(st["alpha"].numpy(), ref_alpha, rtol=1e-8)
    np.testing.assert_array_equal(st["rank"].numpy(), ref_rank)
    assert st["subspace_rank"].item() == pytest.approx(4.0)


def test_alpha_respects_every_class_bound():
    """alpha <= slack_k^2 / (2 a_k log(1/delta)) for every k != y, with equality for one k."""
    z, y, logits, w, bias = correct_problem(seed=3)
    _, _, st = nuisance_augment(z, y, logits, w, bias, topk=5, delta=0.05)
    _, _, bounds = reference_alpha(z, y, logits, w, bias, 5, 0.0, 0.05)
    alpha = st["alpha"].numpy()[:, None]
    assert (alpha <= bounds * (1 + 1e-9)).all()
    assert np.allclose(alpha[:, 0], bounds.min(1), rtol=1e-9)
    # The sketch's minimum over the competitors only: their a_k ~ 0, so it is unbounded.
    comp = competitor_classes(logits, y, 5)
    assert np.isinf(np.take_along_axis(bounds, comp.numpy(), axis=1)).all()


def test_float32_matches_naive_full_tensor_computation():
    """The Gram route equals the slow way that materialises every d_k, (B, K, D)."""
    z, y, logits, w, bias = (t.float() if t.is_floating_point() else t for t in correct_problem(seed=5))
    _, _, st = nuisance_augment(z, y, logits, w, bias, topk=4, delta=0.1)
    comp = competitor_classes(logits, y, 4)
    d_all = w[y][:, None, :] - w[None, :, :]  # (B, K, D)
    d_c = torch.gather(d_all, 1, comp[:, :, None].expand(-1, -1, w.shape[1]))  # (B, m, D)
    q, _ = torch.linalg.qr(d_c.transpose(1, 2))  # (B, D, m)
    inside = q @ (q.transpose(1, 2) @ d_all.transpose(1, 2))  # (B, D, K)
    a = ((d_all.transpose(1, 2) - inside) ** 2).sum(1)  # (B, K)
    slack = (d_all * z[:, None, :]).sum(-1) + bias[y][:, None] - bias[None, :]
    other = torch.ones_like(a, dtype=torch.bool).scatter_(1, y[:, None], False)
    valid = other & (a > 1e-5 * (d_all**2).sum(-1))
    bound = torch.where(valid, slack**2 / (2 * a * math.log(10.0)), torch.full_like(a, float("inf")))
    torch.testing.assert_close(st["alpha"], bound.min(1).values, rtol=2e-3, atol=0)


def test_noise_lies_in_nuisance_subspace_with_the_right_scale():
    z, y, logits, w, bias = correct_problem(b=8, k=10, d=60, seed=1)
    g = torch.Generator().manual_seed(0)
    z_aug, y_aug, st = nuisance_augment(z, y, logits, w, bias, topk=4, n_aug=400, generator=g)
    noise = (z_aug - z.repeat_interleave(400, 0)).reshape(8, 400, 60)
    comp = competitor_classes(logits, y, 4)
    dirs = w[y][:, None, :] - w[comp]  # (B, m, D)
    along = dirs @ noise.transpose(1, 2)  # (B, m, n)
    assert along.abs().max() < 1e-9 * noise.abs().max()  # competitors' decisions untouched
    # E ||sqrt(alpha) P_N eps||^2 = alpha (D - rank)
    mean_sq = (noise**2).sum(-1).mean(1)
    expected = st["alpha"] * (60 - st["rank"])
    torch.testing.assert_close(mean_sq, expected, rtol=0.05, atol=0)
    assert torch.equal(y_aug, y.repeat_interleave(400))


@pytest.mark.parametrize("union", [False, True])
def test_label_safety_with_many_draws(union):
    z, y, logits, w, bias = correct_problem(b=32, k=15, d=48, seed=2)
    g = torch.Generator().manual_seed(1)
    z_aug, y_aug, st = nuisance_augment(z, y, logits, w, bias, topk=5, delta=0.05, n_aug=50, generator=g,
                                        union=union)
    assert st["frac_augmented"].item() == 1.0
    kept = ((z_aug @ w.T + bias).argmax(1) == y_aug).double().mean().item()
    assert st["label_safety"].item() == pytest.approx(kept)
    assert kept >= 0.95
    # the noise is not trivially small: it moves logits by a sizeable fraction of the margin
    moved = ((z_aug - z.repeat_interleave(50, 0)) @ w.T).abs().max().item()
    assert moved > 0.1 * (logits.gather(1, y[:, None]) - logits).abs().min().item()


def test_union_is_more_conservative():
    z, y, logits, w, bias = correct_problem(seed=4)
    _, _, plain = nuisance_augment(z, y, logits, w, bias, delta=0.05)
    _, _, union = nuisance_augment(z, y, logits, w, bias, delta=0.05, union=True)
    ratio = union["alpha"] / plain["alpha"]
    torch.testing.assert_close(ratio, torch.full_like(ratio, math.log(20) / math.log(20 * 11)))


def test_misclassified_or_inside_margin_get_no_noise():
    z, y, logits, w, bias = correct_problem(b=12, seed=6)
    y_wrong = y.clone()
    y_wrong[:4] = (y[:4] + 1) % w.shape[0]  # now misclassified
    logits_wrong = z @ w.T + bias
    z_aug, _, st = nuisance_augment(z, y_wrong, logits_wrong, w, bias, n_aug=3)
    assert (st["alpha"][:4] == 0).all() and (st["alpha"][4:] > 0).all()
    assert torch.equal(z_aug.reshape(12, 3, -1)[:4], z[:4, None, :].expand(-1, 3, -1))
    margin = (logits.gather(1, y[:, None]) - logits.scatter(1, y[:, None], -1e9)).min(1).values
    _, _, st2 = nuisance_augment(z, y, logits, w, bias, gamma_margin=float(margin.max()) + 1.0)
    assert (st2["alpha"] == 0).all() and st2["frac_augmented"].item() == 0.0


def test_rank_drops_for_dependent_competitors():
    z, y, logits, w, bias = correct_problem(b=6, k=8, d=30, seed=7)
    w = w.clone()
    w[5] = w[6]  # two classes with the same weight: d_5 = d_6, one direction fewer
    bias = bias.clone()
    bias[5] = bias[6]
    y = torch.zeros(6, dtype=torch.long)
    z = 4.0 * w[0] * math.sqrt(30) / w[0].norm() + 0.1 * torch.randn(6, 30, dtype=torch.float64)
    logits = z @ w.T + bias
    assert (logits.argmax(1) == 0).all()
    _, _, st = nuisance_augment(z, y, logits, w, bias, topk=7)  # every other class is a competitor
    assert (st["rank"] == 6).all()
    ref_alpha, ref_rank, _ = reference_alpha(z, y, logits, w, bias, 7, 0.0, 0.05)
    np.testing.assert_array_equal(st["rank"].numpy(), ref_rank)
    # every other class lies in the span: nothing constrains the noise, so none is added
    np.testing.assert_array_equal(st["alpha"].numpy(), ref_alpha)
    assert (st["alpha"] == 0).all()


def test_class_basis_shares_the_subspace():
    z, y, logits, w, bias = correct_problem(b=24, k=6, d=40, seed=8)
    comp = competitor_classes(logits, y, 3, basis="class")
    for c in range(6):
        rows = comp[y == c]
        assert (rows == rows[0]).all()
        mean_logits = logits[y == c].mean(0)
        mean_logits[c] = -math.inf
        assert set(rows[0].tolist()) == set(mean_logits.topk(3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    z_aug, _, st = nuisance_augment(z, y, logits, w, bias, topk=3, basis="class", n_aug=5, generator=g)
    noise = (z_aug - z.repeat_interleave(5, 0)).reshape(24, 5, 40)
    dirs = w[y][:, None, :] - w[comp]
    assert (dirs @ noise.transpose(1, 2)).abs().max() < 1e-9
    assert (st["alpha"] > 0).all()


def test_single_class_and_determinism():
    z = torch.randn(5, 8)
    y = torch.zeros(5, dtype=torch.long)
    w = torch.randn(1, 8)
    z_aug, y_aug, st = nuisance_augment(z, y, z @ w.T, w, None, n_aug=2)
    assert torch.equal(z_aug, z.repeat_interleave(2, 0)) and (st["alpha"] == 0).all()
    zz, yy, logits, ww, bb = correct_problem(seed=9)
    a1, _, _ = nuisance_augment(zz, yy, logits, ww, bb, generator=torch.Generator().manual_seed(3))
    a2, _, _ = nuisance_augment(zz, yy, logits, ww, bb, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2)


def _batch(progress, seed=0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(16, 6)
    z = torch.randn(12, 16, requires_grad=True)
    y = torch.arange(12) % 6
    with torch.no_grad():  # make the head classify most samples correctly
        head.weight.copy_(torch.randn(6, 16))
        z.data += 3 * head.weight[y] / head.weight[y].norm(dim=1, keepdim=True)
    return StepBatch(embedding=z, logits=head(z), labels=y, head=head, progress=progress), z, head


def test_variant_warmup_then_augments():
    v = create_variant("nuisance", warmup_epochs=1.0, n_aug=2, topk=2)  # K=6: leave classes outside
    batch, z, _ = _batch(progress=0.5)
    out = v(batch)
    assert set(out.stats) == set(v.statistics)
    assert out.terms["aug"].item() == 0.0 and out.stats["frac_augmented"].item() == 0.0

    batch, z, head = _batch(progress=1.5)
    out = v(batch)
    assert set(out.stats) == set(v.statistics)
    assert all(torch.isfinite(s) for s in out.stats.values())
    assert out.stats["frac_augmented"].item() > 0.5
    assert out.terms["aug"].item() > 0
    out.terms["aug"].backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert head.weight.grad.abs().sum() > 0


def test_variant_degenerate_batches_are_finite():
    v = create_variant("nuisance", warmup_epochs=0.0)
    head = torch.nn.Linear(8, 4)
    for z, y in [(torch.ones(6, 8), torch.zeros(6, dtype=torch.long)),  # one class, identical
                 (torch.randn(4, 8), torch.arange(4))]:  # singletons
        z = z.clone().requires_grad_()
        out = v(StepBatch(embedding=z, logits=head(z), labels=y, head=head, progress=3.0))
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(z.grad).all()
        # label safety is undefined (NaN, averaged as missing) when no row was augmented
        if float(out.stats["frac_augmented"]) == 0:
            assert torch.isnan(out.stats["label_safety"])
        else:
            assert 0 <= float(out.stats["label_safety"]) <= 1
        assert all(torch.isfinite(s) for k, s in out.stats.items() if k != "label_safety")


def test_gram_schmidt_drops_a_dependent_direction_and_still_spans():
    from carrot.variants.nuisance import gram_schmidt_coefficients

    torch.manual_seed(10)
    d = torch.randn(2, 5, 30, dtype=torch.float64)  # (B, m, D)
    d[0, 2] = d[0, 0] - 2.0 * d[0, 1]  # a dependent direction in the middle
    d[1, 4] = 0.0  # a zero direction
    s = d @ d.transpose(1, 2)
    t, keep = gram_schmidt_coefficients(s, 1e-10)
    assert keep.tolist() == [[True, True, False, True, True], [True, True, True, True, False]]
    q = d.transpose(1, 2) @ t  # (B, D, m)
    gram_q = q.transpose(1, 2) @ q
    torch.testing.assert_close(gram_q, torch.diag_embed(keep.double()), atol=1e-10, rtol=0)
    residual = d.transpose(1, 2) - q @ (q.transpose(1, 2) @ d.transpose(1, 2))  # every d_j in the span
    assert residual.abs().max() < 1e-9
    # full rank: T = R^{-1} of the QR of D^T (up to the signs of R's diagonal)
    _, r = torch.linalg.qr(d[1, :4].T)
    torch.testing.assert_close(t[1, :4, :4].abs(), torch.linalg.inv(r).abs(), atol=1e-9, rtol=1e-7)


def test_variant_under_bf16_autocast_matches_float32():
    """Slacks and noisy logits are float32 under autocast: bf16 rounds the margins away when
    the logits share a large common part (here every w_k = c + small_k)."""
    torch.manual_seed(0)
    k, d = 10, 64
    common = torch.randn(d)
    common = 100 * common / common.norm()
    head = torch.nn.Linear(d, k)
    with torch.no_grad():
        head.weight.copy_(common + torch.randn(k, d))
        head.bias.zero_()
    y = torch.arange(40) % k
    z = 4 * F.normalize(head.weight[y] - common, dim=1) + 0.3 * common
    z = z.detach().requires_grad_()
    v = create_variant("nuisance", warmup_epochs=0.0, topk=3, n_aug=8)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = v(StepBatch(embedding=z, logits=head(z), labels=y, head=head, progress=1.0))
    torch.manual_seed(1)
    with torch.no_grad():
        _, _, ref = nuisance_augment(z, y, head(z), head.weight, head.bias, topk=3, n_aug=8)
    assert ref["frac_augmented"].item() > 0.2
    assert out.stats["alpha_mean"].item() == pytest.approx(ref["alpha_mean"].item(), rel=1e-5)
    assert out.stats["label_safety"].item() == pytest.approx(ref["label_safety"].item(), abs=1e-6)
    assert ref["label_safety"].item() >= 0.95


def test_noisy_logits_from_the_gram_equal_the_head_on_the_noisy_rows():
    """``return_logits``: z~ W^T + b without the product, from the centred Gram and the per-row
    term of its centring, even when W's rows share a large common part."""
    z, y, logits, w, bias = correct_problem(seed=4)
    w = w + 5.0 * torch.randn(w.shape[1], dtype=w.dtype, generator=torch.Generator().manual_seed(1))
    logits = z @ w.T + bias
    z_aug, y_aug, st = nuisance_augment(z, y, logits, w, bias, topk=3, n_aug=3, return_logits=True,
                                        generator=torch.Generator().manual_seed(2))
    assert st["frac_augmented"].item() > 0.2
    torch.testing.assert_close(st["logits"], F.linear(z_aug, w, bias), rtol=1e-10, atol=1e-9)
    assert "logits" not in nuisance_augment(z, y, logits, w, bias, topk=3)[2]


def test_variant_loss_and_gradients_equal_the_head_pass_on_the_noisy_rows():
    """The variant's noisy rows take their logits from the Gram (no head-sized product) and the
    head's backward: loss and every gradient equal CE(head(z~), y) through autograd's linear."""
    v = create_variant("nuisance", warmup_epochs=0.0, n_aug=2, topk=2, w_aug=0.7)
    batch, z, head = _batch(progress=1.0, seed=3)
    torch.manual_seed(5)
    out = v(batch)
    assert out.stats["frac_augmented"].item() > 0.5
    out.terms["aug"].backward()
    got = [t.grad.clone() for t in (z, head.weight, head.bias)]
    for t in (z, head.weight, head.bias):
        t.grad = None

    torch.manual_seed(5)  # the same noise
    z_aug, y_aug, _ = nuisance_augment(z, batch.labels, head(z).detach(), head.weight, head.bias, topk=2, n_aug=2,
                                       check_safety=False)
    expected = 0.7 * F.cross_entropy(F.linear(z_aug, head.weight, head.bias), y_aug)
    expected.backward()
    assert out.terms["aug"].item() == pytest.approx(expected.item(), rel=1e-6)
    for name, g, t in zip(("z", "weight", "bias"), got, (z, head.weight, head.bias)):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-7, msg=name)
