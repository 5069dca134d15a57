"""Variant registry: ``create_variant(name, **hparams)`` and ``list_variants()``.

Every module in this package is imported on first use, so a new variant is one new file
whose class carries ``@register_variant``.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from carrot.variants.base import StepBatch, Variant, VariantOutput

_REGISTRY: dict[str, type[Variant]] = {}
_LOADED = False


def register_variant(cls: type[Variant]) -> type[Variant]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"variant {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    _LOADED = True


def list_variants() -> list[str]:
    """Registered variant names, ``baseline`` first."""
    _load_all()
    return sorted(_REGISTRY, key=lambda n: (n != "baseline", n))


def get_variant_class(name: str) -> type[Variant]:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown variant {name!r}; valid: {', '.join(list_variants())}")
    return _REGISTRY[name]


def create_variant(name: str, **hparams: Any) -> Variant:
    return get_variant_class(name)(**hparams)


__all__ = [
    "StepBatch", "Variant", "VariantOutput", "create_variant", "get_variant_class",
    "list_variants", "register_variant",
]
