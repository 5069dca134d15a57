"""Checks of a configuration's names against the registries (variants, datasets, timm).

:meth:`carrot.config.RunConfig.validate` checks types and ranges without importing anything
heavy; these checks need the registries, so they run once a command has parsed its input and
before any run exists.
"""
from __future__ import annotations

import difflib

from carrot.config import ConfigError, RunConfig


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_names(cfg: RunConfig) -> None:
    """The variant, its hyperparameters, the dataset and the backbone exist; else one line."""
    from carrot.data import list_datasets
    from carrot.variants import get_variant_class, list_variants

    if cfg.variant.name not in list_variants():
        raise ConfigError(f"unknown variant {cfg.variant.name!r}{did_you_mean(cfg.variant.name, list_variants())}; "
                          f"valid: {', '.join(list_variants())} (or all, for a study)")
    if cfg.data.name not in list_datasets():
        raise ConfigError(f"unknown dataset {cfg.data.name!r}{did_you_mean(cfg.data.name, list_datasets())}; "
                          f"valid: {', '.join(list_datasets())}")
    try:  # hyperparameters are validated by the variant itself
        get_variant_class(cfg.variant.name)(**cfg.variant.hparams)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"variant {cfg.variant.name!r}: {exc}") from None
    import timm

    if not timm.is_model(cfg.model.backbone):
        close = timm.list_models(f"*{cfg.model.backbone.split('_')[0]}*")[:8]
        raise ConfigError(
            f"unknown backbone {cfg.model.backbone!r}; expected a timm model name"
            + (f" (similar: {', '.join(close)})" if close else " (see timm.list_models())")
        )
