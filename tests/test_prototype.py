"""``prototype``: the step against a slow loop reference, the gradient fix, state handling."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from carrot.geometry import device_routes
from carrot.variants import StepBatch, create_variant
from carrot.variants.prototype import (
    L2Normalize, confusion_sums, neighbour_pairs, orthogonality_penalty, shrunk_metric_factor,
    update_confusion,
)


class SlowPrototype:
    """The maths of one step written as obvious loops, float64."""

    def __init__(self, k, d, lam=1.0, alpha=10.0, top_m=3, beta=0.05, m_conf=0.05, conf_topk=0,
                 metric="euclidean", shrinkage=0.1, m_cov=0.05):
        self.k, self.d = k, d
        self.lam, self.alpha, self.top_m, self.beta = lam, alpha, top_m, beta
        self.m_conf, self.conf_topk = m_conf, conf_topk
        self.metric, self.shrinkage, self.m_cov = metric, shrinkage, m_cov
        self.mu = torch.zeros(k, d, dtype=torch.float64)
        self.conf = torch.zeros(k, k, dtype=torch.float64)
        self.cov = torch.zeros(d, d, dtype=torch.float64)
        self.seen: set[int] = set()

    def step(self, h, logits, y):
        h, p = h.double(), F.softmax(logits.detach().double(), dim=1)
        present = sorted(set(y.tolist()))
        conf = self.conf.clone()
        for c in present:
            rows = []
            for i in range(len(y)):
                if y[i] != c:
                    continue
                row = p[i].clone()
                if self.conf_topk:
                    order = sorted(range(self.k), key=lambda j: -float(p[i, j]))
                    for j in order[self.conf_topk:]:
                        row[j] = 0.0
                rows.append(row)
            conf[c] = (1 - self.m_conf) * self.conf[c] + self.m_conf * torch.stack(rows).mean(0)
            conf[c, c] = 0.0
        mu_t = [self.mu[c] for c in range(self.k)]
        means = {c: h[y == c].mean(0) for c in present}
        for c in present:
            v = (1 - self.beta) * self.mu[c] + self.beta * means[c]
            mu_t[c] = v / v.norm()
        prec = torch.eye(self.d, dtype=torch.float64)
        if self.metric == "mahalanobis":
            scatter = torch.zeros(self.d, self.d, dtype=torch.float64)
            for i in range(len(y)):
                dev = (h[i] - means[int(y[i])]).detach()
                scatter += torch.outer(dev, dev)
            dof = len(y) - len(present)
            if dof > 0:
                self.cov = (1 - self.m_cov) * self.cov + self.m_cov * scatter / dof
            tr = torch.trace(self.cov)
            scaled = self.cov * self.d / tr if tr > 0 else torch.eye(self.d, dtype=torch.float64)
            sigma = (1 - self.shrinkage) * scaled + self.shrinkage * torch.eye(self.d, dtype=torch.float64)
            prec = torch.linalg.inv(sigma)
        self.seen |= set(present)
        omega = 0.5 * (conf + conf.T)
        pairs = set()
        for i in self.seen:
            others = sorted((j for j in self.seen if j != i), key=lambda j: -float(omega[i, j]))
            for j in others[: self.top_m]:
                pairs.add((min(i, j), max(i, j)))
        pairs = sorted(pr for pr in pairs if omega[pr] > 0)
        terms = []
        for i, j in pairs:
            diff = mu_t[i] - mu_t[j]
            terms.append(omega[i, j] * torch.exp(-self.alpha * diff @ prec @ diff))
        loss = torch.stack(terms).mean() if terms else h.sum() * 0.0
        self.mu = torch.stack([m.detach() for m in mu_t])
        self.conf = conf
        return loss, len(pairs)


def _labels(step, b=12, k=10):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, min(k, k - 3 + step), (b,), generator=g)  # a growing set of classes


@pytest.mark.parametrize("host_slots", [True, False])
@pytest.mark.parametrize("metric,conf_topk", [("euclidean", 0), ("euclidean", 3), ("mahalanobis", 0)])
def test_steps_match_slow_reference(metric, conf_topk, host_slots):
    """Both routes: the C used slots and the pair list the CPU step keeps, and all B slots
    with the K x K Gram (the device path, where the class count would cost a host sync)."""
    with contextlib.nullcontext() if host_slots else device_routes():
        _check_steps_match_slow_reference(metric, conf_topk)


def _check_steps_match_slow_reference(metric, conf_topk):
    torch.manual_seed(0)
    k, d = 10, 8
    hp = dict(lam=2.0, alpha=0.5, top_m=3, conf_topk=conf_topk, metric=metric, warmup_epochs=0.0,
              cov_refresh_every=1, cov_shrinkage=0.2, mu_momentum=0.3, conf_momentum=0.2, cov_momentum=0.3)
    v = create_variant("prototype", **hp)
    ref = SlowPrototype(k, d, lam=2.0, alpha=0.5, top_m=3, beta=0.3, m_conf=0.2, conf_topk=conf_topk,
                        metric=metric, shrinkage=0.2, m_cov=0.3)
    head = torch.nn.Linear(d, k).double()
    for step in range(4):
        z = torch.randn(12, d, dtype=torch.float64, requires_grad=True)
        h = F.normalize(z, dim=1)
        y = _labels(step)
        logits = head(h)
        out = v(StepBatch(embedding=h.float(), logits=logits, labels=y, head=head, progress=1.0))
        (g,) = torch.autograd.grad(out.terms["carrot"], z, retain_graph=True)
        ref_loss, ref_pairs = ref.step(h, logits, y)
        (g_ref,) = torch.autograd.grad(2.0 * ref_loss, z)
        assert out.stats["pairs"].item() == ref_pairs
        assert out.stats["l_carrot"].item() == pytest.approx(ref_loss.item(), rel=1e-4, abs=1e-9)
        assert g_ref.abs().max() > 1e-5  # a gradient worth comparing
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-6 * g_ref.abs().max().item())
        torch.testing.assert_close(v.conf.double(), ref.conf, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(v.mu.double(), ref.mu, rtol=1e-5, atol=1e-6)


def _step_batch(k=6, d=16, b=12, progress=10.0, seed=0, neck=None):
    torch.manual_seed(seed)
    z = torch.randn(b, d, requires_grad=True)
    emb = (neck or L2Normalize())(z)
    head = torch.nn.Linear(d, k)
    y = torch.arange(b) % k
    return StepBatch(embedding=emb, logits=head(emb), labels=y, head=head, progress=progress), z, head


def test_gradient_reaches_embeddings_through_the_carrot_term_alone():
    """The sketch computed the loss from the no-grad buffer; this one must not."""
    v = create_variant("prototype", warmup_epochs=0.0)
    batch, z, _ = _step_batch()
    out = v(batch)
    assert out.stats["pairs"].item() > 0
    out.terms["carrot"].backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # a second step: prototypes of seen classes come from the buffer, still a gradient
    batch, z, _ = _step_batch(seed=1)
    v(batch).terms["carrot"].backward()
    assert z.grad.abs().sum() > 0


def test_confusion_update_rows_diagonal_and_topk():
    conf = torch.rand(5, 5)
    conf.fill_diagonal_(0)
    logits = torch.randn(6, 5)
    y = torch.tensor([0, 0, 2, 2, 2, 4])
    p = logits.softmax(1)
    sums = confusion_sums(logits, y, topk=2)
    counts = torch.bincount(y, minlength=5).float()
    new = update_confusion(conf, sums, counts, 0.5)
    for c in range(5):
        rows = [i for i in range(6) if y[i] == c]
        if not rows:
            assert torch.equal(new[c], conf[c])  # absent rows unchanged
            continue
        sparse = torch.zeros(len(rows), 5)
        for r, i in enumerate(rows):
            top = p[i].topk(2).indices
            sparse[r, top] = p[i, top]
        expect = 0.5 * conf[c] + 0.5 * sparse.mean(0)
        expect[c] = 0.0
        torch.testing.assert_close(new[c], expect)
    assert (new.diagonal() == 0).all()


def test_neighbour_pairs_are_deduplicated_topm():
    torch.manual_seed(3)
    k, m = 9, 3
    omega = torch.rand(k, k)
    omega = 0.5 * (omega + omega.T)
    omega[1, 4] = omega[4, 1] = 0.0  # a zero-weight pair is never selected
    valid = torch.ones(k, dtype=torch.bool)
    valid[7] = False
    mask = neighbour_pairs(omega, m, valid)
    expect = set()
    for i in range(k):
        if not valid[i]:
            continue
        others = sorted((j for j in range(k) if j != i and valid[j]), key=lambda j: -float(omega[i, j]))
        expect |= {(min(i, j), max(i, j)) for j in others[:m] if omega[i, j] > 0}
    got = {(int(i), int(j)) for i, j in mask.nonzero()}
    assert got == expect
    assert not mask.tril().any()
    assert neighbour_pairs(omega, 50, valid).sum() == 8 * 7 // 2 - 1  # all valid pairs but (1, 4)


@pytest.mark.parametrize("on_host", [True, False])
def test_neighbour_pairs_keep_every_tie_at_the_mth_weight(on_host):
    """Where several classes tie at a row's m-th largest weight all of them are neighbours, on
    both routes (the host's threshold from numpy's sort, the device's from topk)."""
    k, m = 7, 2
    omega = torch.zeros(k, k)
    for i, j, w in [(0, 1, 0.5), (0, 2, 0.3), (0, 3, 0.3), (0, 4, 0.3), (0, 5, 0.1), (5, 6, 0.2), (1, 6, 0.05)]:
        omega[i, j] = omega[j, i] = w
    valid = torch.ones(k, dtype=torch.bool)
    with contextlib.nullcontext() if on_host else device_routes():
        mask = neighbour_pairs(omega, m, valid)
    expect = set()
    for i in range(k):
        row = sorted((float(omega[i, j]) for j in range(k) if j != i), reverse=True)
        expect |= {(min(i, j), max(i, j)) for j in range(k) if j != i and 0 < omega[i, j] >= row[m - 1]}
    got = {(int(i), int(j)) for i, j in mask.nonzero()}
    assert got == expect
    assert {(0, 2), (0, 3), (0, 4)} <= got  # row 0's three-way tie at its 2nd weight, all kept
    assert (0, 5) in got  # 5's own top 2 (0.2, 0.1) reach 0


@pytest.mark.parametrize("on_host", [True, False])
def test_confusion_sums_keep_every_tie_at_the_topk_probability(on_host):
    """A sample keeps every probability at or above its top-k-th: equal logits keep them all."""
    k, topk = 6, 2
    logits = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
    logits[1] = 0.0  # uniform: all six tie
    logits[3, :3] = 4.0  # three tie at the top
    y = torch.tensor([0, 1, 1, 4, 4])
    with contextlib.nullcontext() if on_host else device_routes():
        sums = confusion_sums(logits, y, topk=topk)
    p = logits.softmax(1)
    expect = torch.zeros(k, k)
    for i in range(5):
        top = sorted(p[i].tolist(), reverse=True)[topk - 1]
        expect[y[i]] += torch.where(p[i] >= top, p[i], 0.0)
    torch.testing.assert_close(sums, expect)
    assert (sums[1] > 0).all() and (sums[4][:3] > 0).all()


def test_metric_factor_gives_shrunk_mahalanobis():
    torch.manual_seed(4)
    d = 6
    a = torch.randn(d, d, dtype=torch.float64)
    cov = a @ a.T
    factor = shrunk_metric_factor(cov, 0.3)
    sigma = 0.7 * cov * d / torch.trace(cov) + 0.3 * torch.eye(d, dtype=torch.float64)
    delta = torch.randn(4, d, dtype=torch.float64)
    got = ((delta @ factor) ** 2).sum(1)
    expect = torch.einsum("nd,de,ne->n", delta, torch.linalg.inv(sigma), delta)
    torch.testing.assert_close(got, expect)
    # isotropic covariance (or none yet): the euclidean distance
    torch.testing.assert_close(shrunk_metric_factor(2.5 * torch.eye(d), 0.1), torch.eye(d))
    torch.testing.assert_close(shrunk_metric_factor(torch.zeros(d, d), 0.1), torch.eye(d))


def test_covariance_refresh_schedule():
    v = create_variant("prototype", metric="mahalanobis", cov_refresh_every=3, cov_momentum=0.5)
    factors = []
    for step in range(5):
        batch, _, _ = _step_batch(seed=step)
        v(batch)
        factors.append(v.metric_factor.clone())
    assert not torch.equal(factors[0], torch.eye(16))
    assert torch.equal(factors[0], factors[1]) and torch.equal(factors[1], factors[2])
    assert not torch.equal(factors[2], factors[3]) and torch.equal(factors[3], factors[4])
    torch.testing.assert_close(v.mu_metric, v.mu @ v.metric_factor)


def test_orthogonality_penalty_exact_and_hutchinson():
    torch.manual_seed(5)
    v = torch.eye(12) + 0.1 * torch.randn(12, 12)
    exact = orthogonality_penalty(v, probes=0)
    a = v.T @ v - torch.eye(12)
    torch.testing.assert_close(exact, (a**2).sum())
    g = torch.Generator().manual_seed(0)
    est = torch.stack([orthogonality_penalty(v, probes=8, generator=g) for _ in range(400)]).mean()
    assert est.item() == pytest.approx(exact.item(), rel=0.05)
    assert orthogonality_penalty(torch.eye(12), probes=4).item() == 0.0


def test_whitening_neck_and_penalty():
    v = create_variant("prototype", metric="whitening", warmup_epochs=0.0, whiten_probes=0)
    neck = v.build_neck(16)
    x = torch.randn(5, 16)
    torch.testing.assert_close(neck(x), F.normalize(x, dim=1))  # V = I at init
    lin = neck[1]
    with torch.no_grad():
        lin.weight.add_(0.05 * torch.randn(16, 16))
    batch, z, _ = _step_batch(neck=neck)
    out = v(batch)
    a = lin.weight.T @ lin.weight - torch.eye(16)
    torch.testing.assert_close(out.terms["whiten"], 0.1 * (a**2).sum())
    out.loss.backward()
    assert lin.weight.grad.abs().sum() > 0 and z.grad.abs().sum() > 0
    assert all(p is not lin.weight for p in v.parameters())  # V belongs to the model, not twice


def test_lambda_ramp_and_eval_mode_keeps_state():
    v = create_variant("prototype", warmup_epochs=4.0, lam=2.0)
    batch, _, _ = _step_batch(progress=1.0)
    out = v(batch)
    assert out.stats["lambda"].item() == pytest.approx(0.5)
    torch.testing.assert_close(out.terms["carrot"], 0.5 * out.stats["l_carrot"])
    state = {k: t.clone() for k, t in v.state_dict().items()}
    v.eval()
    v(_step_batch(seed=2, progress=1.0)[0])
    assert all(torch.equal(state[k], t) for k, t in v.state_dict().items())


def test_lazy_state_and_checkpoint_roundtrip():
    v = create_variant("prototype", metric="mahalanobis", cov_refresh_every=2, warmup_epochs=0.0)
    assert v.mu.numel() == 0
    for step in range(3):
        v(_step_batch(seed=step)[0])
    assert v.mu.shape == (6, 16) and v.conf.shape == (6, 6) and v.cov.shape == (16, 16)
    w = create_variant("prototype", metric="mahalanobis", cov_refresh_every=2, warmup_epochs=0.0)
    w.load_state_dict(v.state_dict())
    assert w._steps == 3
    a, b = v(_step_batch(seed=9)[0]), w(_step_batch(seed=9)[0])
    torch.testing.assert_close(a.loss, b.loss)
    assert torch.equal(v.metric_factor, w.metric_factor)  # both refreshed at step 4 the same way
    with pytest.raises(ValueError):
        v(_step_batch(k=7)[0])


@pytest.mark.parametrize("metric", ["euclidean", "mahalanobis", "whitening"])
def test_degenerate_batches_are_finite(metric):
    v = create_variant("prototype", metric=metric, warmup_epochs=0.0)
    neck = v.build_neck(8)
    head = torch.nn.Linear(8, 5)
    for z, y in [(torch.ones(6, 8), torch.zeros(6, dtype=torch.long)),  # one class, identical
                 (torch.ones(4, 8), torch.arange(4)),  # singletons, identical
                 (torch.randn(1, 8), torch.tensor([3]))]:
        z = z.clone().requires_grad_()
        emb = neck(z)
        out = v(StepBatch(embedding=emb, logits=head(emb), labels=y, head=head, progress=1.0))
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(z.grad).all()
        assert set(out.stats) == set(v.statistics)
        assert all(torch.isfinite(s) or (v.may_be_undefined(k) and torch.isnan(s)) for k, s in out.stats.items())
        if out.stats["pairs"].item() == 0:  # means over no pair are undefined, not 0
            assert torch.isnan(out.stats["omega_mean"]) and torch.isnan(out.stats["d2_mean"])


def test_single_process_distributed_matches(tmp_path):
    import torch.distributed as dist

    ref = create_variant("prototype", warmup_epochs=0.0)
    outs_ref = [ref(_step_batch(seed=s)[0]).loss for s in range(2)]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        v = create_variant("prototype", warmup_epochs=0.0)
        outs = []
        for s in range(2):
            batch, z, _ = _step_batch(seed=s)
            out = v(batch)
            out.loss.backward()
            assert z.grad.abs().sum() > 0
            outs.append(out.loss)
    finally:
        dist.destroy_process_group()
    for a, b in zip(outs, outs_ref):
        assert math.isclose(a.item(), b.item(), rel_tol=1e-6)


def test_float32_under_bf16_autocast():
    """The Gram products run in float32 under autocast (bf16 would move exp(-alpha d2) by ~10 %)."""
    batch, _, _ = _step_batch(seed=3)
    batch.logits = batch.logits.detach()
    plain = create_variant("prototype", warmup_epochs=0.0)
    cast = create_variant("prototype", warmup_epochs=0.0)
    for _ in range(2):
        a = plain(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b = cast(batch)
    assert a.stats["l_carrot"].item() > 0
    assert b.stats["l_carrot"].item() == pytest.approx(a.stats["l_carrot"].item(), rel=1e-5)
