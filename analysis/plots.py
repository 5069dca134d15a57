"""The sanity-check plots of SPEC.md from finished runs, as PNGs under ``<out>/plots/``.

    python -m analysis.plots [--experiment carrot] [--out analysis/output] [--dataset d] [--backbone b]

One folder per dataset and backbone, ``<out>/plots/<dataset>-<backbone>/``, holding:

- ``confusion_concentration.png``: share of each confusion row's off-diagonal mass in its
  top 1, 3, 5 classes (last epoch, mean over runs), per variant;
- ``proto_cos_ref.png``: prototype cosine of the reference pairs over training;
- ``pair_error_vs_baseline.png``: error on each reference pair, variant against baseline (the
  reference pairs of the paper tables: the top pairs of the baseline's pooled confusion);
- ``db_per_layer.png``: Bhattacharyya distance D_B = -log rho of the reference pairs over
  training, one panel per layer (rho itself underflows to 0 on wide layers);
- ``probe_per_layer.png``: linear-probe accuracy per layer, variants beside the baseline;
- ``variant_stats_<variant>.png``: each variant's own statistics over training.

The plots draw the final runs (split=test) when a dataset has any, else the finished study
trials (split=val); every title says which. A plot whose data is absent is skipped with a
printed note.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.common import (  # noqa: E402
    Artifacts,
    add_store_arguments,
    confusion_concentration,
    dataset_groups,
    db_keys,
    db_layers,
    known_variants,
    layer_sort_key,
    mean_history,
    metric_keys,
    metric_layers,
    metric_values,
    open_store,
    order_variants,
    plot_source,
    reference_set,
)
from carrot import contract  # noqa: E402

# The statistics SPEC names for each variant (``var/<name>``, contract.VARIANT_STAT_PREFIX; a
# trailing * is a prefix).
# A variant without a row gets every ``var/`` statistic its runs logged.
VARIANT_STATS: dict[str, tuple[str, ...]] = {
    "expansion": ("gamma_mean",),
    "nuisance": ("alpha_mean", "label_safety"),
    "barrier": ("r_var", "r_rank"),
    "bhattacharyya": ("db_*",),  # D_B per layer: rho underflows to 0 on wide layers
}
CONCENTRATION_K = (1, 3, 5)
MAX_PANELS_PER_ROW = 4
DPI = 110


class Group:
    """The runs one dataset and backbone's plots draw, and how to say where they come from."""

    def __init__(self, client, runs: pd.DataFrame, dataset: str, backbone: str, variants: list[str],
                 out: Path, artifacts: Artifacts | None = None) -> None:
        self.client = client
        self.artifacts = artifacts or Artifacts(client)
        self.dataset, self.backbone = dataset, backbone
        self.runs, self.split, self.source = plot_source(runs, dataset, backbone)
        present = set(self.runs["variant"]) if len(self.runs) else set()
        self.variants = [v for v in variants if v in present]
        self.colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
        self.out = out / f"{dataset}-{backbone}"

    def of(self, variant: str) -> pd.DataFrame:
        return self.runs[self.runs["variant"] == variant]

    def title(self, what: str) -> str:
        return f"{what}\n{self.dataset} / {self.backbone} ({self.source})"

    def label(self, variant: str, n: int | None = None) -> str:
        n = len(self.of(variant)) if n is None else n
        return f"{variant} (n={n})"

    def save(self, fig, name: str) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / name
        fig.tight_layout()
        fig.savefig(path, dpi=DPI, metadata={"Software": None})
        plt.close(fig)
        return path


class Skip(Exception):
    """A plot's data is absent; the message says what is missing."""


# ----------------------------------------------------------------------------- helpers
def _panels(count: int, width: float = 4.2, height: float = 3.4):
    cols = min(MAX_PANELS_PER_ROW, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _history_lines(ax, g: Group, keys: str | tuple[str, ...], variants: list[str] | None = None) -> int:
    """Mean over runs (band: +-1 std) of one metric per variant (each run's first logged key of
    ``keys``); returns the lines drawn."""
    drawn = 0
    for variant in g.variants if variants is None else variants:
        runs = g.of(variant)
        hist = mean_history(g.client, runs["run_id"], keys)
        hist = hist[np.isfinite(hist["mean"].astype(float))]
        if not len(hist):
            continue
        steps, mean = hist["step"].to_numpy(), hist["mean"].to_numpy(dtype=float)
        std = np.nan_to_num(hist["std"].to_numpy(dtype=float))
        color = g.colors[variant]
        ax.plot(steps, mean, marker="o", ms=3, color=color, label=g.label(variant))
        if (std > 0).any():
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        drawn += 1
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return drawn


def _log_if_wide(ax) -> None:
    """Log scale when a panel's positive values span more than three decades (D_B of shallow and
    wide layers together)."""
    values = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()] or [[]])
    values = values[np.isfinite(values)]
    if len(values) and (values > 0).all() and values.max() / values.min() > 1e3:
        ax.set_yscale("log")


def _grouped_bars(ax, g: Group, bars: dict[str, tuple[np.ndarray, np.ndarray | None, int]],
                  ticks: list[str]) -> None:
    """One bar per variant beside each tick; ``bars``: variant -> (heights, error bars or None, runs)."""
    width = 0.8 / len(bars)
    x = np.arange(len(ticks))
    for i, (variant, (heights, err, n)) in enumerate(bars.items()):
        errors = {} if err is None else {"yerr": err, "capsize": 2}
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, heights, width, color=g.colors[variant],
               label=g.label(variant, n), **errors)
    ax.set_xticks(x, ticks)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def _last_confusions(g: Group, runs: pd.DataFrame) -> list[np.ndarray]:
    cms = (g.artifacts.confusion(run_id) for run_id in runs["run_id"])
    return [cm for cm in cms if cm is not None]


# ----------------------------------------------------------------------------- (a)
def plot_confusion_concentration(g: Group) -> Path:
    shares: dict[str, tuple[np.ndarray, int]] = {}
    for variant in g.variants:
        cms = _last_confusions(g, g.of(variant))
        if not cms:
            continue
        per_run = np.array([[confusion_concentration(cm, CONCENTRATION_K)[k] for k in CONCENTRATION_K]
                            for cm in cms])  # (runs, len(K))
        if np.isfinite(per_run).any():
            with np.errstate(all="ignore"):
                shares[variant] = (np.nanmean(np.where(np.isfinite(per_run), per_run, np.nan), axis=0), len(cms))
    if not shares:
        raise Skip(f"no {contract.CONFUSION_ARTIFACT} artifact with any off-diagonal count")
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(CONCENTRATION_K) * max(1, len(shares)) ** 0.5, 4.2))
    _grouped_bars(ax, g, {v: (values, None, n) for v, (values, n) in shares.items()},
                  [f"top {k}" for k in CONCENTRATION_K])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of a row's off-diagonal errors")
    ax.set_xlabel("classes a true class is most confused with")
    ax.set_title(g.title("Confusion concentration (last epoch, mean over rows and runs)"), fontsize=10)
    return g.save(fig, "confusion_concentration.png")


# ----------------------------------------------------------------------------- (b)
def plot_proto_cos(g: Group) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if not _history_lines(ax, g, contract.PROTO_COS_REF):
        plt.close(fig)
        raise Skip(f"no run logged {contract.PROTO_COS_REF}")
    ax.set_ylabel("mean cosine of reference-pair prototypes")
    ax.legend(fontsize=8)
    ax.set_title(g.title("Prototype cosine of the confusable (reference) pairs"), fontsize=10)
    return g.save(fig, "proto_cos_ref.png")


# ----------------------------------------------------------------------------- (c)
def pair_errors_by_variant(g: Group, pairs: np.ndarray) -> dict[str, tuple[np.ndarray, int]]:
    """Per variant: mean over runs of each pair's last-epoch error, and the number of runs."""
    out = {}
    for variant in g.variants:
        cms = _last_confusions(g, g.of(variant))
        if cms:
            errors = np.array([contract.pair_error(cm, pairs) for cm in cms])  # (runs, P)
            with np.errstate(all="ignore"):
                out[variant] = (np.nanmean(errors, axis=0), len(cms))
    return out


def plot_pair_error(g: Group) -> Path:
    if "baseline" not in g.variants:
        raise Skip("no baseline runs to compare with")
    reference = reference_set(g.artifacts, g.of("baseline"))
    if not len(reference):
        raise Skip(f"no confused pair in the baseline runs' pooled {contract.CONFUSION_ARTIFACT}")
    pairs = reference.pairs
    errors = pair_errors_by_variant(g, pairs)
    if "baseline" not in errors:
        raise Skip(f"no {contract.CONFUSION_ARTIFACT} from the baseline runs")
    others = [v for v in errors if v != "baseline"]
    if not others:
        raise Skip("no variant besides the baseline")
    x, _ = errors["baseline"]
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    top = np.nanmax([np.nanmax(x)] + [np.nanmax(errors[v][0]) for v in others]) if len(pairs) else 1.0
    top = 1.05 * top if np.isfinite(top) and top > 0 else 1.0
    ax.plot([0, top], [0, top], ls="--", color="0.5", lw=1, label="y = x (no change)")
    markers = "os^DvP*X"
    for i, variant in enumerate(others):
        y, n = errors[variant]
        ax.scatter(x, y, s=22, alpha=0.8, color=g.colors[variant], marker=markers[i % len(markers)],
                   label=g.label(variant, n))
    ax.set_xlim(-0.02 * top, top)
    ax.set_ylim(-0.02 * top, top)
    ax.set_aspect("equal")
    ax.set_xlabel(f"baseline error on the pair (n={errors['baseline'][1]} runs)")
    ax.set_ylabel("variant error on the same pair")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(g.title(f"Error on each of the {len(pairs)} reference pairs (top pairs of the baseline's "
                         "pooled confusion): below the line is better"), fontsize=10)
    return g.save(fig, "pair_error_vs_baseline.png")


# ----------------------------------------------------------------------------- (d)
def plot_db(g: Group) -> Path:
    layers = db_layers(g.runs)
    if not layers:
        raise Skip(f"no run logged {contract.db_metric('<layer>', 'ref')} "
                   f"(or {contract.legacy_db_metric('<layer>', 'ref')})")
    fig, axes = _panels(len(layers))
    for ax, layer in zip(axes, layers):
        _history_lines(ax, g, db_keys(layer))
        _log_if_wide(ax)
        ax.set_title(layer, fontsize=9)
        ax.set_ylabel("D_B = -log rho (higher: less overlap)")
    axes[0].legend(fontsize=7)
    fig.suptitle(g.title("Bhattacharyya distance D_B of the reference pairs over training, per layer"), fontsize=10)
    return g.save(fig, "db_per_layer.png")


# ----------------------------------------------------------------------------- (e)
def plot_probe(g: Group) -> Path:
    layers = metric_layers(g.runs, contract.probe_metric)
    if not layers:
        raise Skip(f"no run logged {contract.probe_metric('<layer>')}")
    bars = {}
    for variant in g.variants:
        runs = g.of(variant)
        values = np.array([metric_values(runs, contract.probe_metric(layer)) for layer in layers])  # (L, runs)
        if np.isfinite(values).any():
            with np.errstate(all="ignore"):
                mean = np.nanmean(values, axis=1)
                std = np.nanstd(values, axis=1, ddof=1) if values.shape[1] > 1 else np.zeros(len(layers))
            bars[variant] = (mean, np.nan_to_num(std), runs.shape[0])
    if not bars:
        raise Skip("no probe accuracy in the runs")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(layers) * max(1, len(bars)) ** 0.5 + 2), 4.2))
    _grouped_bars(ax, g, {v: (100 * mean, 100 * std, n) for v, (mean, std, n) in bars.items()}, layers)
    low = min(100 * np.nanmin(m) for m, _, _ in bars.values())
    ax.set_ylim(max(0.0, low - 10), 100.5)
    ax.set_xlabel("probed layer (shallow to deep)")
    ax.set_ylabel("linear-probe accuracy (%)")
    ax.set_title(g.title("Linear-probe accuracy per layer (last epoch, mean ± std over runs)"), fontsize=10)
    return g.save(fig, "probe_per_layer.png")


# ----------------------------------------------------------------------------- (f)
def variant_stat_keys(runs: pd.DataFrame, variant: str) -> list[str]:
    prefix = re.escape(contract.VARIANT_STAT_PREFIX)
    logged = metric_keys(runs, prefix + ".+")
    wanted = VARIANT_STATS.get(variant)
    if wanted is None:
        return logged
    keys = []
    for stat in wanted:
        rx = re.compile(prefix + (re.escape(stat[:-1]) + ".+" if stat.endswith("*") else re.escape(stat)))
        keys += sorted((k for k in logged if rx.fullmatch(k)), key=layer_sort_key)
    return keys


def plot_variant_stats(g: Group, variant: str) -> Path:
    runs = g.of(variant)
    keys = [k for k in variant_stat_keys(runs, variant) if np.isfinite(metric_values(runs, k)).any()]
    if not keys:
        raise Skip(f"{variant} logged no {contract.VARIANT_STAT_PREFIX} statistics")
    fig, axes = _panels(len(keys))
    for ax, key in zip(axes, keys):
        _history_lines(ax, g, key, [variant])
        ax.set_title(key, fontsize=9)
        ax.set_ylabel(key[len(contract.VARIANT_STAT_PREFIX):])
    axes[0].legend(fontsize=7)
    fig.suptitle(g.title(f"{variant}: its own statistics over training (mean ± std over runs)"), fontsize=10)
    return g.save(fig, f"variant_stats_{variant}.png")


# ----------------------------------------------------------------------------- command line
PLOTS: tuple[tuple[str, Callable[[Group], Path]], ...] = (
    ("confusion concentration", plot_confusion_concentration),
    ("prototype cosine", plot_proto_cos),
    ("pair error vs baseline", plot_pair_error),
    ("D_B per layer", plot_db),
    ("probe per layer", plot_probe),
)


def make_plots(client, runs: pd.DataFrame, out: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Every plot of every dataset and backbone; returns the files written."""
    written: list[Path] = []
    variants = known_variants(runs)
    artifacts = Artifacts(client)
    for dataset, backbone in dataset_groups(runs):
        g = Group(client, runs, dataset, backbone, variants, out / "plots", artifacts)
        if not len(g.runs):
            log(f"{dataset}/{backbone}: no finished runs (test or val); no plots")
            continue
        jobs = list(PLOTS) + [(f"{v} statistics", (lambda g, v=v: plot_variant_stats(g, v)))
                              for v in order_variants(g.variants)]
        for name, job in jobs:
            try:
                path = job(g)
            except Skip as why:
                log(f"{dataset}/{backbone}: skipped {name}: {why}")
                plt.close("all")
                continue
            written.append(path)
            log(f"{dataset}/{backbone}: {name} -> {path}")
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `carrot plots -- --flag ...` passes the separator through
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="carrot plots", description=__doc__.splitlines()[0])
    add_store_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client, runs = open_store(args, "carrot plots")
    if client is None:
        return 2
    if not len(runs):
        print(f"carrot plots: no runs in experiment {args.experiment!r}"
              + (" matching the filters" if args.dataset or args.backbone else "") + "; no plots")
        return 0
    written = make_plots(client, runs, args.out)
    print(f"{len(written)} plot(s) under {args.out / 'plots'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
