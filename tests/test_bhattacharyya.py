"""bhattacharyya: pair selection and the per-layer loss against loops; the variant's scale."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from carrot.variants import StepBatch, create_variant
from carrot.variants.bhattacharyya import (
    multi_layer_bhattacharyya, pick_layers, select_confusable_pairs,
)

# classes with 1, 2 and many samples
Y = torch.tensor([5, 5, 5, 2, 2, 9, 7, 7, 7, 7, 0, 3, 3])


def _confusion_reference(logits: torch.Tensor, y: torch.Tensor) -> dict[tuple[int, int], float]:
    """a_cd for classes with >= 2 samples, c < d (labels), from the formula."""
    p = torch.softmax(logits.double(), 1)
    usable = sorted(c for c in set(y.tolist()) if (y == c).sum() >= 2)
    out = {}
    for ci, c in enumerate(usable):
        for d in usable[ci + 1:]:
            a_cd = p[y == c, d].mean().item()
            a_dc = p[y == d, c].mean().item()
            out[(c, d)] = 0.5 * (a_cd + a_dc)
    return out


def _labels_of_pairs(sel, y):
    from carrot.geometry import class_slots

    _, _, labels = class_slots(y)
    return [(int(labels[i]), int(labels[j])) for i, j, ok in zip(sel.i, sel.j, sel.valid) if ok]


@pytest.mark.parametrize("on_host", [False, True])
@pytest.mark.parametrize("top_m", [2, 4, 64])
def test_pair_selection_against_loop(top_m: int, on_host: bool) -> None:
    logits = torch.randn(len(Y), 10, generator=torch.Generator().manual_seed(top_m))
    sel = select_confusable_pairs(logits, Y, top_m, on_host=on_host)
    ref = _confusion_reference(logits, Y)  # 4 usable classes -> 6 pairs
    ranked = sorted(ref.items(), key=lambda kv: -kv[1])[:top_m]
    got = _labels_of_pairs(sel, Y)
    assert got == [pair for pair, _ in ranked]
    w = sel.weight[sel.valid]
    assert w.tolist() == pytest.approx([a for _, a in ranked], rel=1e-5)
    assert torch.all(sel.weight[~sel.valid] == 0)
    assert sel.usable_classes.item() == 4 and int(sel.valid.sum()) == min(top_m, 6)
    assert all(c < d for c, d in got)


def _layer_reference(f: torch.Tensor, y: torch.Tensor, pairs, eps: float, normalize: bool):
    f = f.double()
    if normalize:
        f = f / f.norm(dim=1, keepdim=True)
    num = den = 0.0
    rhos, dbs = [], []
    for (c, d), a in pairs:
        xc, xd = f[y == c], f[y == d]
        mc, md = xc.mean(0), xd.mean(0)
        vc = xc.var(0, unbiased=False).clamp_min(eps)
        vd = xd.var(0, unbiased=False).clamp_min(eps)
        vbar = (vc + vd) / 2 + eps
        db = (0.125 * ((mc - md) ** 2 / vbar).sum()
              + 0.5 * (vbar.log().sum() - 0.5 * (vc.log().sum() + vd.log().sum()))).item()
        rho = math.exp(-db)
        num += a * rho
        den += a
        rhos.append(rho)
        dbs.append(db)
    return num / den, sum(rhos) / len(rhos), sum(dbs) / len(dbs)


@pytest.mark.parametrize("normalize", [False, True])
def test_layer_loss_against_loop(normalize: bool) -> None:
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(len(Y), 10, generator=g)
    f = torch.randn(len(Y), 3, generator=g) * 0.5 + torch.randn(10, 3, generator=g)[Y] * 0.7
    sel = select_confusable_pairs(logits, Y, 3)
    pairs = sorted(_confusion_reference(logits, Y).items(), key=lambda kv: -kv[1])[:3]
    (loss,), (rho_mean,), (db_mean,) = multi_layer_bhattacharyya([f], sel, normalize=normalize, eps=1e-6)
    ref_loss, ref_rho, ref_db = _layer_reference(f, Y, pairs, 1e-6, normalize)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-4)
    assert rho_mean.item() == pytest.approx(ref_rho, rel=1e-4)
    assert db_mean.item() == pytest.approx(ref_db, rel=1e-4)
    assert 0 < loss.item() < 1


def test_pick_layers() -> None:
    names = ["s1", "s2", "s3", "s4"]
    assert pick_layers(names, 2) == ["s3", "s4"]
    assert pick_layers(names, "all") == names
    assert pick_layers(names, 9) == names


def _batch(y, layers=("l2", "l3", "l4"), d=6, k=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(len(y), d, generator=g).requires_grad_(True)
    head = nn.Linear(d, k)
    proj = {name: torch.randn(d, 4, generator=g) for name in layers}
    feats = {name: torch.tanh(emb @ p) for name, p in proj.items()}
    return emb, StepBatch(emb, head(emb), y, head, feats, progress=10.0)


def test_auto_scale_matches_ce_and_fixed_scale_uses_lam() -> None:
    emb, batch = _batch(Y)
    out = create_variant("bhattacharyya")(batch)
    ce, l_bhat = out.terms["ce"], out.stats["l_bhat"]
    assert l_bhat.item() > 0
    # s * L with s = CE / L (no eps): the regulariser enters at exactly the value of CE
    assert out.terms["bhat"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert out.stats["scale"].item() == pytest.approx(ce.item() / l_bhat.item(), rel=1e-5)
    assert out.stats["log_l_bhat"].item() == pytest.approx(math.log(l_bhat.item()), rel=1e-5)
    out.loss.backward()
    assert torch.isfinite(emb.grad).all()

    fixed = create_variant("bhattacharyya", scale="fixed", lam=0.3)(batch)
    assert fixed.terms["bhat"].item() == pytest.approx(0.3 * l_bhat.item(), rel=1e-5)


def _narrow_float64_batch(seed: int = 7):
    """Three narrow layers (D_B of a few units, rho well above float32's tiny) in float64, with
    overlaps that differ between layers, so the layer mean of L_layer and the mean of their logs
    (a geometric mean) differ."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(Y), 10, generator=g, dtype=torch.float64)
    centres = torch.randn(10, 4, generator=g, dtype=torch.float64)
    feats = {
        f"l{k}": (torch.randn(len(Y), 4, generator=g, dtype=torch.float64) + spread * centres[Y]).requires_grad_(True)
        for k, spread in enumerate((0.2, 0.8, 1.6))
    }
    head = nn.Linear(4, 10).double()
    return StepBatch(torch.zeros(len(Y), 4, dtype=torch.float64), logits, Y, head, feats, progress=10.0)


@pytest.mark.parametrize("on_host", [False, True])
def test_auto_term_in_log_space_has_the_value_of_ce_and_the_gradient_of_s_times_l_bhat(on_host: bool,
                                                                                      monkeypatch) -> None:
    """The log-space term against the design note's s * L_bhat built from rho (SPEC: L_bhat the
    mean over layers of sum a rho / sum a, s = CE / L_bhat detached), in float64 where rho does
    not underflow: same value (CE) and the same gradient on every layer's features, on both
    routes (the tensor operations, and numpy on the host). The gradient of 2.5 x the term is
    2.5 x the reference's: the backward scales by what it receives."""
    _selection_on(on_host, monkeypatch)
    batch = _narrow_float64_batch()
    out = create_variant("bhattacharyya", layers="all")(batch)
    term, ce = out.terms["bhat"], out.terms["ce"]
    grads = torch.autograd.grad(2.5 * term, list(batch.features.values()))

    sel = select_confusable_pairs(batch.logits, Y, 64)
    per_layer, rho_mean, _ = multi_layer_bhattacharyya(list(batch.features.values()), sel)  # rho form, (L,)
    assert per_layer.dtype == torch.float64 and rho_mean.min() > 1e-6  # narrow: rho is far from underflow
    assert per_layer.max() / per_layer.min() > 2  # the layers differ: a geometric mean would not match
    l_bhat = per_layer.mean()
    reference = (ce.detach() / l_bhat.detach()) * l_bhat
    ref_grads = torch.autograd.grad(2.5 * reference, list(batch.features.values()), retain_graph=True)

    assert term.item() == pytest.approx(ce.item(), rel=1e-12)
    assert out.stats["l_bhat"].item() == pytest.approx(l_bhat.item(), rel=1e-6)
    assert out.stats["scale"].item() == pytest.approx(ce.item() / l_bhat.item(), rel=1e-6)
    for got, want in zip(grads, ref_grads):
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)

    # scale=fixed: lam * L_bhat from rho as is, its value and its gradient
    fixed = create_variant("bhattacharyya", layers="all", scale="fixed", lam=0.7)(batch)
    assert fixed.terms["bhat"].item() == pytest.approx(0.7 * l_bhat.item(), rel=1e-12)
    got = torch.autograd.grad(fixed.terms["bhat"], list(batch.features.values()))
    want = torch.autograd.grad(0.7 * per_layer.mean(), list(batch.features.values()))
    for g, w in zip(got, want):
        assert w.abs().max() > 1e-4
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_auto_term_on_a_wide_layer_does_not_underflow() -> None:
    """A 2048-wide random layer, P x K = 16 x 4, default setting: D_B is in the hundreds, rho is
    0 in float32, and still the auto-scaled term gives a finite, non-zero gradient (a term
    built from rho would give exactly zero: shown by scale=fixed)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(16).repeat_interleave(4)
    feat = torch.randn(len(y), 2048, generator=g).requires_grad_(True)
    logits = torch.randn(len(y), 16, generator=g)
    head = nn.Linear(8, 16)
    batch = StepBatch(torch.zeros(len(y), 8), logits, y, head, {"layer4": feat}, progress=10.0)
    out = create_variant("bhattacharyya")(batch)
    db, rho = out.stats["db_layer4"].item(), out.stats["rho_layer4"].item()
    assert db > 104 and 0.0 < rho < 1e-40  # 0 in float32; the logged mean is float64
    assert out.terms["bhat"].item() == pytest.approx(out.terms["ce"].item(), rel=1e-6)
    assert math.isfinite(out.stats["log_l_bhat"].item()) and out.stats["log_l_bhat"].item() < -100
    assert math.isfinite(out.stats["scale"].item())
    (grad,) = torch.autograd.grad(out.terms["bhat"], feat)
    assert torch.isfinite(grad).all()
    assert grad.abs().max() > 1e-4, "the term went silent on a wide layer"

    fixed = create_variant("bhattacharyya", scale="fixed")(batch)
    (grad_fixed,) = torch.autograd.grad(fixed.terms["bhat"], feat)
    assert fixed.terms["bhat"].item() == 0.0 and grad_fixed.abs().max() == 0.0  # rho underflowed


def test_layers_hparam_and_per_layer_stats() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(len(Y), 12, generator=g)
    emb, batch = _batch(Y)
    batch.logits = logits
    sel = select_confusable_pairs(logits, Y, 64)
    out = create_variant("bhattacharyya", layers=1)(batch)
    assert "rho_l4" in out.stats and "db_l4" in out.stats and "rho_l2" not in out.stats
    (only_last,), (rho4,), _ = multi_layer_bhattacharyya([batch.features["l4"]], sel)
    assert out.stats["l_bhat"].item() == pytest.approx(only_last.item(), rel=1e-5)
    assert out.stats["rho_l4"].item() == pytest.approx(rho4.item(), rel=1e-5)
    both = create_variant("bhattacharyya", layers=2)(batch)
    (l3,), _, _ = multi_layer_bhattacharyya([batch.features["l3"]], sel)
    assert both.stats["l_bhat"].item() == pytest.approx((l3.item() + only_last.item()) / 2, rel=1e-5)
    assert both.stats["layers_used"].item() == 2 and both.stats["pairs_used"].item() == 6
    assert both.stats["classes_used"].item() == 4


def _selection_on(on_host: bool, monkeypatch) -> None:
    """Make the variant select its pairs on the host (numpy) or with the device's tensor ops."""
    import functools

    import carrot.variants.bhattacharyya as module

    monkeypatch.setattr(module, "select_confusable_pairs",
                        functools.partial(select_confusable_pairs, on_host=on_host))


@pytest.mark.parametrize("on_host", [False, True])
@pytest.mark.parametrize("y", [torch.zeros(6, dtype=torch.long), torch.arange(6), torch.tensor([0, 0, 1, 2, 3, 4])])
def test_no_usable_pair_gives_zero_term_and_finite_grads(y: torch.Tensor, on_host: bool, monkeypatch) -> None:
    _selection_on(on_host, monkeypatch)
    emb, batch = _batch(y)
    out = create_variant("bhattacharyya")(batch)
    assert out.terms["bhat"].item() == 0.0
    assert out.stats["pairs_used"].item() == 0 and out.stats["layers_used"].item() == 0
    per_layer = [k for k in out.stats if k.startswith(("rho_", "db_"))]
    assert per_layer and all(torch.isnan(out.stats[k]) for k in per_layer)  # means over no pair: undefined
    out.loss.backward()
    assert torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("on_host", [False, True])
def test_pairs_without_confusion_give_zero_term_and_zero_gradient(on_host: bool, monkeypatch) -> None:
    """Valid pairs whose confusion is 0 (every sample puts all its probability on a fourth class,
    absent from the batch, so CE is large): nothing counts, and the term and its gradient are
    exactly 0."""
    _selection_on(on_host, monkeypatch)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    emb, batch = _batch(y, k=4)
    logits = torch.zeros(len(y), 4).index_fill_(1, torch.tensor([3]), 1000.0) + 0.0 * batch.logits
    batch = StepBatch(batch.embedding, logits, y, batch.head, batch.features, progress=10.0)
    out = create_variant("bhattacharyya")(batch)
    assert out.stats["pairs_used"].item() == 3 and out.terms["bhat"].item() == 0.0
    (grad,) = torch.autograd.grad(out.terms["bhat"], emb)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("seed", range(6))
def test_host_selection_is_the_device_selection(seed: int) -> None:
    """The numpy selection (CPU) picks the device path's pairs in its order with its weights,
    puts every sample in the same usable class (the rest in the spare row) and keeps only
    the valid entries."""
    g = torch.Generator().manual_seed(seed)
    b, k = int(torch.randint(2, 70, (1,), generator=g)), int(torch.randint(2, 40, (1,), generator=g))
    y = torch.randint(0, k, (b,), generator=g)
    logits = 3 * torch.randn(b, k, generator=g)
    top_m = int(torch.randint(1, 80, (1,), generator=g))
    dev = select_confusable_pairs(logits, y, top_m, on_host=False)
    host = select_confusable_pairs(logits, y, top_m, on_host=True)
    assert host.valid.all() or (len(host.valid) == 1 and not dev.valid.any())
    for name in ("i", "j"):
        assert torch.equal(getattr(host, name)[host.valid], getattr(dev, name)[dev.valid])
    assert torch.equal(host.pair_class[:, host.valid], dev.pair_class[:, dev.valid])
    assert torch.allclose(host.weight[host.valid], dev.weight[dev.valid], rtol=1e-6, atol=0)
    assert int(host.usable_classes) == int(dev.usable_classes)
    usable = dev.klass < dev.num_usable
    assert torch.equal(host.klass < host.num_usable, usable)
    assert torch.equal(host.klass[usable], dev.klass[usable])
    assert host.num_usable == max(1, int(dev.usable_classes))


@pytest.mark.parametrize("top_m", [3, 64])
def test_variant_with_host_selection_matches_the_device_selection(top_m: int, monkeypatch) -> None:
    """Loss, statistics and gradients of a step with either selection agree (fewer moment
    rows on the host: the same numbers)."""
    results = []
    for on_host in (False, True):
        _selection_on(on_host, monkeypatch)
        torch.manual_seed(0)  # the head's initialisation
        emb, batch = _batch(Y, seed=3)
        out = create_variant("bhattacharyya", top_M=top_m)(batch)
        out.loss.backward()
        results.append((out.loss.detach(), {k: v.detach() for k, v in out.stats.items()}, emb.grad))
    (loss_d, stats_d, grad_d), (loss_h, stats_h, grad_h) = results
    assert loss_h.item() == pytest.approx(loss_d.item(), rel=1e-6)
    for key, value in stats_d.items():
        assert stats_h[key].item() == pytest.approx(value.item(), rel=1e-5, nan_ok=True), key
    assert torch.allclose(grad_h, grad_d, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(grad_h, torch.zeros_like(grad_h))


def test_missing_features_and_bad_hparams_raise() -> None:
    emb, batch = _batch(Y)
    batch.features = {}
    with pytest.raises(ValueError):
        create_variant("bhattacharyya")(batch)
    for bad in ({"layers": 0}, {"layers": "some"}, {"scale": "auto2"}, {"top_M": 0}):
        with pytest.raises(ValueError):
            create_variant("bhattacharyya", **bad)


def _layer_loss_autograd(f: torch.Tensor, y: torch.Tensor, pairs, eps: float) -> torch.Tensor:
    """sum a rho / sum a from the formula, one pair at a time, with autograd (float64)."""
    num = den = 0.0
    for (c, d), a in pairs:
        xc, xd = f[y == c], f[y == d]
        vc = xc.var(0, unbiased=False).clamp_min(eps)
        vd = xd.var(0, unbiased=False).clamp_min(eps)
        vbar = (vc + vd) / 2 + eps
        db = (0.125 * ((xc.mean(0) - xd.mean(0)) ** 2 / vbar).sum()
              + 0.5 * (vbar.log().sum() - 0.5 * (vc.log().sum() + vd.log().sum())))
        num = num + a * torch.exp(-db)
        den += a
    return num / den


def test_multi_layer_loss_and_gradient_against_loop() -> None:
    """All layers in one pass (hand-written backward) against a per-layer, per-pair autograd
    loop, with a zero-variance dimension (the eps clamp) in one layer."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(len(Y), 10, generator=g)
    feats = [torch.randn(len(Y), d, generator=g, dtype=torch.float64) + torch.randn(10, d, generator=g,
                                                                                    dtype=torch.float64)[Y]
             for d in (3, 5, 2)]
    feats[1][:, 0] = 1.0
    for f in feats:
        f.requires_grad_(True)
    sel = select_confusable_pairs(logits, Y, 5)
    pairs = sorted(_confusion_reference(logits, Y).items(), key=lambda kv: -kv[1])[:5]
    loss, _, _ = multi_layer_bhattacharyya(feats, sel, eps=1e-6)
    loss.sum().backward()
    got = [f.grad.clone() for f in feats]
    for k, f in enumerate(feats):
        f.grad = None
        ref = _layer_loss_autograd(f, Y, pairs, 1e-6)
        ref.backward()
        assert loss[k].item() == pytest.approx(ref.item(), rel=1e-5)
        torch.testing.assert_close(got[k].double(), f.grad, rtol=1e-4, atol=1e-6)


def test_variant_under_bf16_autocast_matches_float32() -> None:
    emb, batch = _batch(Y)
    ref = create_variant("bhattacharyya")(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = create_variant("bhattacharyya")(batch)
    assert got.stats["l_bhat"].item() == pytest.approx(ref.stats["l_bhat"].item(), rel=1e-6)


def test_mean_distance_divides_each_layer_by_its_width() -> None:
    """distance="mean": rho = exp(-D_B / D_l) per layer, against the per-pair loop."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(len(Y), 10, generator=g)
    feats = [torch.randn(len(Y), d, generator=g) + torch.randn(10, d, generator=g)[Y] for d in (3, 6)]
    sel = select_confusable_pairs(logits, Y, 4)
    pairs = sorted(_confusion_reference(logits, Y).items(), key=lambda kv: -kv[1])[:4]
    _, _, db_sum = multi_layer_bhattacharyya(feats, sel, eps=1e-6)
    loss, rho_mean, db_mean = multi_layer_bhattacharyya(feats, sel, eps=1e-6, distance="mean")
    for k, f in enumerate(feats):
        width = f.shape[1]
        assert db_mean[k].item() == pytest.approx(db_sum[k].item() / width, rel=1e-5)
        num = den = 0.0
        for (c, d), a in pairs:
            ref = _layer_reference(f, Y, [((c, d), a)], 1e-6, False)[2]  # D_B of the one pair
            num += a * math.exp(-ref / width)
            den += a
        assert loss[k].item() == pytest.approx(num / den, rel=1e-4)
    with pytest.raises(ValueError, match="distance"):
        create_variant("bhattacharyya", distance="max")


@pytest.mark.parametrize("on_host", [False, True])
def test_a_tiny_mean_overlap_is_logged_not_rounded_to_zero(on_host: bool, monkeypatch) -> None:
    """exp(-D_B) is 0 in float32 from D_B ~ 104: with well-apart classes var/rho_<layer> read 0
    where the overlap is ~1e-50. The mean and the epoch's running mean are float64."""
    from carrot.train import MeanAggregator

    _selection_on(on_host, monkeypatch)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    g = torch.Generator().manual_seed(0)
    emb = (torch.randn(len(y), 6, generator=g) * 0.1 + torch.nn.functional.one_hot(y, 6) * 1.5).requires_grad_(True)
    head = nn.Linear(6, 3)
    batch = StepBatch(emb, head(emb), y, head, {"l4": emb * 1.0}, progress=10.0)
    out = create_variant("bhattacharyya")(batch)
    db, rho = out.stats["db_l4"].item(), out.stats["rho_l4"]
    assert 104 < db < 700 and rho.dtype == torch.float64
    assert rho.item() > 0 and rho.item() >= math.exp(-db)  # Jensen: mean exp(-D) >= exp(-mean D)
    means = MeanAggregator()
    for _ in range(3):
        means.add("rho", rho)
    assert means.compute()["rho"] == pytest.approx(rho.item(), rel=1e-12)
