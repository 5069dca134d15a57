"""The variant interface: one training step in, named loss terms and statistics out.

A variant is an ``nn.Module``. ``forward`` does what every variant shares (the
cross-entropy on the logits, dtype checks) and calls ``compute``, where the variant's own
maths lives. Each variant also declares

- ``Hparams``: a dataclass whose defaults are the design note's recommended setting;
- ``search_space``: name -> ``carrot.space`` distribution, searched by the study;
- ``statistics``: the names of the statistics ``compute`` returns (logged as ``var/<name>``);
- ``default_sampler``: ``"pk"`` for variants that estimate per-class statistics in a batch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carrot.geometry import l2_normalize
from carrot.space import Categorical, Distribution

SAMPLERS = ("pk", "random")


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
        return torch.stack([t.float() for t in self.terms.values()]).sum()


@dataclass
class BaseHparams:
    """Hyperparameters every variant has."""

    sampler: str = "random"  # "pk": P classes x m samples per batch; "random": shuffled
    m_per_class: int = 4  # samples per class in a pk batch

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.m_per_class < 2:
            raise ValueError(f"m_per_class must be >= 2, got {self.m_per_class}")


class Variant(nn.Module):
    name: ClassVar[str] = ""
    Hparams: ClassVar[type[BaseHparams]] = BaseHparams
    search_space: ClassVar[dict[str, Distribution]] = {}
    statistics: ClassVar[tuple[str, ...]] = ()
    # statistics a batch may leave undefined (NaN): the trainer averages them as missing
    maybe_undefined: ClassVar[tuple[str, ...]] = ()
    default_sampler: ClassVar[str] = "random"
    uses_features: ClassVar[bool] = False  # needs intermediate layers in StepBatch.features

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        hparams.setdefault("sampler", self.default_sampler)
        known = {f.name for f in dataclasses.fields(self.Hparams)}
        unknown = sorted(set(hparams) - known)
        if unknown:
            raise ValueError(
                f"unknown hyperparameter(s) {unknown} for variant {self.name!r}; valid: {sorted(known)}"
            )
        self.hp = self.Hparams(**hparams)

    @classmethod
    def recommended(cls) -> dict[str, Any]:
        """The design note's recommended setting (trial 0 of every study)."""
        hp = dataclasses.asdict(cls.Hparams())
        hp["sampler"] = cls.default_sampler
        return hp

    @classmethod
    def full_search_space(cls) -> dict[str, Distribution]:
        space = dict(cls.search_space)
        space.setdefault("sampler", Categorical(list(SAMPLERS)))
        if "m_per_class" not in space and "sampler" in space:
            space["m_per_class"] = Categorical([2, 4, 8])  # divisors of the usual batch sizes
        return space

    def build_neck(self, dim: int) -> nn.Module:
        """Module between the pooled embedding and the head (identity unless overridden)."""
        return nn.Identity()

    def forward(self, batch: StepBatch) -> VariantOutput:
        if batch.embedding.ndim != 2 or batch.logits.ndim != 2 or batch.labels.ndim != 1:
            raise ValueError(
                "expected embedding (B, D), logits (B, K), labels (B,); got "
                f"{tuple(batch.embedding.shape)}, {tuple(batch.logits.shape)}, {tuple(batch.labels.shape)}"
            )
        ce = F.cross_entropy(batch.logits.float(), batch.labels, label_smoothing=batch.label_smoothing)
        terms, stats = self.compute(batch, ce)
        stats = {k: v.detach().float() for k, v in stats.items()}
        return VariantOutput({"ce": ce, **terms}, stats)

    def compute(self, batch: StepBatch, ce: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The variant's own terms (besides ``ce``) and statistics."""
        return {}, {}


class L2Normalize(nn.Module):
    """Neck ``h = z / max(||z||, 1e-12)`` along the last dim (:func:`carrot.geometry.l2_normalize`),
    in float32, returned in the input dtype."""

    def forward(self, z: Tensor) -> Tensor:
        return l2_normalize(z.float()).to(z.dtype)


def linear_ramp(progress: float, warmup_epochs: float) -> float:
    """0 -> 1 linearly over ``warmup_epochs`` epochs (1 at once when there is no warm-up)."""
    if warmup_epochs <= 0:
        return 1.0
    return float(min(1.0, max(0.0, progress / warmup_epochs)))
