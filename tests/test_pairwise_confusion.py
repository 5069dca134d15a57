"""``pairwise_confusion``: the loss against a loop, lambda = lam_per_class * K, edge cases."""
from __future__ import annotations

import pytest
import torch

from carrot.variants import StepBatch, create_variant
from carrot.variants.pairwise_confusion import pairwise_confusion_loss


def loop_reference(logits, y):
    p = logits.double().softmax(1)
    half = len(y) // 2
    dists = [torch.linalg.norm(p[i] - p[i + half]) for i in range(half) if y[i] != y[i + half]]
    return torch.stack(dists).mean() if dists else torch.zeros((), dtype=torch.float64)


@pytest.mark.parametrize("b", [10, 11])
def test_matches_loop_and_odd_batch_drops_last(b):
    torch.manual_seed(b)
    logits = torch.randn(b, 7)
    y = torch.randint(0, 3, (b,))
    y[0], y[b // 2] = 1, 1  # at least one same-label pair, which must not count
    loss, stats = pairwise_confusion_loss(logits, y)
    assert loss.item() == pytest.approx(loop_reference(logits, y).item(), rel=1e-5)
    assert stats["pairs"].item() == sum(int(y[i] != y[i + b // 2]) for i in range(b // 2))
    if b % 2:  # the last sample is dropped: changing it changes nothing
        logits2 = logits.clone()
        logits2[-1] += 5.0
        assert pairwise_confusion_loss(logits2, y)[0].item() == pytest.approx(loss.item())


def test_no_differing_pair_and_identical_outputs_have_finite_zero_gradient():
    logits = torch.zeros(6, 4, requires_grad=True)  # identical outputs: distance 0
    loss, stats = pairwise_confusion_loss(logits, torch.tensor([0, 1, 2, 1, 2, 0]))
    loss.backward()
    assert loss.item() == 0.0 and stats["pairs"].item() == 3
    assert torch.isfinite(logits.grad).all()
    logits = torch.randn(4, 4, requires_grad=True)
    loss, stats = pairwise_confusion_loss(logits, torch.tensor([0, 1, 0, 1]))  # all pairs share labels
    loss.backward()
    assert loss.item() == 0.0 and stats["pairs"].item() == 0 and torch.isfinite(logits.grad).all()


def test_variant_scales_lambda_with_classes():
    v = create_variant("pairwise_confusion", lam_per_class=0.15)
    torch.manual_seed(0)
    z = torch.randn(8, 5, requires_grad=True)
    head = torch.nn.Linear(5, 20)
    y = torch.arange(8)
    out = v(StepBatch(embedding=z, logits=head(z), labels=y, head=head))
    assert out.stats["lambda"].item() == pytest.approx(3.0)
    assert set(out.stats) == set(v.statistics)
    expected = 3.0 * loop_reference(head(z), y)
    assert out.terms["pc"].item() == pytest.approx(expected.item(), rel=1e-5)
    out.terms["pc"].backward()
    assert z.grad.abs().sum() > 0
    assert v.recommended()["lam_per_class"] == 0.1
