"""``baseline``: cross-entropy only, the control row of every table."""
from __future__ import annotations

from carrot.variants import register_variant
from carrot.variants.base import Variant


@register_variant
class Baseline(Variant):
    name = "baseline"
