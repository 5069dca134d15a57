"""The contract every registered variant keeps (parametrised over ``list_variants()``).

Finite loss and gradients on normal and degenerate batches (one class, singleton classes,
identical and all-zero embeddings), in float32 and under float16 and bfloat16 autocast, a
gradient on the embeddings from the variant's
own term (not just from CE), declared statistics present, a valid search space whose bounds
contain the recommended setting, and strict hyperparameter checking.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from carrot.study import contains
from carrot.variants import StepBatch, Variant, create_variant, get_variant_class, list_variants
from carrot.variants.base import BaseHparams

VARIANTS = list_variants()
D, K = 12, 6


def _labels(kind: str) -> torch.Tensor:
    if kind == "normal":  # P x K: 4 classes x 4 samples
        return torch.arange(4).repeat_interleave(4)
    if kind == "one_class":
        return torch.full((8,), 2, dtype=torch.long)
    if kind == "singletons":  # every class seen once
        return torch.arange(K)
    if kind == "mixed":  # classes of 1, 2 and many samples
        return torch.tensor([0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 5])
    raise KeyError(kind)


def _embeddings(kind: str, y: torch.Tensor) -> torch.Tensor:
    if kind == "identical":
        return torch.ones(len(y), D).mul(0.7)
    if kind == "zero":  # no direction to normalise: a neck's 1 / ||z|| must not reach the gradient
        return torch.zeros(len(y), D)
    if kind == "random":
        return torch.randn(len(y), D) + 2.0 * torch.eye(K, D)[y]
    if kind == "active":
        # Classes apart but not far apart, around a shared direction: prototypes at moderate
        # distances (exp(-alpha d2) well above 0), classes separated enough to be expanded
        # (gamma > 1), some samples beyond the nuisance margin, overlapping Gaussians (rho > 0).
        return 2.0 * torch.ones(D) / D**0.5 + 0.2 * torch.randn(len(y), D) + torch.eye(K, D)[y]
    raise KeyError(kind)


def _run(name: str, y: torch.Tensor, dtype: torch.dtype = torch.float32, embeddings: str = "random", seed: int = 0,
         backward: bool = True):
    """One training step (past every warm-up: progress = 10 epochs), with ``loss.backward()``
    unless ``backward`` is false. For half dtypes it runs as the trainer does: float32
    parameters under ``torch.autocast``, so embeddings, logits and features arrive in ``dtype``."""
    torch.manual_seed(seed)
    variant = create_variant(name, **get_variant_class(name).recommended())
    emb0 = _embeddings(embeddings, y)
    emb = emb0.to(dtype).requires_grad_(True)  # leaf the gradient must reach
    neck = variant.build_neck(D)
    head = nn.Linear(D, K)
    proj = [torch.randn(D, dl) for dl in (5, 7)]
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        z = neck(emb)
        logits = head(z)
        features = {  # pooled "intermediate layers" derived from the embedding, network order
            "stage2": torch.tanh(emb @ proj[0].to(dtype)),
            "stage3": emb @ proj[1].to(dtype),
            "stage4": emb * 1.5,
        }
        if dtype != torch.float32:
            assert logits.dtype == dtype and all(f.dtype == dtype for f in features.values())
        batch = StepBatch(embedding=z, logits=logits, labels=y, head=head, features=features, progress=10.0)
        out = variant(batch)
    if backward:
        out.loss.backward()
    return variant, out, emb, head


def _assert_finite(variant: Variant, out, emb: torch.Tensor, head: nn.Linear) -> None:
    assert torch.isfinite(out.loss), f"{variant.name}: loss {out.loss}"
    for key, term in out.terms.items():
        assert term.ndim == 0 and torch.isfinite(term), f"{variant.name}: term {key} = {term}"
    assert emb.grad is not None and torch.isfinite(emb.grad).all(), f"{variant.name}: embedding grad"
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all(), f"{variant.name}: head grad"
    missing = set(variant.statistics) - set(out.stats)
    assert not missing, f"{variant.name}: statistics {sorted(missing)} declared but not returned"
    for key, value in out.stats.items():
        assert isinstance(value, torch.Tensor) and value.ndim == 0, f"{variant.name}: stat {key} not 0-dim"
        assert not value.requires_grad
        if variant.may_be_undefined(key):  # NaN means "not defined in this batch", never inf
            assert not torch.isinf(value), f"{variant.name}: stat {key} = {value}"
        else:
            assert torch.isfinite(value), f"{variant.name}: stat {key} = {value}"


@pytest.mark.parametrize("name", VARIANTS)
def test_normal_batch_finite_and_gradient_reaches_embedding(name: str) -> None:
    variant, out, emb, head = _run(name, _labels("normal"))
    _assert_finite(variant, out, emb, head)
    assert "ce" in out.terms
    assert emb.grad.abs().sum() > 0, f"{name}: no gradient on the embeddings"
    assert out.loss.item() == pytest.approx(sum(t.item() for t in out.terms.values()), rel=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_own_term_carries_gradient_to_embeddings(name: str) -> None:
    """CE alone always reaches the embeddings, so back-propagate only the variant's own terms
    (``loss - ce``) on a batch where they are active: a term computed from detached
    statistics (the sketch's prototype bug) has no gradient here. Round-off alone gives
    ~1e-9, hence the floor."""
    variant, out, emb, _ = _run(name, _labels("normal"), embeddings="active", backward=False)
    own = [term for key, term in out.terms.items() if key != "ce"]
    if name == "baseline":
        assert not own, f"baseline is CE only, got terms {sorted(out.terms)}"
        return
    assert own, f"{name}: no term besides ce"
    total = torch.stack([t.float() for t in own]).sum()
    assert total.item() != 0, f"{name}: its term is inactive on this batch ({total.item()})"
    assert total.requires_grad, f"{name}: its own term is detached from the embeddings"
    (grad,) = torch.autograd.grad(total, emb, allow_unused=True)
    assert grad is not None, f"{name}: its own term is not connected to the embeddings"
    assert torch.isfinite(grad).all(), f"{name}: non-finite gradient from its own term"
    assert grad.abs().max() > 1e-7, f"{name}: its own term gives no gradient on the embeddings"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("embeddings", ["random", "identical", "zero"])
@pytest.mark.parametrize("labels", ["normal", "one_class", "singletons", "mixed"])
@pytest.mark.parametrize("name", VARIANTS)
def test_degenerate_batches(name: str, labels: str, embeddings: str, dtype: torch.dtype) -> None:
    """Finite loss, terms, statistics and gradients (embeddings and head) on every batch shape
    with random, identical and all-zero embeddings, in float32 and in half precision (float32
    parameters under ``torch.autocast``: embeddings, logits and features arrive in float16 or
    bfloat16, and the gradient of a float16 embedding overflows above 65504). The loss stays
    float32, and the statistics float32 or wider (bhattacharyya's mean overlaps are float64)."""
    variant, out, emb, head = _run(name, _labels(labels), dtype=dtype, embeddings=embeddings)
    _assert_finite(variant, out, emb, head)
    # Bounded, not only finite: a 1 / eps of a normalisation at 0 or a 1 / round-off of a
    # collapsed spread (what overflows float16) gives ~1e7 to 1e26 here, the maths O(1).
    assert emb.grad.float().abs().max() < 1e3, f"{name}: embedding gradient {emb.grad.abs().max()}"
    assert out.loss.dtype == torch.float32
    for key, value in out.stats.items():
        assert value.dtype in (torch.float32, torch.float64), key


@pytest.mark.parametrize("name", VARIANTS)
def test_declarations(name: str) -> None:
    cls = get_variant_class(name)
    assert cls.name == name
    assert issubclass(cls.Hparams, BaseHparams) and dataclasses.is_dataclass(cls.Hparams)
    rec = cls.recommended()
    assert cls.default_sampler in ("pk", "random") and cls.default_m_per_class >= 2
    assert not {"sampler", "m_per_class"} & set(rec), "the batch sampler is a data setting, not a hyperparameter"
    variant = create_variant(name, **rec)
    assert dataclasses.asdict(variant.hp) == rec
    assert isinstance(cls.statistics, tuple) and all(isinstance(s, str) for s in cls.statistics)
    fields = {f.name for f in dataclasses.fields(cls.Hparams)}
    for key, dist in cls.full_search_space().items():
        assert isinstance(dist, (FloatDistribution, IntDistribution, CategoricalDistribution)), f"{name}.{key}: {dist!r}"
        assert key in fields, f"{name}: search space key {key!r} is not a hyperparameter"
        if isinstance(dist, (FloatDistribution, IntDistribution)):
            assert dist.low <= dist.high
            if dist.log:
                assert dist.low > 0
        else:
            assert len(dist.choices) >= 1
        assert contains(dist, rec[key]), f"{name}.{key}: recommended {rec[key]!r} outside {dist!r}"


@pytest.mark.parametrize("name", VARIANTS)
def test_unknown_hparam_raises(name: str) -> None:
    expected = "has no hyperparameters" if name == "baseline" else "unknown hyperparameter"
    with pytest.raises(ValueError, match=expected) as info:
        create_variant(name, definitely_not_a_hparam=1)
    assert f"variant {name!r}" in str(info.value) and "definitely_not_a_hparam" in str(info.value)


def test_variant_names_are_the_registry() -> None:
    assert VARIANTS[0] == "baseline"
    for name in ("expansion", "bhattacharyya", "barrier"):
        assert name in VARIANTS
        assert get_variant_class(name).default_sampler == "pk"
    with pytest.raises(ValueError):
        create_variant("no_such_variant")
