"""Checks of a configuration's names against the registries (variants, datasets, timm).

:meth:`carrot.config.RunConfig.validate` checks types and ranges without importing anything
heavy; these checks need the registries, so they run once a command has parsed its input and
before any run exists.
"""
from __future__ import annotations

import difflib
import math

from carrot.config import ConfigError, RunConfig


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.4)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _registered_in_sources(package: str, pattern: str) -> list[str]:
    """Names registered in the source files of ``package`` (``carrot.variants`` or
    ``carrot.data``), read as text: no module is imported."""
    import re
    from pathlib import Path

    folder = Path(__file__).resolve().parent / package.split(".")[-1]
    names = set()
    for path in folder.glob("*.py"):
        if path.name == "__init__.py":  # the registry itself (its docstring shows the syntax)
            continue
        names.update(re.findall(pattern, path.read_text(encoding="utf-8")))
    return sorted(names)


def variant_names() -> list[str]:
    """The registered variant names, ``baseline`` first. Without importing the variants
    (and torch) unless they are loaded already, e.g. with a variant registered at run time."""
    import sys

    if "carrot.variants" in sys.modules:
        return sys.modules["carrot.variants"].list_variants()
    found = _registered_in_sources("carrot.variants",
                                   r'@register_variant\s*\nclass \w+[^\n]*:\n(?:[^\n]*\n)*?\s+name = "(\w+)"')
    return sorted(found, key=lambda n: (n != "baseline", n))


def dataset_names() -> list[str]:
    """The registered dataset names (read from the sources unless the registry is loaded)."""
    import sys

    if "carrot.data" in sys.modules:
        return sys.modules["carrot.data"].list_datasets()
    return _registered_in_sources("carrot.data", r'@register_dataset\("(\w+)"\)')


def check_names_fast(cfg: RunConfig) -> None:
    """The variant and the dataset exist; else one line. Imports nothing heavy, so a typo is
    reported at once."""
    variants, datasets = variant_names(), dataset_names()
    if cfg.variant.name not in variants:
        raise ConfigError(f"unknown variant {cfg.variant.name!r}{did_you_mean(cfg.variant.name, variants)}; "
                          f"valid: {', '.join(variants)} (or all, for a study)")
    if cfg.data.name not in datasets:
        raise ConfigError(f"unknown dataset {cfg.data.name!r}{did_you_mean(cfg.data.name, datasets)}; "
                          f"valid: {', '.join(datasets)}")


def check_names(cfg: RunConfig) -> None:
    """The variant, its hyperparameters, the dataset and the backbone exist; else one line."""
    from carrot.data import list_datasets
    from carrot.variants import get_variant_class, list_variants

    if cfg.variant.name not in list_variants() or cfg.data.name not in list_datasets():
        check_names_fast(cfg)
    for key, value in cfg.variant.hparams.items():  # from a config file: .inf and .nan read as floats
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"invalid variant.hparams.{key}={value!r}: expected a finite number")
    try:  # hyperparameters are validated by the variant itself
        get_variant_class(cfg.variant.name)(**cfg.variant.hparams)
    except (TypeError, ValueError) as exc:
        text, named = str(exc), f"variant {cfg.variant.name!r}"
        raise ConfigError(text if named in text else f"{named}: {text}") from None  # named once
    check_backbone(cfg)


def check_backbone(cfg: RunConfig) -> None:
    """The backbone is a timm model; else one line, with the names closest to it."""
    import timm

    if not timm.is_model(cfg.model.backbone):
        close = timm.list_models(f"*{cfg.model.backbone.split('_')[0]}*")[:8]
        raise ConfigError(
            f"unknown backbone {cfg.model.backbone!r}{did_you_mean(cfg.model.backbone, timm.list_models())}; "
            "expected a timm model name"
            + (f" (similar: {', '.join(close)})" if close else " (see timm.list_models())")
        )
