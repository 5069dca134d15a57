"""``pairwise_confusion``: the authors' formula and the masked option against loops,
lambda = lam_per_class * K, edge cases."""
from __future__ import annotations

import math

import pytest
import torch

from carrot.variants import StepBatch, create_variant
from carrot.variants.pairwise_confusion import pairwise_confusion_loss


def authors_reference(logits, y):
    """The authors' PairwiseConfusion (abhimanyudubey/confusion) on the softmax outputs, one pair
    at a time: sum over i < B/2 of ||p_i - p_{i+B/2}||_2, divided by the batch size B, every
    pair counted whatever its labels."""
    p = logits.double().softmax(1).tolist()
    b = len(p) - len(p) % 2  # an odd batch drops its last sample (the authors raise)
    half = b // 2
    total = 0.0
    for i in range(half):
        total += math.sqrt(sum((p[i][k] - p[i + half][k]) ** 2 for k in range(len(p[i]))))
    return total / b


def different_reference(logits, y):
    p = logits.double().softmax(1)
    half = len(y) // 2
    dists = [torch.linalg.norm(p[i] - p[i + half]) for i in range(half) if y[i] != y[i + half]]
    return torch.stack(dists).mean() if dists else torch.zeros((), dtype=torch.float64)


@pytest.mark.parametrize("b", [10, 11])
def test_default_is_the_authors_formula(b):
    torch.manual_seed(b)
    logits = torch.randn(b, 7)
    y = torch.randint(0, 3, (b,))
    y[0], y[b // 2] = 1, 1  # a same-label pair: the authors count it
    loss, stats = pairwise_confusion_loss(logits, y)
    assert loss.item() == pytest.approx(authors_reference(logits, y), rel=1e-6)
    assert stats["pairs"].item() == b // 2
    half = b // 2  # the logged statistic is the mean pair distance, twice the loss (which divides by 2h)
    p = logits.double().softmax(1)
    mean_distance = sum(torch.linalg.norm(p[i] - p[i + half]).item() for i in range(half)) / half
    assert stats["distance_mean"].item() == pytest.approx(mean_distance, rel=1e-6)
    if b % 2 == 0:  # their expression, verbatim, on the softmax outputs
        features = logits.softmax(1)
        left, right = features[:int(0.5 * b)], features[int(0.5 * b):]
        theirs = torch.norm((left - right).abs(), 2, 1).sum() / float(b)
        assert loss.item() == pytest.approx(theirs.item(), rel=1e-6)
    # the default is not the masked mean (it counts the same-label pair and divides by B)
    assert loss.item() != pytest.approx(different_reference(logits, y).item(), rel=1e-3)


@pytest.mark.parametrize("b", [10, 11])
def test_different_option_matches_loop_and_odd_batch_drops_last(b):
    torch.manual_seed(b)
    logits = torch.randn(b, 7)
    y = torch.randint(0, 3, (b,))
    y[0], y[b // 2] = 1, 1  # at least one same-label pair, which must not count
    loss, stats = pairwise_confusion_loss(logits, y, pairs="different")
    assert loss.item() == pytest.approx(different_reference(logits, y).item(), rel=1e-5)
    assert stats["distance_mean"].item() == pytest.approx(different_reference(logits, y).item(), rel=1e-5)
    assert stats["pairs"].item() == sum(int(y[i] != y[i + b // 2]) for i in range(b // 2))
    if b % 2:  # the last sample is dropped: changing it changes nothing
        logits2 = logits.clone()
        logits2[-1] += 5.0
        for pairs in ("all", "different"):
            assert pairwise_confusion_loss(logits2, y, pairs)[0].item() == pytest.approx(
                pairwise_confusion_loss(logits, y, pairs)[0].item())


@pytest.mark.parametrize("pairs", ["all", "different"])
def test_identical_outputs_and_no_differing_pair_have_finite_zero_gradient(pairs):
    logits = torch.zeros(6, 4, requires_grad=True)  # identical outputs: distance 0
    loss, stats = pairwise_confusion_loss(logits, torch.tensor([0, 1, 2, 1, 2, 0]), pairs)
    loss.backward()
    assert loss.item() == 0.0 and stats["pairs"].item() == 3
    assert torch.isfinite(logits.grad).all()
    logits = torch.randn(4, 4, requires_grad=True)
    loss, stats = pairwise_confusion_loss(logits, torch.tensor([0, 1, 0, 1]), pairs)  # all pairs share labels
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    if pairs == "different":  # no pair counted: the loss is 0 and the mean distance undefined
        assert loss.item() == 0.0 and stats["pairs"].item() == 0
        assert torch.isnan(stats["distance_mean"])
    else:
        assert loss.item() > 0 and stats["pairs"].item() == 2


def test_variant_scales_lambda_with_classes_and_defaults_to_the_authors():
    v = create_variant("pairwise_confusion", lam_per_class=0.15)
    torch.manual_seed(0)
    z = torch.randn(8, 5, requires_grad=True)
    head = torch.nn.Linear(5, 20)
    y = torch.tensor([0, 1, 2, 3, 0, 5, 6, 7])  # one same-label pair
    out = v(StepBatch(embedding=z, logits=head(z), labels=y, head=head))
    assert out.stats["lambda"].item() == pytest.approx(3.0)
    assert set(out.stats) == set(v.statistics)
    assert out.terms["pc"].item() == pytest.approx(3.0 * authors_reference(head(z), y), rel=1e-5)
    out.terms["pc"].backward()
    assert z.grad.abs().sum() > 0
    assert v.recommended()["lam_per_class"] == 0.1 and v.recommended()["pairs"] == "all"
    masked = create_variant("pairwise_confusion", lam_per_class=0.15, pairs="different")
    out = masked(StepBatch(embedding=z, logits=head(z), labels=y, head=head))
    assert out.terms["pc"].item() == pytest.approx(3.0 * different_reference(head(z), y).item(), rel=1e-5)
    with pytest.raises(ValueError, match="pairs"):
        create_variant("pairwise_confusion", pairs="same")
