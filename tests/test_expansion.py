"""expansion: the operator, SupCon and the KL term against closed forms and loops."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carrot.geometry import device_routes
from carrot.variants import StepBatch, create_variant
from carrot.variants.expansion import expansion_kl, expansion_operator, supcon_loss


def _reference_operator(z: torch.Tensor, y: torch.Tensor, eps: float = 1e-12):
    """Straight from the formula, one class at a time, float64."""
    h = F.normalize(z.double(), dim=1)
    classes = sorted(set(y.tolist()))
    mu = {c: h[y == c].mean(0) for c in classes}
    r = {c: ((h[y == c] - mu[c]) ** 2).sum(1).mean().sqrt() for c in classes}
    gamma = {}
    for c in classes:
        others = [(mu[c] - mu[o]).norm() for o in classes if o != c]
        gamma[c] = max(1.0, (min(others) / (2 * r[c] + eps)).item()) if others and (y == c).sum() >= 2 else 1.0
    if len(classes) < 2:
        return h, gamma
    out = torch.stack([mu[int(c)] + gamma[int(c)] * (h[i] - mu[int(c)]) for i, c in enumerate(y)])
    return F.normalize(out, dim=1), gamma


def test_hand_built_clusters_closed_form() -> None:
    a = 0.2  # class 0 at (cos a, +-sin a, 0), class 1 mirrored: mu = (+-cos a, 0, 0), r = sin a
    c, s = math.cos(a), math.sin(a)
    z = torch.tensor([[c, s, 0.0], [c, -s, 0.0], [-c, s, 0.0], [-c, -s, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    z_plus, stats = expansion_operator(z, y)
    gamma = (2 * c) / (2 * s)  # m = 2 cos a, r = sin a
    assert stats["gamma"].tolist() == pytest.approx([gamma] * 4, rel=1e-5)
    assert stats["gamma_mean"].item() == pytest.approx(gamma, rel=1e-5)
    assert stats["radius_mean"].item() == pytest.approx(s, rel=1e-5)
    assert stats["margin_mean"].item() == pytest.approx(2 * c, rel=1e-5)
    assert stats["frac_expanded"].item() == 1.0 and stats["classes_used"].item() == 2.0
    r2 = 1 / math.sqrt(2)  # mu + gamma (z - mu) = (+-cos a, +-cos a, 0)
    expected = torch.tensor([[r2, r2, 0.0], [r2, -r2, 0.0], [-r2, r2, 0.0], [-r2, -r2, 0.0]])
    torch.testing.assert_close(z_plus, expected)


def test_overlapping_classes_are_not_expanded() -> None:
    # both classes spread around the same centre: m < 2 r, so gamma = 1 and z+ = z
    z = F.normalize(torch.tensor([[1.0, 0.5], [1.0, -0.5], [1.0, 0.45], [1.0, -0.55]]), dim=1)
    y = torch.tensor([0, 0, 1, 1])
    z_plus, stats = expansion_operator(z, y)
    assert stats["gamma_max"].item() == 1.0 and stats["frac_expanded"].item() == 0.0
    torch.testing.assert_close(z_plus, z)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_operator_against_loop(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([3, 3, 3, 1, 1, 8, 5, 5, 5, 5])[torch.randperm(10, generator=g)]
    z = torch.randn(10, 6, generator=g) * 3 + torch.randn(6, generator=g)
    z_plus, stats = expansion_operator(z, y)
    ref, gamma = _reference_operator(z, y)
    torch.testing.assert_close(z_plus.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats["gamma"].double(), torch.tensor([gamma[int(c)] for c in y], dtype=torch.float64),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z_plus.norm(dim=1), torch.ones(10))
    assert stats["classes_used"].item() == 3.0  # the singleton class 8 does not count


def test_one_class_returns_normalised_input() -> None:
    z = torch.randn(5, 4, requires_grad=True)
    z_plus, stats = expansion_operator(z, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(z_plus, F.normalize(z.detach(), dim=1))
    assert stats["gamma_max"].item() == 1.0
    z_plus.sum().backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("detach", [True, False])
def test_gradient_detach_stats(detach: bool) -> None:
    g = torch.Generator().manual_seed(4)
    y = torch.arange(4).repeat_interleave(3)
    z = (torch.randn(12, 5, generator=g) + 4 * torch.eye(4, 5)[y]).requires_grad_(True)
    w = torch.randn(12, 5, generator=g)
    z_plus, _ = expansion_operator(z, y, detach_stats=detach)
    (z_plus * w).sum().backward()
    grad = z.grad.clone()
    # reference: same maths with torch ops per class, stats detached or not
    z2 = z.detach().clone().requires_grad_(True)
    h = F.normalize(z2, dim=1)
    mus = torch.stack([h[y == c].mean(0) for c in range(4)])
    rs = torch.stack([((h[y == c] - mus[c]) ** 2).sum(1).mean().sqrt() for c in range(4)])
    dist = torch.stack([torch.stack([(mus[c] - mus[d]).norm() for d in range(4) if d != c]).min() for c in range(4)])
    gam = torch.clamp(dist / (2 * rs + 1e-12), min=1.0)
    if detach:
        mus, gam = mus.detach(), gam.detach()
    ref = F.normalize(mus[y] + gam[y, None] * (h - mus[y]), dim=1)
    (ref * w).sum().backward()
    assert gam.min() > 1  # the test exercises the expanding branch
    torch.testing.assert_close(grad, z2.grad, rtol=1e-4, atol=1e-5)


def test_identical_embeddings_finite_gradient() -> None:
    for detach in (True, False):
        z = torch.ones(8, 4, requires_grad=True)
        z_plus, stats = expansion_operator(z, torch.arange(4).repeat(2), detach_stats=detach)
        z_plus.sum().backward()
        assert torch.isfinite(z_plus).all() and torch.isfinite(z.grad).all()
        assert stats["gamma_max"].item() == 1.0


def _supcon_reference(f: torch.Tensor, labels: torch.Tensor, tau: float) -> float:
    f = F.normalize(f.double(), dim=1)
    n = len(f)
    total, anchors = 0.0, 0
    for i in range(n):
        pos = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        denom = sum(math.exp(float(f[i] @ f[a]) / tau) for a in range(n) if a != i)
        total += -sum(math.log(math.exp(float(f[i] @ f[p]) / tau) / denom) for p in pos) / len(pos)
        anchors += 1
    return total / max(anchors, 1)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_supcon_against_loop(tau: float) -> None:
    g = torch.Generator().manual_seed(5)
    f = torch.randn(9, 4, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 2])
    assert supcon_loss(f, labels, tau).item() == pytest.approx(_supcon_reference(f, labels, tau), rel=1e-4)
    lonely = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7])  # anchors without positives are skipped
    assert supcon_loss(f, lonely, tau).item() == pytest.approx(_supcon_reference(f, lonely, tau), rel=1e-4)


def test_kl_direction_is_p_plus_given_p() -> None:
    g = torch.Generator().manual_seed(6)
    lo, lo_plus, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), 2.0
    p = torch.softmax(lo.double() / t, 1)
    q = torch.softmax(lo_plus.double() / t, 1)
    kl_q_p = (q * (q / p).log()).sum(1).mean() * t**2  # KL(p+ || p)
    kl_p_q = (p * (p / q).log()).sum(1).mean() * t**2
    got = expansion_kl(lo, lo_plus, t).item()
    assert got == pytest.approx(kl_q_p.item(), rel=1e-5)
    assert got != pytest.approx(kl_p_q.item(), rel=1e-3)


def _step(variant, y: torch.Tensor, d: int = 6, k: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = (torch.randn(len(y), d, generator=g) + 3 * torch.eye(k, d)[y]).requires_grad_(True)
    torch.manual_seed(seed)  # the head's initialisation
    head = nn.Linear(d, k)
    z = variant.build_neck(d)(emb)
    return emb, head, StepBatch(z, head(z), y, head, progress=10.0)


def test_variant_kl_term_and_neck() -> None:
    v = create_variant("expansion", lam=0.5, T=2.0)
    y = torch.arange(4).repeat_interleave(3)
    emb, head, batch = _step(v, y)
    torch.testing.assert_close(batch.embedding.norm(dim=1), torch.ones(len(y)))
    out = v(batch)
    z_plus, _ = expansion_operator(batch.embedding, y, unit=True)  # the neck made the rows unit
    # float64 logits of z+ and z: the KL of two close distributions (about 2e-4 here) amplifies
    # float32 rounding; over eight head seeds z+ through the float32 head was off by up to 4e-4
    expected = 0.5 * expansion_kl(F.linear(batch.embedding.double(), head.weight.double(), head.bias.double()),
                                  F.linear(z_plus.double(), head.weight.double(), head.bias.double()), 2.0)
    assert set(out.terms) == {"ce", "kl"}
    assert out.terms["kl"].item() == pytest.approx(expected.item(), rel=1e-3)
    assert out.terms["kl"].item() > 0  # z+ differs from z, so the term is live


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("labels", [[0, 0, 0, 1, 1, 2, 2, 2, 3], [1, 1, 1, 1], [0, 1, 2, 2]])
def test_logits_of_z_plus_from_the_logits(detach, labels) -> None:
    """``logits_plus``: z+ W^T + b without a product with W, against F.linear on z+ (several
    classes, one class, singletons)."""
    y = torch.tensor(labels)
    g = torch.Generator().manual_seed(1)
    h = F.normalize(torch.randn(len(y), 7, generator=g) + 2 * torch.eye(4, 7)[y], dim=1)
    torch.manual_seed(1)
    head = nn.Linear(7, 5)
    z_plus, st = expansion_operator(h, y, detach_stats=detach, unit=True, logits=head(h), bias=head.bias)
    torch.testing.assert_close(st["logits_plus"], head(z_plus).detach(), rtol=1e-5, atol=1e-6)
    _, no_bias = expansion_operator(h, y, detach_stats=detach, unit=True, logits=F.linear(h, head.weight))
    torch.testing.assert_close(no_bias["logits_plus"], F.linear(z_plus, head.weight).detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unit=True"):
        expansion_operator(h, y, logits=head(h))


@pytest.mark.parametrize("host_slots", [True, False])
@pytest.mark.parametrize("aux", [0.0, 0.4])
def test_variant_gradients_equal_z_plus_through_the_head(aux, host_slots) -> None:
    """The variant's z+ logits come from the batch's logits; its loss and the gradients of the
    embedding and the head equal z+ through autograd's linear head. Both slot layouts: the C
    classes' slots the CPU keeps, and all B (the device path)."""
    with contextlib.nullcontext() if host_slots else device_routes():
        _check_variant_gradients_equal_z_plus_through_the_head(aux)


def _check_variant_gradients_equal_z_plus_through_the_head(aux) -> None:
    y = torch.arange(4).repeat_interleave(3)
    v = create_variant("expansion", lam=0.5, T=2.0, aux_ce_weight=aux)
    emb, head, batch = _step(v, y, seed=2)
    out = v(batch)
    out.loss.backward()
    got = [t.grad.clone() for t in (emb, head.weight, head.bias)]
    for t in (emb, head.weight, head.bias):
        t.grad = None
    z = v.build_neck(6)(emb)
    logits = head(z)
    z_plus, _ = expansion_operator(z, y, unit=True)
    logits_plus = head(z_plus)
    loss = F.cross_entropy(logits, y) + 0.5 * expansion_kl(logits, logits_plus, 2.0) + aux * F.cross_entropy(
        logits_plus, y)
    loss.backward()
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    for name, g, t in zip(("embedding", "weight", "bias"), got, (emb, head.weight, head.bias)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_variant_supcon_and_aux_terms() -> None:
    v = create_variant("expansion", mode="supcon", tau=0.2, lam=2.0, aux_ce_weight=0.3)
    y = torch.arange(4).repeat_interleave(3)
    emb, head, batch = _step(v, y)
    out = v(batch)
    z_plus, _ = expansion_operator(batch.embedding, y, unit=True)
    views = torch.cat([batch.embedding.float(), z_plus])
    assert set(out.terms) == {"ce", "supcon", "aux_ce"}
    assert out.terms["supcon"].item() == pytest.approx(2.0 * supcon_loss(views, y.repeat(2), 0.2).item(), rel=1e-5)
    assert out.terms["aux_ce"].item() == pytest.approx(0.3 * F.cross_entropy(head(z_plus), y).item(), rel=1e-5)
    out.loss.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_bad_hparams_raise() -> None:
    with pytest.raises(ValueError):
        create_variant("expansion", mode="mse")
    with pytest.raises(ValueError):
        create_variant("expansion", T=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_variant_with_half_precision_head(dtype: torch.dtype) -> None:
    """A head kept in half precision (no autocast) still takes z+ (cast to its dtype)."""
    v = create_variant("expansion", aux_ce_weight=0.5)
    y = torch.arange(4).repeat_interleave(3)
    emb = torch.randn(12, 6).to(dtype).requires_grad_(True)
    head = nn.Linear(6, 5).to(dtype)
    z = v.build_neck(6)(emb)
    assert z.dtype == dtype
    out = v(StepBatch(z, head(z), y, head, progress=10.0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(emb.grad.float()).all()
    assert torch.isfinite(head.weight.grad.float()).all()
