"""The variant interface: one training step in, named loss terms and statistics out.

A variant is an ``nn.Module``. ``forward`` does what every variant shares (the
cross-entropy on the logits, dtype checks) and calls ``compute``, where the variant's own
maths lives. Each variant also declares

- ``Hparams``: a dataclass whose defaults are the design note's recommended setting;
- ``search_space``: name -> ``optuna.distributions`` object, searched by the study;
- ``statistics``: the names of the statistics ``compute`` returns (logged as ``var/<name>``);
- ``default_sampler``: the batch sampler the variant prefers when ``data.sampler`` is ``auto``:
  ``"pk"`` for variants that estimate per-class statistics in a batch (``default_m_per_class``
  samples per class).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from optuna.distributions import BaseDistribution
from torch import Tensor, nn

from carrot.geometry import l2_normalize, stat_float


@dataclass
class StepBatch:
    """What one training step produced, handed to the variant."""

    embedding: Tensor  # (B, D): what the head sees (after the variant's neck)
    logits: Tensor  # (B, K)
    labels: Tensor  # (B,) int64
    head: nn.Linear  # logits = head(embedding)
    features: dict[str, Tensor] = field(default_factory=dict)  # layer -> (B, D_l) pooled
    progress: float = 0.0  # epochs elapsed, fractional (2.5 = half-way through epoch 3)
    label_smoothing: float = 0.0


@dataclass
class VariantOutput:
    terms: dict[str, Tensor]  # named loss contributions (weighted); loss = sum(terms)
    stats: dict[str, Tensor]  # 0-dim detached tensors, logged as var/<name>

    @property
    def loss(self) -> Tensor:
        return torch.stack([stat_float(t) for t in self.terms.values()]).sum()


@dataclass
class BaseHparams:
    """Base of every variant's hyperparameters (the batch sampler is a data setting,
    ``data.sampler`` and ``data.m_per_class``)."""

    def __post_init__(self) -> None:
        """Subclasses check their fields here (and call this first)."""


class Variant(nn.Module):
    name: ClassVar[str] = ""
    Hparams: ClassVar[type[BaseHparams]] = BaseHparams
    search_space: ClassVar[dict[str, BaseDistribution]] = {}
    statistics: ClassVar[tuple[str, ...]] = ()
    # statistics a batch may leave undefined (NaN): the trainer averages them as missing;
    # "name_*" stands for every statistic whose name starts with "name_"
    maybe_undefined: ClassVar[tuple[str, ...]] = ()
    # the batch sampler when data.sampler is "auto": "pk" (P classes x m samples) or "random"
    default_sampler: ClassVar[str] = "random"
    default_m_per_class: ClassVar[int] = 4  # samples per class of a "pk" batch it is designed for
    uses_features: ClassVar[bool] = False  # needs intermediate layers in StepBatch.features

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        known = {f.name for f in dataclasses.fields(self.Hparams)}
        unknown = sorted(set(hparams) - known)
        if unknown:
            if not known:
                raise ValueError(f"variant {self.name!r} has no hyperparameters, so {unknown} cannot be set; "
                                 "expected a variant with a term (`carrot variants` lists them and their knobs)")
            raise ValueError(f"unknown hyperparameter(s) {unknown} for variant {self.name!r}; valid: {sorted(known)}")
        _check_types(self.Hparams, hparams, self.name)
        self.hp = self.Hparams(**hparams)

    @classmethod
    def recommended(cls) -> dict[str, Any]:
        """The design note's recommended setting (trial 0 of every study)."""
        return dataclasses.asdict(cls.Hparams())

    @classmethod
    def may_be_undefined(cls, statistic: str) -> bool:
        """Whether a batch may leave ``statistic`` undefined (NaN), by ``maybe_undefined``."""
        return any(statistic == name or (name.endswith("*") and statistic.startswith(name[:-1]))
                   for name in cls.maybe_undefined)

    @classmethod
    def full_search_space(cls) -> dict[str, BaseDistribution]:
        """The variant's own hyperparameters (the study adds the training and data ones)."""
        return dict(cls.search_space)

    def build_neck(self, dim: int) -> nn.Module:
        """Module between the pooled embedding and the head (identity unless overridden)."""
        return nn.Identity()

    def floor_products(self, batch: int, num_classes: int, dim: int,
                       slots: int | None = None) -> tuple[tuple[int, int, int], ...]:
        """The matrix products, ``(n, k, m)`` for an (n, k) @ (k, m) product, that a step of the
        term cannot avoid at this scale beyond the CE head's own three (a second head pass, a
        K x K Gram); ``make bench`` times them after the CE head as the term's floor. ``slots``:
        the class slots a step uses (the classes of the batch on CPU, where the host knows
        them; ``batch`` by default, as on CUDA). None by default."""
        return ()

    def floor_normal_draws(self, batch: int, dim: int) -> int:
        """Standard-normal numbers a step must draw (noise of its own definition); ``make bench``
        times drawing them with the device's generator as part of the term's floor. 0 by default."""
        return 0

    def forward(self, batch: StepBatch) -> VariantOutput:
        if batch.embedding.ndim != 2 or batch.logits.ndim != 2 or batch.labels.ndim != 1:
            raise ValueError(
                "expected embedding (B, D), logits (B, K), labels (B,); got "
                f"{tuple(batch.embedding.shape)}, {tuple(batch.logits.shape)}, {tuple(batch.labels.shape)}"
            )
        ce = F.cross_entropy(stat_float(batch.logits), batch.labels, label_smoothing=batch.label_smoothing)
        terms, stats = self.compute(batch, ce)
        stats = {k: v.detach() if v.dtype in (torch.float32, torch.float64) else v.detach().float()
                 for k, v in stats.items()}  # float64 kept: a mean overlap rho ~ 1e-50 is not 0
        return VariantOutput({"ce": ce, **terms}, stats)

    def compute(self, batch: StepBatch, ce: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The variant's own terms (besides ``ce``) and statistics."""
        return {}, {}


def _check_types(hparams_cls: type, values: dict[str, Any], variant: str) -> None:
    """Each value has its field's declared type (bool, int, float, str), naming the key."""
    import typing

    hints = typing.get_type_hints(hparams_cls)
    for key, value in values.items():
        tp = hints.get(key)
        ok = {bool: lambda v: isinstance(v, bool),
              int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str)}.get(tp)
        if ok is not None and not ok(value):
            expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]
            raise ValueError(f"invalid {key}={value!r} for variant {variant!r}: expected {expected}")


class L2Normalize(nn.Module):
    """Neck ``h = z / max(||z||, 1e-12)`` along the last dim (:func:`carrot.geometry.l2_normalize`),
    in float32, returned in the input dtype."""

    def forward(self, z: Tensor) -> Tensor:
        return l2_normalize(stat_float(z)).to(z.dtype)


class _HeadPass(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose backward returns fresh contiguous gradients.

    The variants that put a second set of rows through the head (``expansion``'s z+,
    ``nuisance``'s noisy copies) add a weight gradient to the one of the main pass. Autograd's
    linear backward hands the weight a transposed view, which the accumulation cannot add
    in place, so every step allocates a third (K, D) buffer for the sum; a contiguous
    ``g^T x`` is summed in place. Backward runs under the forward's autocast state, as
    autograd's would. Given ``value``, the forward returns it instead of computing the product
    (see :func:`linear_pass`).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, value: Tensor | None) -> Tensor:
        device = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias) if value is None else value.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            g_x = g @ weight if ctx.needs_input_grad[0] else None  # (N, D)
            g_w = g.T @ x if ctx.needs_input_grad[1] else None  # (K, D), contiguous
        g_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return g_x, g_w, g_b, None


def linear_pass(x: Tensor, weight: Tensor, bias: Tensor | None = None, value: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for extra rows through the step's head (:class:`_HeadPass`), (N, K).

    ``value``, when given, is that same ``F.linear(x, weight, bias)`` obtained without the
    product (``expansion`` combines the batch's logits, ``nuisance`` uses the Gram matrix its
    bound needs anyway): it is returned as the forward, with the gradients of the linear map in
    the backward.
    """
    return _HeadPass.apply(x, weight, bias, value)


def head_pass(head: nn.Linear, x: Tensor) -> Tensor:
    """``head(x)`` for extra rows through the step's head (:class:`_HeadPass`), (N, K)."""
    return linear_pass(x, head.weight, head.bias)


def linear_ramp(progress: float, warmup_epochs: float) -> float:
    """0 -> 1 linearly over ``warmup_epochs`` epochs (1 at once when there is no warm-up)."""
    if warmup_epochs <= 0:
        return 1.0
    return float(min(1.0, max(0.0, progress / warmup_epochs)))
