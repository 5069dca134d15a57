"""The sanity-check plots of the paper from finished runs: PNG (300 dpi), PDF and SVG under ``<out>/plots/``.

    python -m analysis.plots [--experiment carrot] [--out analysis/output] [--dataset d] [--backbone b]

One folder per dataset and backbone, ``<out>/plots/<dataset>-<backbone>/``, holding each figure
three times under one stem, ``<stem>.png``, ``<stem>.pdf`` and ``<stem>.svg`` (no creation date
or software version inside, so a rebuild from the same runs writes the same files):

- ``confusion_concentration``: share of each confusion row's off-diagonal mass in its top 1, 3,
  5 classes (last epoch, mean over runs), per variant;
- ``proto_cos_ref``: prototype cosine of the reference pairs over training;
- ``pair_error_vs_baseline``: error on each reference pair (the top pairs of the baseline's
  pooled confusion, the pairs of the paper tables), one labelled row per pair (``cat↔dog``
  with the dataset's class names), each variant's marker beside the baseline's;
- ``db_per_layer``: Bhattacharyya distance D_B = -log rho of the reference pairs over training,
  one panel per layer (rho itself underflows to 0 on wide layers);
- ``probe_per_layer``: linear-probe accuracy per layer, variants beside the baseline, from 0 %;
- ``variant_stats_<variant>``: every ``var/<statistic>`` the variant's runs logged over
  training, one panel each.

The plots draw the final runs (split=test) when a dataset has any, else the finished study
trials (split=val); every title says which. A plot whose data is absent is skipped with a
printed note.

Every value axis starts at 0, or, where 0 would squeeze the data into less than a quarter of
the panel, carries a break mark (two short slashes) at the end away from 0; a log axis says so
in its label. Legends sit outside the axes, and titles are wrapped to the figure's width.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import textwrap
from functools import partial
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402
from matplotlib.text import Text  # noqa: E402
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
    metric_layers,
    metric_values,
    natural_key,
    open_store,
    order_variants,
    plot_source,
    reference_set,
)
from carrot import contract  # noqa: E402

# The order of each variant's statistic panels (``var/<name>``, contract.VARIANT_STAT_PREFIX; a
# trailing * stands for one statistic per probed layer). A statistic the runs logged and this
# table does not list is drawn after these; a listed one that no run logged is left out.
VARIANT_STATS: dict[str, tuple[str, ...]] = {
    "expansion": ("gamma_mean", "gamma_max", "frac_expanded", "radius_mean", "margin_mean", "classes_used"),
    "nuisance": ("alpha_mean", "label_safety", "frac_augmented", "subspace_rank"),
    "barrier": ("r_var", "r_rank", "min_r", "min_erank_ratio", "classes_used"),
    # D_B per layer first: rho underflows to 0 on wide layers
    "bhattacharyya": ("db_*", "rho_*", "l_bhat", "log_l_bhat", "scale", "classes_used", "pairs_used",
                      "layers_used"),
    "pairwise_confusion": ("pc_distance", "pairs", "lambda"),
    "prototype": ("l_carrot", "lambda", "pairs", "omega_mean", "d2_mean"),
}
# What a statistic measures, as its panel's y label (per batch, mean over the epoch's batches).
STAT_LABELS: dict[str, str] = {
    "gamma_mean": "mean expansion factor γ",
    "gamma_max": "largest γ in a batch",
    "frac_expanded": "share of classes with γ > 1",
    "radius_mean": "mean class RMS radius",
    "margin_mean": "mean distance to the nearest centroid",
    "classes_used": "classes used per batch",
    "alpha_mean": "mean nuisance variance α",
    "label_safety": "share of augmented rows keeping their label",
    "frac_augmented": "share of samples with α > 0",
    "subspace_rank": "mean nuisance-subspace rank",
    "r_var": "R_var",
    "r_rank": "R_rank",
    "min_r": "smallest per-class ratio r",
    "min_erank_ratio": "smallest effective rank / D",
    "l_bhat": "L_bhat",
    "log_l_bhat": "log L_bhat",
    "scale": "scale s of L_bhat",
    "pairs_used": "pairs used per batch",
    "layers_used": "layers used per batch",
    "db_*": "D_B = -log rho",
    "rho_*": "rho = exp(-D_B)",
}
CONCENTRATION_K = (1, 3, 5)
DPI = 300
FORMATS = ("png", "pdf", "svg")
# No creation date, software version or random ids in the files: the same runs, the same bytes.
SAVE_METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
    "svg": {"Creator": None, "Date": None},
}
STYLE = {
    "font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "figure.titlesize": 9, "axes.spines.top": False, "axes.spines.right": False,
    "pdf.fonttype": 42,  # TrueType in the PDF (publishers reject Type 3 fonts)
    "svg.hashsalt": "carrot",  # fixed SVG element ids
}
FULL_WIDTH = 7.0  # inches: a two-column paper's text width
PANEL_HEIGHT = 2.0
ZERO_SHARE = 0.25  # an axis starts at 0 unless the data would fill less than this share of it
BREAK_GID = "axis-break"  # the gid of the slashes marking a value axis that does not reach 0
PAIR_SEP = "↔"


class Skip(Exception):
    """A plot's data is absent; the message says what is missing."""


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
        # the baseline in dark grey, dashed and on top; the others in tab10 colours, each with its
        # own marker, so lines that coincide stay told apart
        others = [v for v in variants if v != "baseline"]
        self.colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(others)}
        self.markers = {v: "s^DvP*Xph<"[i % 10] for i, v in enumerate(others)}
        self.colors["baseline"], self.markers["baseline"] = "0.25", "o"
        self.out = out / f"{dataset}-{backbone}"

    def of(self, variant: str) -> pd.DataFrame:
        return self.runs[self.runs["variant"] == variant]

    @property
    def where(self) -> str:
        return f"{self.dataset} / {self.backbone} ({self.source})"

    def label(self, variant: str, n: int | None = None) -> str:
        n = len(self.of(variant)) if n is None else n
        return f"{variant} (n={n})"

    def save(self, fig: Figure, stem: str) -> Path:
        """``<stem>.png`` (300 dpi), ``.pdf`` and ``.svg``; closes the figure, returns the PNG."""
        self.out.mkdir(parents=True, exist_ok=True)
        with plt.rc_context(STYLE):
            for fmt in FORMATS:
                fig.savefig(self.out / f"{stem}.{fmt}", format=fmt, dpi=DPI, metadata=SAVE_METADATA[fmt])
        plt.close(fig)
        return self.out / f"{stem}.png"


# ----------------------------------------------------------------------------- layout helpers
def drawn_texts(fig: Figure) -> list[tuple[Text, Bbox]]:
    """Every non-empty text ``fig`` draws (titles, labels, tick labels in view, legend entries,
    notes) with its extent in display pixels."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    undrawn = set()  # the labels of ticks outside an axis's view, which are never drawn
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            slack = 1e-9 * (hi - lo)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not lo - slack <= tick.get_loc() <= hi + slack:
                    undrawn |= {id(tick.label1), id(tick.label2)}
    out = []
    for text in fig.findobj(Text):
        if id(text) in undrawn or not text.get_visible() or not text.get_text().strip():
            continue
        if text.axes is not None and not text.axes.get_visible():
            continue
        out.append((text, text.get_window_extent(renderer)))
    return out


def texts_outside(fig: Figure) -> list[str]:
    """The texts of ``fig`` that reach past its edge once drawn (empty when all fit)."""
    box = fig.bbox
    return [text.get_text() for text, ext in drawn_texts(fig)
            if ext.x0 < box.x0 - 1 or ext.y0 < box.y0 - 1 or ext.x1 > box.x1 + 1 or ext.y1 > box.y1 + 1]


def texts_overlapping(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of drawn texts of ``fig`` whose extents overlap (empty when none collide)."""
    texts = drawn_texts(fig)
    return [(a.get_text(), b.get_text()) for k, (a, box_a) in enumerate(texts) for b, box_b in texts[k + 1:]
            if box_a.overlaps(box_b)]


def _new_figure(width: float, height: float, rows: int = 1, cols: int = 1, count: int | None = None):
    """A constrained-layout figure with ``count`` visible axes on a rows x cols grid."""
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False, layout="constrained")
    count = rows * cols if count is None else count
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _grid(count: int):
    """Panels in a grid that grows with their number: up to 3 columns (4 past 9 panels)."""
    cols = min(count, 3 if count <= 9 else 4)
    rows = math.ceil(count / cols)
    return _new_figure(FULL_WIDTH, 0.6 + PANEL_HEIGHT * rows, rows, cols, count)


def _wrap(fig: Figure, text: str, size: float) -> str:
    """``text`` wrapped to the figure's width at ``size`` points (each line on its own)."""
    width = max(24, int(fig.get_figwidth() * 72 / (0.55 * size)) - 2)
    return "\n".join(line for part in text.split("\n") for line in textwrap.wrap(part, width) or [""])


def _title(fig: Figure, g: Group, what: str) -> None:
    size = plt.rcParams["figure.titlesize"]
    fig.suptitle(_wrap(fig, f"{what}\n{g.where}", size), fontsize=size)


def _legend_outside(fig: Figure, axes) -> None:
    """One legend for the figure, below every axes (never over the data)."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if not handles:
        return
    size = plt.rcParams["legend.fontsize"]
    entry = 0.6 * size * max(len(lab) for lab in labels) + 3 * size  # points: text, handle and gap
    cols = max(1, min(len(labels), int(fig.get_figwidth() * 72 // entry)))
    rows = math.ceil(len(labels) / cols)
    # a legend fills its columns first: reorder so that it reads left to right, row by row
    order = [r * cols + c for c in range(cols) for r in range(rows) if r * cols + c < len(labels)]
    fig.legend([handles[k] for k in order], [labels[k] for k in order], loc="outside lower center", ncols=cols,
               frameon=False)


def _history_lines(ax, g: Group, keys: str | tuple[str, ...], variants: list[str] | None = None) -> int:
    """Mean over runs (band, or error bar at a lone epoch: +-1 std) of one metric per variant
    (each run's first logged key of ``keys``); returns the lines drawn."""
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
        style = {"ls": "--", "zorder": 3} if variant == "baseline" else {}
        ax.plot(steps, mean, marker=g.markers[variant], ms=3.5, color=color, label=g.label(variant), **style)
        if (std > 0).any() and len(steps) == 1:
            ax.errorbar(steps, mean, yerr=std, color=color, capsize=2, lw=0.8)
        elif (std > 0).any():
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        drawn += 1
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return drawn


def _same_epochs(axes) -> None:
    """One epoch range on every panel (a panel with a lone finite epoch included), at least one
    epoch wide so the ticks stay whole epochs."""
    spans = [(ax.dataLim.x0, ax.dataLim.x1) for ax in axes if ax.has_data()]
    if not spans:
        return
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    pad = max(0.5, 0.05 * (hi - lo)) if hi - lo < 1 else 0.05 * (hi - lo)
    for ax in axes:
        ax.set_xlim(lo - pad, hi + pad)


def _ylabel(ax, text: str, width: int = 30) -> None:
    """A y label wrapped to about a panel's height."""
    ax.set_ylabel("\n".join(textwrap.wrap(text, width)))


def _log_if_wide(ax) -> int:
    """Log scale when a panel's values are all positive and span more than three decades (D_B of
    shallow and wide layers together, rho); the y label then says so. A ±std band reaching 0
    would run to the axis floor there: it is left out. Returns the bands left out."""
    lines = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    values = np.concatenate(lines) if lines else np.zeros(0)
    values = values[np.isfinite(values)]
    if not (len(values) and (values > 0).all() and values.max() / values.min() > 1e3):
        return 0
    ax.set_yscale("log")
    _ylabel(ax, f"{ax.get_ylabel()} (log scale)".replace("\n", " ").strip())
    floored = [band for band in ax.collections
               if band.get_paths() and (band.get_paths()[0].vertices[:, 1] <= 0).any()]
    for band in floored:
        band.remove()
    return len(floored)


LOG_BAND_NOTE = "; on a log axis a ±std band reaching 0 is left out"


def _mark_break(ax, at: str) -> None:
    """Two short slashes across the y axis at its ``bottom`` or ``top``: the axis does not reach 0."""
    y = 0.0 if at == "bottom" else 1.0
    d = 0.018
    for dy in (-d, d):
        ax.plot((-d, d), (y + dy - d, y + dy + d), transform=ax.transAxes, color="k", lw=0.9,
                clip_on=False, gid=BREAK_GID)


def _zero_or_break(ax) -> None:
    """Extend a linear value axis to 0 when the data keep at least ZERO_SHARE of it; else mark
    the end away from 0 with a break."""
    if ax.get_yscale() != "linear" or not ax.has_data():
        return
    lo, hi = ax.get_ylim()
    if lo <= 0 <= hi:
        return
    d_lo, d_hi = ax.dataLim.y0, ax.dataLim.y1
    if d_hi == d_lo:  # a constant: nothing to squeeze
        ax.set_ylim(*((0, 1.1 * hi) if lo > 0 else (1.1 * lo, 0)))
    elif lo > 0:
        if d_hi - d_lo >= ZERO_SHARE * hi:
            ax.set_ylim(0, hi)
        else:
            _mark_break(ax, "bottom")
    else:
        if d_hi - d_lo >= ZERO_SHARE * -lo:
            ax.set_ylim(lo, 0)
        else:
            _mark_break(ax, "top")


def _grouped_bars(ax, g: Group, bars: dict[str, tuple[np.ndarray, np.ndarray | None, int]],
                  ticks: list[str]) -> None:
    """One bar per variant beside each tick; ``bars``: variant -> (heights, error bars or None, runs)."""
    width = 0.8 / len(bars)
    x = np.arange(len(ticks))
    for i, (variant, (heights, err, n)) in enumerate(bars.items()):
        errors = {} if err is None else {"yerr": err, "capsize": 2, "error_kw": {"lw": 0.8}}
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, heights, width, color=g.colors[variant],
               label=g.label(variant, n), **errors)
    ax.set_xticks(x, ticks)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _last_confusions(g: Group, runs: pd.DataFrame) -> list[np.ndarray]:
    cms = (g.artifacts.confusion(run_id) for run_id in runs["run_id"])
    return [cm for cm in cms if cm is not None]


# ----------------------------------------------------------------------------- (a)
def draw_confusion_concentration(g: Group) -> Figure:
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
    fig, (ax,) = _new_figure(min(FULL_WIDTH, 3.0 + 0.35 * len(CONCENTRATION_K) * len(shares)), 3.4)
    _grouped_bars(ax, g, {v: (values, None, n) for v, (values, n) in shares.items()},
                  [f"top {k}" for k in CONCENTRATION_K])
    ax.set_ylim(0, 1.04)  # a bar at 1 stays below the frame's top
    ax.set_ylabel("share of a row's off-diagonal errors")
    ax.set_xlabel("classes a true class is most confused with")
    _legend_outside(fig, [ax])
    _title(fig, g, "Confusion concentration (last epoch, mean over rows and runs)")
    return fig


# ----------------------------------------------------------------------------- (b)
def draw_proto_cos(g: Group) -> Figure:
    fig, (ax,) = _new_figure(5.0, 3.4)
    if not _history_lines(ax, g, contract.PROTO_COS_REF):
        plt.close(fig)
        raise Skip(f"no run logged {contract.PROTO_COS_REF}")
    ax.set_ylabel("mean cosine of reference-pair prototypes")
    _same_epochs([ax])
    _zero_or_break(ax)
    _legend_outside(fig, [ax])
    _title(fig, g, "Prototype cosine of the reference (confusable) pairs over training, mean ± std over runs")
    return fig


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


def pair_label(names: Callable[[int], str], i: int, j: int) -> str:
    """``cat↔dog``: a pair by its class names."""
    return f"{names(int(i))}{PAIR_SEP}{names(int(j))}"


def draw_pair_error(g: Group) -> Figure:
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
    n_pairs = len(pairs)
    series = ["baseline"] + others
    # each variant on its own line within a pair's row, so equal errors never hide a marker
    spread = min(0.3, 0.14 * (len(series) - 1))
    offsets = np.linspace(-spread, spread, len(series))
    rows = np.arange(n_pairs)
    fig, (ax,) = _new_figure(5.5, 1.6 + 0.26 * n_pairs * max(1.0, len(series) / 3))
    base, n_base = errors["baseline"]
    for k, variant in enumerate(series):
        y = rows + offsets[k]
        err, n = errors[variant]
        if variant == "baseline":
            ax.scatter(err, y, s=24, marker="o", facecolors="white", edgecolors="black", linewidths=1.0,
                       zorder=3, clip_on=False, label=g.label(variant, n))
            continue
        ax.hlines(y, base, err, colors=[g.colors[variant]], lw=0.8, alpha=0.6, zorder=2)
        ax.scatter(err, y, s=22, marker=g.markers[variant], color=g.colors[variant], zorder=3,
                   clip_on=False, label=g.label(variant, n))
    labels = [pair_label(reference.name, i, j) for i, j in pairs]
    ax.set_yticks(rows, labels)
    ax.set_ylim(n_pairs - 0.5, -0.5)  # most confusable pair on top
    top = np.nanmax([np.nanmax(errors[v][0]) for v in series])
    ax.set_xlim(0, 1.08 * top if np.isfinite(top) and top > 0 else 1.0)
    ax.set_xlabel("pair error (C_ij + C_ji) / (n_i + n_j), last epoch, mean over runs")
    ax.set_ylabel("reference pair (most confused by the baseline on top)")
    ax.set_yticks(np.arange(n_pairs - 1) + 0.5, minor=True)  # a rule between two pairs' rows
    ax.tick_params(axis="y", which="minor", length=0)
    ax.grid(axis="x", alpha=0.3)
    ax.grid(axis="y", which="minor", alpha=0.3)
    ax.set_axisbelow(True)
    _legend_outside(fig, [ax])
    _title(fig, g, f"Error on each of the {n_pairs} reference pairs (the baseline's most confused), "
                   "each variant against the baseline (○): left of ○ is better")
    return fig


# ----------------------------------------------------------------------------- (d)
def draw_db(g: Group) -> Figure:
    layers = db_layers(g.runs)
    if not layers:
        raise Skip(f"no run logged {contract.db_metric('<layer>', 'ref')} "
                   f"(or {contract.legacy_db_metric('<layer>', 'ref')})")
    fig, axes = _grid(len(layers))
    dropped = 0
    for ax, layer in zip(axes, layers):
        _history_lines(ax, g, db_keys(layer))
        ax.set_title(layer)
        ax.set_ylabel("D_B = -log rho")
        dropped += _log_if_wide(ax)
        _zero_or_break(ax)
    _same_epochs(axes)
    _legend_outside(fig, axes)
    _title(fig, g, "Bhattacharyya distance D_B of the reference pairs over training, per layer "
                   f"(higher: less overlap; mean ± std over runs{LOG_BAND_NOTE if dropped else ''})")
    return fig


# ----------------------------------------------------------------------------- (e)
def draw_probe(g: Group) -> Figure:
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
    fig, (ax,) = _new_figure(min(FULL_WIDTH, 3.0 + 0.3 * len(layers) * len(bars)), 3.4)
    _grouped_bars(ax, g, {v: (100 * mean, 100 * std, n) for v, (mean, std, n) in bars.items()}, layers)
    ax.set_ylim(0, 100)
    ax.set_xlabel("probed layer (shallow to deep)")
    ax.set_ylabel("linear-probe accuracy (%)")
    _legend_outside(fig, [ax])
    _title(fig, g, "Linear-probe accuracy per layer (last epoch, mean ± std over runs)")
    return fig


# ----------------------------------------------------------------------------- (f)
def _stat_pattern(stat: str) -> str:
    return re.escape(stat[:-1]) + ".+" if stat.endswith("*") else re.escape(stat)


def order_stat_keys(keys: list[str] | set[str], variant: str) -> list[str]:
    """``var/`` metric keys in panel order: first those of VARIANT_STATS in its order (one per
    layer, in network order, for a trailing *), then every other one in natural order."""
    prefix = contract.VARIANT_STAT_PREFIX
    logged = sorted(k for k in keys if k.startswith(prefix) and len(k) > len(prefix))
    ordered: list[str] = []
    for stat in VARIANT_STATS.get(variant, ()):
        rx = re.compile(re.escape(prefix) + _stat_pattern(stat))
        found = [k for k in logged if rx.fullmatch(k) and k not in ordered]
        ordered += sorted(found, key=lambda k: layer_sort_key(k[len(prefix) + len(stat.rstrip("*")):]))
    return ordered + sorted((k for k in logged if k not in ordered), key=natural_key)


def logged_stat_keys(client, run_ids) -> set[str]:
    """The ``var/`` metric keys any of the runs logged (NaN values included)."""
    keys: set[str] = set()
    for run_id in run_ids:
        keys |= {k for k in client.get_run(run_id).data.metrics if k.startswith(contract.VARIANT_STAT_PREFIX)}
    return keys


def stat_label(stat: str) -> str:
    """A statistic's y label: what it measures where known, else its name."""
    for pattern, label in STAT_LABELS.items():
        if re.fullmatch(_stat_pattern(pattern), stat):
            return label
    return stat


def draw_variant_stats(g: Group, variant: str) -> Figure:
    runs = g.of(variant)
    keys = order_stat_keys(logged_stat_keys(g.client, runs["run_id"]), variant)
    if not keys:
        raise Skip(f"{variant} logged no {contract.VARIANT_STAT_PREFIX} statistics")
    fig, axes = _grid(len(keys))
    dropped = 0
    for ax, key in zip(axes, keys):
        stat = key[len(contract.VARIANT_STAT_PREFIX):]
        ax.set_title(stat)
        if not _history_lines(ax, g, key, [variant]):
            ax.text(0.5, 0.5, "no finite value logged", ha="center", va="center", transform=ax.transAxes,
                    color="0.4")
            ax.set_yticks([])
            continue
        _ylabel(ax, stat_label(stat))
        dropped += _log_if_wide(ax)
        _zero_or_break(ax)
    _same_epochs(axes)
    n = len(runs)
    spread = f"mean ± std over {n} runs{LOG_BAND_NOTE if dropped else ''}" if n > 1 else "1 run"
    _title(fig, g, f"{variant}: its {len(keys)} statistics over training ({spread})")
    return fig


# ----------------------------------------------------------------------------- command line
# (words for the log, file stem, figure): the plots of every dataset and backbone
PLOTS: tuple[tuple[str, str, Callable[[Group], Figure]], ...] = (
    ("confusion concentration", "confusion_concentration", draw_confusion_concentration),
    ("prototype cosine", "proto_cos_ref", draw_proto_cos),
    ("pair error vs baseline", "pair_error_vs_baseline", draw_pair_error),
    ("D_B per layer", "db_per_layer", draw_db),
    ("probe per layer", "probe_per_layer", draw_probe),
)


def jobs(g: Group) -> list[tuple[str, str, Callable[[Group], Figure]]]:
    """The plots of one group: PLOTS, then each variant's statistics."""
    return list(PLOTS) + [(f"{v} statistics", f"variant_stats_{v}", partial(draw_variant_stats, variant=v))
                          for v in order_variants(g.variants)]


def draw(g: Group, stem: str) -> Figure:
    """The figure saved as ``<stem>.*`` for one group, in the plots' style (raises Skip)."""
    job = next((job for _, s, job in jobs(g) if s == stem), None)
    if job is None:
        raise ValueError(f"no plot {stem!r}; one of {[s for _, s, _ in jobs(g)]}")
    with plt.rc_context(STYLE):
        return job(g)


def groups(client, runs: pd.DataFrame, out: Path, artifacts: Artifacts | None = None) -> list[Group]:
    """One Group per dataset and backbone of ``runs``; figures go under ``out``."""
    variants = known_variants(runs)
    artifacts = artifacts or Artifacts(client)
    return [Group(client, runs, dataset, backbone, variants, out, artifacts)
            for dataset, backbone in dataset_groups(runs)]


def make_plots(client, runs: pd.DataFrame, out: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Every plot of every dataset and backbone; returns the PNGs written (a PDF and an SVG
    lie beside each)."""
    written: list[Path] = []
    for g in groups(client, runs, out / "plots"):
        if not len(g.runs):
            log(f"{g.dataset}/{g.backbone}: no finished runs (test or val); no plots")
            continue
        for name, stem, _ in jobs(g):
            try:
                fig = draw(g, stem)
            except Skip as why:
                log(f"{g.dataset}/{g.backbone}: skipped {name}: {why}")
                plt.close("all")
                continue
            path = g.save(fig, stem)
            written.append(path)
            log(f"{g.dataset}/{g.backbone}: {name} -> {path} (+ .pdf, .svg)")
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `carrot plots -- --flag ...` passes the separator through
        argv = argv[1:]
    parser = contract.ArgumentParser(
        prog="carrot plots", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The sanity-check plots of the paper from finished runs (the final runs on the test\n"
                    "split, else the study trials on val), each as <name>.png at 300 dpi, <name>.pdf and\n"
                    "<name>.svg.",
        epilog="Written under <out>/plots/<dataset>-<backbone>/: confusion_concentration, proto_cos_ref,\n"
               "pair_error_vs_baseline (each reference pair labelled with its class names), db_per_layer\n"
               "(D_B = -log rho per probed layer), probe_per_layer, and variant_stats_<variant> (every\n"
               "var/<statistic> a variant logged, one panel each). A plot whose data is absent is skipped\n"
               "with a note.")
    add_store_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import logging

    args = parse_args(argv)
    # matplotlib logs "findfont: Font family [...] not found. Falling back to DejaVu Sans." each
    # time a text asks for a family this machine lacks: dozens of lines, the same figures
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    client, runs = open_store(args, "carrot plots")
    if client is None:
        return 2
    if not len(runs):
        print(f"carrot plots: no runs in experiment {args.experiment!r}"
              + (" matching the filters" if args.dataset or args.backbone else "") + "; no plots")
        return 0
    written = make_plots(client, runs, args.out)
    print(f"{len(written)} plot(s) under {args.out / 'plots'} (PNG, PDF and SVG each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
