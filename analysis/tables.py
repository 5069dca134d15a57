"""The paper's tables from finished runs: Markdown, LaTeX (booktabs) and CSV for each.

    python -m analysis.tables [--experiment carrot] [--out analysis/output] [--dataset d]
                              [--backbone b] [--storage studies/optuna.journal] [--seeds n]

Tables (file stem under ``--out``):

- ``main_results``: test top-1 per dataset x variant over seeds (mean +- std, 95% t-interval),
  paired differences to ``baseline`` and ``pairwise_confusion`` (``scipy.stats.ttest_rel`` over
  the seeds both have), mean class accuracy;
- ``significance``: each variant against the baseline on the same test samples
  (``predictions.npz``): McNemar's exact test per seed and pooled over seeds (the discordant
  counts summed over the seeds, one exact binomial test), Holm's correction over the table's
  pooled tests, and seeded bootstrap intervals over test samples (:mod:`analysis.significance`);
- ``confusable_pairs``: every final run re-scored from its ``confusion.npz`` on the reference
  pairs of the paper (the top-N pairs of the baseline's pooled confusion), and the error on the
  run's own top pairs;
- ``reference_pairs``: those reference pairs, with class names, pooled S and pair error;
- ``geometry``: D_B = -log rho per layer and prototype cosine on the reference pairs, linear-probe
  accuracy per layer, NC1;
- ``ablations``: study trials grouped by study (``carrot.study_id``) and each variant's switches
  (:data:`ABLATION_SWITCHES`);
- ``importance``: Optuna's fANOVA hyperparameter importance of each variant's study.

Final runs are the finished runs tagged ``carrot.role=final`` and ``carrot.split=test``: per
variant, those of the newest configuration (``carrot.config_hash``), one per seed (the newest);
runs of other configurations are left out with a note, never averaged in. Study trials are the
finished trials; the trials of different studies are never averaged together. Missing data is
written into the table with a numbered note, never dropped. Each table is one DataFrame
(:meth:`Table.frame`), rendered by :func:`render` to all three formats. The output is
deterministic: the same store gives byte-identical files.

As a paper shows them:

- negative numbers carry a true minus sign (U+2212 in Markdown, ``$-$`` in LaTeX); the CSV keeps
  plain ASCII numbers at full precision;
- the 95% t-interval of an accuracy is shown clipped to [0, 100] with a note on the cell (the
  CSV keeps the unclipped bounds); the significance table's intervals are percentile bootstraps;
- a number resting on too few runs is marked with a note: a t-interval or paired t-test over
  fewer than :data:`MIN_SEEDS` seeds, a pooled McNemar test over fewer than :data:`MIN_SEEDS`
  seeds, an ablation setting with fewer than :data:`MIN_SETTING_TRIALS` trials, an importance
  from fewer than :data:`MIN_IMPORTANCE_TRIALS` complete trials;
- D_B = -log rho (never rho, which underflows), and in ``geometry`` a value that would round to
  zero or is 10^5 or more is written m×10ⁿ;
- the LaTeX is a fragment to ``\\input`` (needs ``booktabs`` and ``graphicx``): a table too wide
  to stay readable is split into panels that repeat the label columns, each panel is scaled
  down to ``\\linewidth`` when still wider, long headers take two lines, `code` in notes is set
  in typewriter, and the notes follow as small ragged-right paragraphs.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from analysis.common import (
    REFERENCE_TOP_N,
    SHORT_ID,
    Artifacts,
    ReferenceSet,
    add_store_arguments,
    dataset_groups,
    db_keys,
    db_layers,
    final_runs,
    first_values,
    fixed_differences,
    known_variants,
    metric_layers,
    metric_values,
    natural_key,
    open_store,
    reference_set,
    studies,
    study_trials,
    tag_values,
)
from analysis.significance import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    bootstrap_intervals,
    discordant,
    holm,
    mcnemar_p,
    stratified_mcnemar,
)
from carrot import contract

# The ablation switches of each variant: hyperparameter names as logged under
# ``contract.HPARAM_PARAM_PREFIX + name``. A new variant is a new row; a name a run did not log is skipped.
ABLATION_SWITCHES: dict[str, tuple[str, ...]] = {
    "prototype": ("metric",),
    "expansion": ("mode", "detach_stats"),
    "nuisance": ("basis", "delta", "union"),
    "bhattacharyya": ("scale", "layers", "distance"),
    "barrier": ("use_var", "use_rank"),
}
COMMON_SWITCHES: tuple[str, ...] = ("data.sampler",)  # ablated for every variant (a config key)
# Continuous switches are binned: the bin edges (value < edge goes left).
SWITCH_BINS: dict[str, tuple[float, ...]] = {"delta": (0.03, 0.1)}

REFERENCES = ("baseline", "pairwise_confusion")  # variants every row is compared with (paired by seed)
CONFIDENCE = 0.95
CSV_FLOAT = "{:.10g}"
NA = "n/a"
DASH = "—"
MINUS = "\u2212"  # the minus sign of a displayed number (the CSV keeps ASCII '-')
# Below these counts a number is shown with a note that it rests on too few runs.
MIN_SEEDS = 3  # seeds behind a 95% t-interval, a paired t-test or a pooled McNemar test
MIN_SETTING_TRIALS = 3  # study trials behind one ablation setting's mean
MIN_IMPORTANCE_TRIALS = 10  # complete trials behind an fANOVA importance
ACC_BOUNDS = (0.0, 1.0)  # an accuracy's range; an interval beyond it is shown clipped, with a note


# ----------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); NaN below 2 values
    ci_low: float  # 95% t-interval of the mean; NaN below 2 values
    ci_high: float


def summarize(values: Iterable[float]) -> Summary:
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    from scipy import stats

    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Paired:
    n: int  # seeds both have
    diff: float  # mean of (variant - reference) over those seeds
    p: float  # two-sided paired t-test; NaN below 2 pairs or with zero spread


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> Paired:
    """Pair by seed; ``scipy.stats.ttest_rel(variant, reference)``."""
    seeds = sorted(s for s in set(values) & set(reference)
                   if math.isfinite(values[s]) and math.isfinite(reference[s]))
    if not seeds:
        return Paired(0, math.nan, math.nan)
    a = np.array([values[s] for s in seeds])
    b = np.array([reference[s] for s in seeds])
    diff = float(np.mean(a - b))
    if len(seeds) < 2:
        return Paired(len(seeds), diff, math.nan)
    from scipy import stats

    with np.errstate(all="ignore"):
        p = float(stats.ttest_rel(a, b).pvalue)
    return Paired(len(seeds), diff, p)


def by_seed(runs: pd.DataFrame, key: str) -> dict[int, float]:
    values = metric_values(runs, key)
    return {int(s): float(v) for s, v in zip(runs["seed"], values) if s is not None and math.isfinite(v)}


# ----------------------------------------------------------------------------- formatting
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
SCI_ABOVE = 1e5  # magnitudes from here on (and those that would round to zero) are shown as m×10ⁿ


def _needs_sci(v: float, digits: int) -> bool:
    """A value that would show as zero with ``digits`` decimals, or is at least :data:`SCI_ABOVE`."""
    return math.isfinite(v) and v != 0 and (abs(v) < 0.5 * 10.0 ** -digits or abs(v) >= SCI_ABOVE)


def _power(exponent: int) -> str:
    return "×10" + str(exponent).translate(_SUPERSCRIPT)


def fmt(x: float, digits: int = 2, scale: float = 1.0, sign: bool = False, sci: bool = False) -> str:
    """A displayed number: ``digits`` decimals, a true minus sign (U+2212), '+' with ``sign``.

    ``sci``: a value that would show as 0.00 (or is at least :data:`SCI_ABOVE`) is written
    m×10ⁿ with three significant digits instead, so a tiny or huge value stays readable."""
    if x is None or not math.isfinite(x):
        return NA
    v = x * scale
    if sci and _needs_sci(v, digits):
        mantissa, exponent = f"{v:{'+' if sign else ''}.2e}".split("e")
        text = mantissa + _power(int(exponent))
    else:
        text = f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"
    return text.replace("-", MINUS)


def fmt_pm(s: Summary, digits: int = 2, scale: float = 1.0, sci: bool = False) -> str:
    """'mean ± std'; 'n/a' for no value; the std says n/a for a single value.

    ``sci``: a mean that :func:`fmt` would write as m×10ⁿ gives '(m ± s)×10ⁿ', both in the
    mean's power of ten."""
    if s.n == 0:
        return NA
    mean, std = s.mean * scale, s.std * scale
    if sci and _needs_sci(mean, digits) and math.isfinite(std):
        exponent = math.floor(math.log10(abs(mean)))
        m, sd = mean / 10.0 ** exponent, std / 10.0 ** exponent
        if f"{abs(m):.2f}" == "10.00":  # rounding carried into the next power
            exponent, m, sd = exponent + 1, m / 10, sd / 10
        return (f"({m:.2f} ± {sd:.2f})" + _power(exponent)).replace("-", MINUS)
    return f"{fmt(s.mean, digits, scale, sci=sci)} ± {fmt(s.std, digits, scale, sci=sci)}"


def fmt_ci(s: Summary, digits: int = 2, scale: float = 1.0,
           bounds: tuple[float, float] | None = None) -> tuple[str, bool]:
    """'[low, high]' ('n/a' below 2 values), each end clipped to ``bounds`` (in the values'
    units, before ``scale``); and whether an end was clipped."""
    if s.n < 2:
        return NA, False
    low, high = s.ci_low, s.ci_high
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    clipped = (low, high) != (s.ci_low, s.ci_high)
    return f"[{fmt(low, digits, scale)}, {fmt(high, digits, scale)}]", clipped


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return f"p={NA}"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def csv_value(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return "" if not math.isfinite(x) else CSV_FLOAT.format(float(x))
    return str(x)


# ----------------------------------------------------------------------------- table model
@dataclass
class Notes:
    """Numbered footnotes; the same text gets the same number."""

    texts: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # marked since the last ``take``

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        if text not in self.pending:
            self.pending.append(text)
        return f"[{self.texts.index(text) + 1}]"

    def take(self) -> str:
        """The texts marked since the last call (one table row's notes, for the CSV)."""
        out, self.pending = "; ".join(self.pending), []
        return out

    def lines(self) -> list[str]:
        return [f"[{i + 1}] {t}" for i, t in enumerate(self.texts)]


DISPLAY, VALUES = "display", "csv"  # the two column blocks of :meth:`Table.frame`


@dataclass
class Table:
    """One table. A row is added once, with its displayed cells and its CSV values together;
    :meth:`frame` is the table as one DataFrame and :func:`render` writes it out."""

    name: str  # file stem
    title: str
    columns: list[str]  # displayed (Markdown, LaTeX)
    label_columns: int  # leading text columns (left-aligned)
    csv_columns: list[str]
    caption: str = ""  # one line under the title
    notes: Notes = field(default_factory=Notes)
    group_ends: list[int] = field(default_factory=list)  # row indices after which LaTeX draws a rule
    _rows: list[tuple[list[str], dict[str, Any]]] = field(default_factory=list)  # (cells, CSV values)

    def add(self, cells: list[str], values: dict[str, Any]) -> None:
        """One row: its displayed cells and its CSV values. The CSV ``note`` is the notes the
        row's cells marked, unless ``values`` gives its own."""
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.name}: {len(cells)} cells for {len(self.columns)} columns")
        unknown = sorted(set(values) - set(self.csv_columns))
        if unknown:
            raise ValueError(f"{self.name}: CSV values {unknown} have no column")
        self._rows.append((list(cells), {"note": self.notes.take(), **values}))

    def __len__(self) -> int:
        return len(self._rows)

    def end_group(self) -> None:
        if len(self) and (not self.group_ends or self.group_ends[-1] != len(self) - 1):
            self.group_ends.append(len(self) - 1)

    def frame(self) -> pd.DataFrame:
        """The whole table: columns ``(DISPLAY, <shown column>)`` hold the cells as shown,
        ``(VALUES, <csv column>)`` the numbers at full precision (None where there is none)."""
        display = pd.DataFrame([cells for cells, _ in self._rows], columns=self.columns, dtype=object)
        values = pd.DataFrame([v for _, v in self._rows], columns=self.csv_columns, dtype=object)
        return pd.concat({DISPLAY: display, VALUES: values.where(values.notna(), None)}, axis=1)


def render(table: Table) -> dict[str, str]:
    """The table's Markdown, LaTeX (booktabs) and CSV text, keyed by file extension."""
    frame = table.frame()
    shown = frame[DISPLAY]
    if not len(shown):  # a table with no data still says so
        shown = pd.DataFrame([["no data"] + [""] * (len(table.columns) - 1)], columns=table.columns)
    return {"md": _markdown(table, shown), "tex": _latex(table, shown),
            "csv": frame[VALUES].map(csv_value).to_csv(index=False, lineterminator="\n")}


def _markdown(table: Table, shown: pd.DataFrame) -> str:
    # written here rather than with DataFrame.to_markdown: that needs `tabulate`, which the
    # project does not depend on, and pads cells to width (noisy diffs of the paper's tables)
    def line(cells: Iterable[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    align = ["---:" if i >= table.label_columns else ":---" for i in range(shown.shape[1])]
    out = [f"## {table.title}", ""] + ([table.caption, ""] if table.caption else [])
    out += [line(shown.columns), "|" + "|".join(align) + "|", *(line(r) for r in shown.itertuples(index=False))]
    if table.notes.texts:  # two trailing spaces: a Markdown line break between notes
        out += [""] + [n + "  " for n in table.notes.lines()[:-1]] + table.notes.lines()[-1:]
    return "\n".join(out) + "\n"


LATEX_PACKAGES = ("booktabs", "graphicx")  # what a document \\input-ing a table needs
# Each tabular's box, scaled down to the line width when it is wider (never up).
LATEX_FIT = r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%"
# Estimated widths (pt, 10pt Computer Modern) that decide where a wide table is split into
# panels: each panel repeats the label columns and takes as many value columns as keep it under
# LATEX_PANEL_PT, so the scaling above shrinks it to no less than about 345 / 500 = 0.7.
LATEX_PANEL_PT = 500.0
LATEX_CHAR_PT = 5.0  # an average character
LATEX_COLSEP_PT = 12.0  # \tabcolsep on both sides


def _header_lines(header: str, body_chars: int) -> list[str]:
    """A column header on one line, or on two (split at the space that balances them best) when
    it is longer than the column's widest cell."""
    words = header.split(" ")
    if len(header) <= body_chars or len(words) < 2:
        return [header]
    splits = [(" ".join(words[:i]), " ".join(words[i:])) for i in range(1, len(words))]
    return list(min(splits, key=lambda pair: max(len(pair[0]), len(pair[1]))))


def _latex_header(lines: list[str], align: str) -> str:
    if len(lines) == 1:
        return latex_escape(lines[0])
    return (r"\begin{tabular}[b]{@{}" + align + "@{}}" + r"\\".join(latex_escape(x) for x in lines)
            + r"\end{tabular}")


def _panels(table: Table, shown: pd.DataFrame, headers: list[list[str]]) -> list[list[int]]:
    """The columns of each panel: the label columns, then value columns while the estimated
    width stays under :data:`LATEX_PANEL_PT` (at least one value column a panel)."""
    def width(i: int) -> float:
        chars = max([len(x) for x in headers[i]] + [len(str(c)) for c in shown.iloc[:, i]])
        return chars * LATEX_CHAR_PT + LATEX_COLSEP_PT

    labels = list(range(table.label_columns))
    base = sum(width(i) for i in labels)
    panels: list[list[int]] = []
    current: list[int] = []
    for i in range(table.label_columns, shown.shape[1]):
        if current and base + sum(width(j) for j in current) + width(i) > LATEX_PANEL_PT:
            panels.append(labels + current)
            current = []
        current.append(i)
    return panels + [labels + current] if current or not panels else panels


def _latex_tabular(table: Table, shown: pd.DataFrame, columns: list[int], headers: list[list[str]]) -> list[str]:
    part = shown.iloc[:, columns]
    aligns = ["l" if i < table.label_columns else "r" for i in columns]
    names = {name: _latex_header(headers[i], align) for name, i, align in zip(part.columns, columns, aligns)}
    styler = part.style.hide(axis="index").format(latex_escape).format_index(lambda name: names[name], axis=1)
    lines = styler.to_latex(column_format="".join(aligns), hrules=True).splitlines()
    first = lines.index(r"\midrule") + 1  # the first body row: one line per row
    assert lines.index(r"\bottomrule") - first == len(part), "a LaTeX row spans one line"
    for end in sorted((i for i in table.group_ends if i < len(part) - 1), reverse=True):
        lines.insert(first + end + 1, r"\midrule")  # a rule between datasets or variants
    assert lines[-1] == r"\end{tabular}", lines[-1]
    lines[-1] += "%"
    return [r"\par\noindent" + LATEX_FIT, *lines, "}\\par"]


def _latex(table: Table, shown: pd.DataFrame) -> str:
    """A fragment to ``\\input``: the booktabs tabular in a box no wider than ``\\linewidth``
    (a table too wide to stay readable is split into panels one under the other, each repeating
    the label columns), then the notes as small ragged-right paragraphs (a path in a note may
    break after '/')."""
    if len(set(shown.columns)) != shown.shape[1]:
        raise ValueError(f"{table.name}: column names repeat")
    headers = [_header_lines(str(name), max((len(str(c)) for c in shown.iloc[:, i]), default=0))
               if i >= table.label_columns else [str(name)] for i, name in enumerate(shown.columns)]
    body: list[str] = []
    for n, columns in enumerate(_panels(table, shown, headers)):
        body += ([r"\par\medskip"] if n else []) + _latex_tabular(table, shown, columns, headers)
    header = [f"% {latex_escape(table.title)}", "% generated by analysis/tables.py from the MLflow store; needs "
              f"\\usepackage{{{','.join(LATEX_PACKAGES)}}}"]
    header += [f"% caption: {latex_escape(table.caption)}"] if table.caption else []
    notes = []
    if table.notes.texts:
        notes = [r"{\footnotesize\raggedright"] + [
            r"\noindent " + latex_escape(line).replace("/", r"\slash{}") + r"\par" for line in table.notes.lines()]
        notes[-1] += "}"
    return "\n".join(header + body + notes) + "\n"


def write_table(table: Table, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, text in render(table).items():
        path = out / f"{table.name}.{ext}"
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        paths.append(path)
    return paths


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_SYMBOLS = {"±": r"$\pm$", "Δ": r"$\Delta$", "ρ": r"$\rho$", "≥": r"$\geq$", "≤": r"$\leq$", "—": "---",
                  "<": r"$<$", ">": r"$>$", MINUS: r"$-$", "×": r"$\times$", "Σ": r"$\Sigma$", "…": r"\ldots{}"}
# Spans written as LaTeX constructs rather than character by character: `code`, a power of ten
# m×10ⁿ (see :func:`fmt`), and the symbol D_B.
_LATEX_SPANS = re.compile(r"`(?P<code>[^`]*)`|×10(?P<power>[⁻⁰¹²³⁴⁵⁶⁷⁸⁹]+)|(?P<db>\bD_B\b)")
_FROM_SUPERSCRIPT = str.maketrans("⁻⁰¹²³⁴⁵⁶⁷⁸⁹", "-0123456789")


def _latex_chars(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch) or _LATEX_SYMBOLS.get(ch) or ch for ch in text)


def latex_escape(text: Any) -> str:
    """Text for a LaTeX document: special characters escaped, symbols in math mode, `code` in
    typewriter (never backticks, which LaTeX would set as quotes)."""
    text, out, at = str(text), [], 0
    for m in _LATEX_SPANS.finditer(text):
        out.append(_latex_chars(text[at:m.start()]))
        if m["code"] is not None:
            out.append(r"\texttt{" + _latex_chars(m["code"]) + "}")
        elif m["power"] is not None:
            out.append(r"$\times 10^{" + m["power"].translate(_FROM_SUPERSCRIPT) + "}$")
        else:
            out.append(r"$D_B$")
        at = m.end()
    return "".join(out) + _latex_chars(text[at:])


# ----------------------------------------------------------------------------- shared pieces
@dataclass
class Context:
    runs: pd.DataFrame  # every run of the experiment (after --dataset/--backbone)
    final: pd.DataFrame  # finished test runs of each variant's newest configuration, one per seed
    duplicates: pd.DataFrame  # older runs of a seed that ``final`` replaced
    other_configs: pd.DataFrame  # final runs of another configuration than the kept one
    trials: pd.DataFrame  # finished study trials
    variants: list[str]  # known to the store, in table order
    groups: list[tuple[str, str]]  # (dataset, backbone)
    expected_seeds: int | None  # --seeds
    storage: str
    artifacts: Artifacts  # the runs' confusion matrices and predictions, read once
    _references: dict[tuple[str, str], ReferenceSet] = field(default_factory=dict)

    def reference(self, dataset: str, backbone: str) -> ReferenceSet:
        """The reference pairs of one dataset and backbone, from the baseline's final runs."""
        if (dataset, backbone) not in self._references:
            baseline = group_runs(self.final, dataset, backbone, "baseline")
            self._references[(dataset, backbone)] = reference_set(self.artifacts, baseline)
        return self._references[(dataset, backbone)]

    def lost(self, dataset: str, backbone: str) -> int:
        """Baseline final runs of one dataset and backbone whose artifacts could not be found."""
        baseline = group_runs(self.final, dataset, backbone, "baseline")
        return len(set(baseline["run_id"]) & self.artifacts.unreachable) if len(baseline) else 0


def group_runs(frame: pd.DataFrame, dataset: str, backbone: str, variant: str | None = None) -> pd.DataFrame:
    if not len(frame):
        return frame
    keep = (frame["dataset"] == dataset) & (frame["backbone"] == backbone)
    if variant is not None:
        keep &= frame["variant"] == variant
    return frame[keep]


@dataclass
class Slot:
    """One (dataset, backbone, variant) row of a table."""

    dataset: str
    backbone: str
    variant: str

    @property
    def labels(self) -> list[str]:  # the leading displayed cells
        return [self.dataset, self.backbone, self.variant]

    @property
    def keys(self) -> dict[str, str]:  # the leading CSV values
        return {"dataset": self.dataset, "backbone": self.backbone, "variant": self.variant}


def slots(ctx: Context, table: Table) -> Iterator[Slot]:
    """Every dataset, backbone and variant in table order; a rule after each dataset and backbone."""
    for dataset, backbone in ctx.groups:
        for variant in ctx.variants:
            yield Slot(dataset, backbone, variant)
        table.end_group()


def seeds_cell(ctx: Context, dataset: str, backbone: str, variant: str, notes: Notes) -> tuple[str, int, int]:
    """'5', '2 of 5 [1]' or '0 of 5 [2]', and (n, expected)."""
    group = group_runs(ctx.final, dataset, backbone)
    counts = [len(group_runs(group, dataset, backbone, v)) for v in ctx.variants]
    n = len(group_runs(group, dataset, backbone, variant))
    most = max(counts) if counts else 0
    expected = ctx.expected_seeds if ctx.expected_seeds else most
    source = "--seeds" if ctx.expected_seeds else "the most-seeded variant of this dataset and backbone"
    text = str(n)
    if n == 0:
        text = f"0 of {expected}" if expected else "0"
        text += " " + notes.mark("no finished final (test-split) run of this variant: run `make final`")
    elif n < expected:
        text = f"{n} of {expected} " + notes.mark(
            f"fewer seeds than expected ({source}); statistics are over the seeds available")
    dup = group_runs(ctx.duplicates, dataset, backbone, variant)
    if len(dup):
        text += " " + notes.mark("a seed was run more than once; the newest finished run is used")
    other = group_runs(ctx.other_configs, dataset, backbone, variant)
    if len(other):
        kept = group_runs(ctx.final, dataset, backbone, variant)
        hashes = tag_values(other, contract.TAG_CONFIG_HASH)
        configs = [other[hashes == h] for h in sorted(set(hashes))]
        differ = fixed_differences([kept, *configs])
        text += " " + notes.mark(
            f"{len(other)} final run(s) of {len(configs)} other configuration(s) of this variant "
            f"({contract.TAG_CONFIG_HASH} differs" + (f": {', '.join(differ)}" if differ else "")
            + ") left out; only the newest configuration's seeds are used, never averaged with others")
    return text, n, expected


@dataclass
class FinalSlot(Slot):
    """A row of a final-run table: its runs and its seeds cell."""

    runs: pd.DataFrame = field(default_factory=pd.DataFrame)  # the final runs of this slot, one per seed
    seeds: str = ""  # the displayed seeds cell, notes marked
    n: int = 0  # seeds (runs) present
    expected: int = 0


def final_slots(ctx: Context, table: Table) -> Iterator[FinalSlot]:
    """:func:`slots` with each slot's final runs; marks the seeds cell's notes in ``table``."""
    for slot in slots(ctx, table):
        seeds, n, expected = seeds_cell(ctx, slot.dataset, slot.backbone, slot.variant, table.notes)
        yield FinalSlot(slot.dataset, slot.backbone, slot.variant,
                        group_runs(ctx.final, slot.dataset, slot.backbone, slot.variant), seeds, n, expected)


REFERENCE_COLUMNS = [c for ref in REFERENCES for c in (f"diff_vs_{ref}", f"p_vs_{ref}", f"n_paired_vs_{ref}")]


# Parameters every variant sets for itself (its own hyperparameters, and what its study searched:
# learning rate, weight decay, the sampler and the batch it gives): a difference there is the
# comparison, not a different set-up.
VARIANT_OWN_PARAMS = ("variant.", "data.effective_batch_size", *contract.SEARCHED_CONFIG_KEYS)


def setup_difference(runs: pd.DataFrame, ref_runs: pd.DataFrame, ref: str) -> str:
    """The note when a variant's runs and the reference's differ in a fixed setting (epochs,
    image size, ...), so a difference between them compares different set-ups; "" when they agree."""
    differ = fixed_differences([runs, ref_runs], ignore_prefixes=VARIANT_OWN_PARAMS)
    if not differ:
        return ""
    return f"this variant's runs and {ref}'s differ in fixed settings ({', '.join(differ)}): the difference " \
           "compares different set-ups"


def setup_note(notes: Notes, runs: pd.DataFrame, ref_runs: pd.DataFrame, ref: str) -> str:
    """:func:`setup_difference` as a note mark, or ""."""
    text = setup_difference(runs, ref_runs, ref)
    return " " + notes.mark(text) if text else ""


def reference_cells(ctx: Context, slot: FinalSlot, per_seed: str | Callable[[pd.DataFrame], dict[int, float]],
                    notes: Notes, scale: float, digits: int) -> tuple[list[str], dict[str, Any]]:
    """'Δ (p, n)' against each reference variant, and the CSV fields (:data:`REFERENCE_COLUMNS`).

    ``per_seed``: a metric key, or a function from runs to {seed: value}."""
    of = (lambda runs: by_seed(runs, per_seed)) if isinstance(per_seed, str) else per_seed
    cells, fields = [], {}
    values = of(slot.runs)
    for ref in REFERENCES:
        prefix = f"diff_vs_{ref}"
        if slot.variant == ref:
            cells.append(DASH)
            fields.update({prefix: None, f"p_vs_{ref}": None, f"n_paired_vs_{ref}": None})
            continue
        ref_runs = group_runs(ctx.final, slot.dataset, slot.backbone, ref)
        result = paired_difference(values, of(ref_runs))
        fields.update({prefix: result.diff if result.n >= 2 else None, f"p_vs_{ref}": result.p if result.n >= 2
                       else None, f"n_paired_vs_{ref}": result.n})
        if not values:
            cells.append(NA)
        elif not len(ref_runs):
            cells.append(f"{NA} " + notes.mark(f"no finished final run of {ref} to compare with"))
        elif result.n < 2:
            cells.append(f"{NA} " + notes.mark(
                "fewer than 2 seeds in common with the reference variant: no paired test"))
        else:
            few = "" if result.n >= MIN_SEEDS else " " + notes.mark(
                f"paired t-test over fewer than {MIN_SEEDS} seeds ({degrees(result.n - 1)} of freedom): it has "
                f"little power and its p-value is unreliable; run {MIN_SEEDS} or more seeds")
            cells.append(f"{fmt(result.diff, digits, scale, sign=True)} ({fmt_p(result.p)}, n={result.n})" + few
                         + setup_note(notes, slot.runs, ref_runs, ref))
    return cells, fields


def degrees(n: int) -> str:
    return f"{n} degree" + ("" if n == 1 else "s")


def ci_cell(s: Summary, notes: Notes, digits: int, scale: float, bounds: tuple[float, float] | None) -> str:
    """The 95% t-interval of a mean over seeds, clipped to ``bounds`` with a note, and marked
    when it rests on fewer than :data:`MIN_SEEDS` seeds."""
    text, clipped = fmt_ci(s, digits, scale, bounds)
    if s.n == 1:
        text += " " + notes.mark("one seed: no interval (a 95% t-interval needs at least 2 seeds)")
    elif 1 < s.n < MIN_SEEDS:
        from scipy import stats

        t = float(stats.t.ppf(0.5 + CONFIDENCE / 2, s.n - 1))
        text += " " + notes.mark(
            f"95% t-interval over {s.n} seeds ({degrees(s.n - 1)} of freedom, t = {t:.2f}): very wide; "
            f"run {MIN_SEEDS} or more seeds")
    if clipped:
        lo, hi = (fmt(b, 0, scale) for b in bounds)
        text += " " + notes.mark(
            f"the t-interval runs past the range of an accuracy: shown clipped to [{lo}, {hi}] (the CSV keeps the "
            "unclipped bounds)")
    return text


# ----------------------------------------------------------------------------- 1. main results
TEST_ACC = contract.split_metric(contract.SPLIT_TEST, "acc")
TEST_MEAN_CLASS_ACC = contract.split_metric(contract.SPLIT_TEST, "mean_class_acc")
VAL_ACC = contract.split_metric(contract.SPLIT_VAL, "acc")


def main_results(ctx: Context) -> Table:
    table = Table(
        "main_results", "Main results: test top-1 accuracy over seeds",
        ["Dataset", "Backbone", "Variant", "Seeds", "Top-1 (%)", "95% CI", "Δ vs baseline (pp)", "Δ vs PC (pp)",
         "Mean class acc. (%)"], label_columns=3,
        csv_columns=["dataset", "backbone", "variant", "n_seeds", "n_expected", "acc_mean", "acc_std",
                     "acc_ci_low", "acc_ci_high", *REFERENCE_COLUMNS, "mean_class_acc_mean", "mean_class_acc_std",
                     "seeds", "note"],
        caption="Final runs (split=test, finished), last epoch; mean ± std over seeds; 95% t-interval of the "
                "mean over seeds (shown clipped to [0, 100] where it runs past, with a note; the CSV keeps the "
                "unclipped bounds); Δ = mean paired difference over common seeds with a paired t-test (scipy "
                f"ttest_rel); PC = pairwise_confusion. Intervals and tests over fewer than {MIN_SEEDS} seeds are "
                "marked.")
    for slot in final_slots(ctx, table):
        acc = summarize(metric_values(slot.runs, TEST_ACC))
        mca = summarize(metric_values(slot.runs, TEST_MEAN_CLASS_ACC))
        refs, fields = reference_cells(ctx, slot, TEST_ACC, table.notes, 100.0, 2)
        if slot.n == 0:
            cells = [slot.seeds, "no finished runs", NA, *refs, NA]
        else:
            cells = [slot.seeds, fmt_pm(acc, 2, 100), ci_cell(acc, table.notes, 2, 100, ACC_BOUNDS), *refs,
                     fmt_pm(mca, 2, 100)]
        table.add(slot.labels + cells, {
            **slot.keys, "n_seeds": slot.n, "n_expected": slot.expected, "acc_mean": acc.mean, "acc_std": acc.std,
            "acc_ci_low": acc.ci_low, "acc_ci_high": acc.ci_high, **fields, "mean_class_acc_mean": mca.mean,
            "mean_class_acc_std": mca.std, "seeds": " ".join(str(s) for s in sorted(by_seed(slot.runs, TEST_ACC)))})
    return table


# ----------------------------------------------------------------------------- 2. confusable pairs
def reference_errors(ctx: Context, runs: pd.DataFrame, ref: ReferenceSet) -> dict[int, float]:
    """{seed: mean error over the reference pairs}, re-scored from each run's last-epoch
    confusion matrix; runs without a usable matrix are absent."""
    out = {}
    for seed, run_id in zip(runs["seed"], runs["run_id"]):
        error = ref.mean_error(ctx.artifacts.confusion(run_id))
        if seed is not None and math.isfinite(error):
            out[int(seed)] = error
    return out


def reference_note(ref: ReferenceSet, notes: Notes, lost: int = 0) -> str:
    """The note mark of a reference set that is smaller than asked, or missing; "" otherwise.
    ``lost``: baseline runs whose artifacts were not found or could not be read (see :class:`Artifacts`)."""
    marks = ""
    if lost:
        marks += " " + notes.mark(
            f"the artifacts of {lost} baseline run(s) were found neither where the run logged them nor under the "
            f"store's folder, or could not be read: no {contract.CONFUSION_ARTIFACT} read from them (stderr names "
            "each run, where it was looked for and why)")
    if ref.pooled is None:
        return marks + " " + notes.mark(
            f"no baseline final run with a {contract.CONFUSION_ARTIFACT}: no reference pairs")
    if len(ref) < ref.top_n:
        marks += " " + notes.mark(
            f"the baseline's pooled confusion holds only {len(ref)} confused pair(s) (S > 0): the reference "
            f"set has {len(ref)} pair(s), fewer than N = {ref.top_n}")
    if ref.skipped:
        marks += " " + notes.mark(
            f"{ref.skipped} baseline run(s) left out of the pooled confusion (no {contract.CONFUSION_ARTIFACT}, "
            "or another number of classes)")
    return marks


def confusable_pairs(ctx: Context) -> Table:
    table = Table(
        "confusable_pairs", "Confusable pairs: error on the reference pairs of the paper",
        ["Dataset", "Backbone", "Variant", "Seeds", "Ref pairs", "Ref-pair error (%)", "Δ vs baseline (pp)",
         "Δ vs PC (pp)", "Top-pair error (%)"], label_columns=3,
        csv_columns=["dataset", "backbone", "variant", "n_seeds", "n_ref_pairs", "n_rescored", "ref_error_mean",
                     "ref_error_std", *REFERENCE_COLUMNS, "top_error_mean", "top_error_std", "note"],
        caption=f"Reference pairs: the top-{REFERENCE_TOP_N} pairs by S (S > 0 only) of the summed last-epoch "
                f"confusion matrices of the baseline's final runs of each dataset and backbone (listed in the "
                f"reference_pairs table). Ref-pair error: every final run re-scored on them from its "
                f"{contract.CONFUSION_ARTIFACT}, mean over the pairs of (C_ij + C_ji) / (n_i + n_j), so it does not "
                f"depend on which run finished first; {contract.TOP_ERROR}: over the run's own top-N pairs (as "
                "logged). Final runs, last epoch, mean ± std over seeds; Δ paired by seed (ttest_rel).")
    for slot in final_slots(ctx, table):
        ref = ctx.reference(slot.dataset, slot.backbone)
        scored = reference_errors(ctx, slot.runs, ref)
        errors = summarize(scored.values())
        top = summarize(metric_values(slot.runs, contract.TOP_ERROR))
        refs, fields = reference_cells(ctx, slot, lambda runs: reference_errors(ctx, runs, ref), table.notes,
                                       100.0, 2)
        if slot.n == 0:
            ref_cell = "no finished runs"
        elif not len(ref):
            ref_cell = NA
        else:
            ref_cell = fmt_pm(errors, 2, 100)
            if errors.n < slot.n:
                lost = len(set(slot.runs["run_id"]) & ctx.artifacts.unreachable)
                ref_cell += " " + table.notes.mark(
                    f"the artifacts of {lost} of these runs were not found or could not be read (stderr names each "
                    "run, where it was looked for and why): statistics over the others" if lost else
                    f"some runs have no usable {contract.CONFUSION_ARTIFACT}: statistics over the others")
        pairs_cell = str(len(ref)) + reference_note(ref, table.notes, ctx.lost(slot.dataset, slot.backbone))
        table.add(slot.labels + [slot.seeds, pairs_cell, ref_cell, *refs, fmt_pm(top, 2, 100) if slot.n else NA],
                  {**slot.keys, "n_seeds": slot.n, "n_ref_pairs": len(ref), "n_rescored": errors.n,
                   "ref_error_mean": errors.mean, "ref_error_std": errors.std, **fields,
                   "top_error_mean": top.mean, "top_error_std": top.std})
    return table


def reference_pairs(ctx: Context) -> Table:
    table = Table(
        "reference_pairs", "Reference pairs of the paper tables",
        ["Dataset", "Backbone", "Rank", "Pair", "Classes", "S (pooled)", "Baseline pair error (%)"],
        label_columns=5,
        csv_columns=["dataset", "backbone", "rank", "i", "j", "class_i", "class_j", "score", "baseline_error",
                     "n_baseline_runs", "note"],
        caption=f"Per dataset and backbone: the top-{REFERENCE_TOP_N} pairs (i < j, S > 0) of the summed "
                f"last-epoch confusion matrices of the baseline's final runs; S = (C_ij / n_i + C_ji / n_j) / 2 and "
                "the pair error (C_ij + C_ji) / (n_i + n_j) of that pooled matrix. Ties in S: smaller i, then j.")
    for dataset, backbone in ctx.groups:
        ref = ctx.reference(dataset, backbone)
        base = {"dataset": dataset, "backbone": backbone, "n_baseline_runs": len(ref.run_ids)}
        errors = ref.errors(ref.pooled)
        for rank, ((i, j), score, error) in enumerate(zip(ref.pairs.tolist(), ref.scores, errors), start=1):
            marks = reference_note(ref, table.notes, ctx.lost(dataset, backbone)) if rank == len(ref) else ""
            table.add([dataset, backbone, str(rank), f"({i}, {j})", f"{ref.name(i)} / {ref.name(j)}",
                       fmt(score, 4), fmt(error, 2, 100) + marks],
                      {**base, "rank": rank, "i": i, "j": j, "class_i": ref.name(i), "class_j": ref.name(j),
                       "score": float(score), "baseline_error": float(error)})
        if not len(ref):
            table.add([dataset, backbone, DASH, DASH, DASH, DASH,
                       NA + reference_note(ref, table.notes, ctx.lost(dataset, backbone))], base)
        table.end_group()
    return table


# ----------------------------------------------------------------------------- 3. geometry
def geometry(ctx: Context) -> Table:
    metrics: list[tuple[tuple[str, ...], str, float, int]] = (  # keys (first logged wins), column, scale, digits
        [(db_keys(layer), f"D_B {layer} (ref)", 1.0, 2) for layer in db_layers(ctx.final)]
        + [((contract.PROTO_COS_REF,), "cos (ref)", 1.0, 3)]
        + [((contract.probe_metric(layer),), f"probe {layer} (%)", 100.0, 2)
           for layer in metric_layers(ctx.final, contract.probe_metric)]
        + [((contract.NC1,), "NC1", 1.0, 3)])
    table = Table(
        "geometry", "Geometry: overlap, prototype cosine and linear separability",
        ["Dataset", "Backbone", "Variant", "Seeds", *[m[1] for m in metrics]], label_columns=3,
        csv_columns=["dataset", "backbone", "variant", "n_seeds",
                     *[f"{keys[0]}:{stat}" for keys, *_ in metrics for stat in ("mean", "std", "n")], "note"],
        caption="Final runs, last epoch, mean ± std over seeds. D_B = −log ρ: diagonal-Gaussian Bhattacharyya "
                "distance of the class-conditional features of the reference pairs each run was scored on, per "
                f"layer ({contract.db_metric('<layer>', 'ref')}, or {contract.legacy_db_metric('<layer>', 'ref')} "
                "in older runs; higher = less overlap; ρ itself underflows to 0 on wide layers); cos: prototype "
                "cosine of those pairs; probe: linear-probe accuracy per layer; NC1 = Tr(Σ_W Σ_B^+)/K. A value that "
                f"would round to zero, or of 10{str(round(math.log10(SCI_ABOVE))).translate(_SUPERSCRIPT)} or more, is "
                "written m×10ⁿ.")
    for slot in final_slots(ctx, table):
        cells, fields = [slot.seeds], {}
        for keys, _, scale, digits in metrics:
            s = summarize(first_values(slot.runs, keys))
            if slot.n == 0:
                cell = NA
            elif s.n == 0:
                cell = f"{NA} " + table.notes.mark("metric not logged by these runs")
            else:
                cell = fmt_pm(s, digits, scale, sci=True)
                if s.n < slot.n:
                    cell += " " + table.notes.mark("logged by only some of the runs; statistics over those")
            cells.append(cell)
            fields.update({f"{keys[0]}:mean": s.mean, f"{keys[0]}:std": s.std, f"{keys[0]}:n": s.n})
        if slot.n == 0:
            cells[1] = "no finished runs"
        table.add(slot.labels + cells, {**slot.keys, "n_seeds": slot.n, **fields})
    return table


# ----------------------------------------------------------------------------- 4. ablations
def csv_setting(setting: str) -> str:
    """A setting as the CSV keeps it, in ASCII: empty for all trials, ``>=`` for ``≥``."""
    return "" if setting == DASH else setting.replace("≥", ">=")


def switch_value(param: str, raw: Any) -> str:
    """The setting a trial falls in: the logged value, or its bin for a continuous switch."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return "(not logged)"
    text = str(raw)
    edges = SWITCH_BINS.get(param)
    if not edges:
        return text
    try:
        x = float(text)
    except ValueError:
        return text
    labels = [f"< {edges[0]:g}"] + [f"[{lo:g}, {hi:g})" for lo, hi in zip(edges, edges[1:])] + [f"≥ {edges[-1]:g}"]
    return labels[int(np.searchsorted(np.asarray(edges), x, side="right"))]


def _setting_key(text: str) -> tuple:
    """Numbers in numeric order (bins by their lower edge), then text in natural order."""
    probe = text.lstrip("[<≥ ").split(",")[0].strip()
    if text.startswith("<"):
        return (0, -math.inf, text)
    try:
        return (0, float(probe), text)
    except ValueError:
        return (1, 0.0, tuple(natural_key(text)))


def hparam_column(name: str) -> str:
    """The runs-frame column of a switch's logged value: a dotted name is a config key, any
    other a variant hyperparameter."""
    return f"params.{name}" if "." in name else f"params.{contract.HPARAM_PARAM_PREFIX}{name}"


def ablations(ctx: Context) -> Table:
    table = Table(
        "ablations", "Ablations within each variant (study trials)",
        ["Dataset", "Backbone", "Variant", "Study", "Switch", "Setting", "Trials", "Val top-1 (%)"],
        label_columns=6,
        csv_columns=["dataset", "backbone", "variant", "study", "study_id", "switch", "setting", "n_trials",
                     "val_acc_mean", "val_acc_std", "note"],
        caption="Finished study trials (split=val), last-epoch val/acc, grouped by one switch at a time and by "
                "the variant's switches jointly; other hyperparameters vary across trials as the search chose them. "
                f"Each study ({contract.TAG_STUDY_ID}; shown as name and the id's first {SHORT_ID} characters) has "
                "its own rows: trials of different studies are never averaged together. Settings with fewer than "
                f"{MIN_SETTING_TRIALS} trials are marked.")
    for slot in slots(ctx, table):
        found = studies(group_runs(ctx.trials, slot.dataset, slot.backbone, slot.variant))
        if not found:
            table.add(slot.labels + [DASH, DASH, DASH, "0", "no finished trials " + table.notes.mark(
                "no finished study trial of this variant: run `make study VARIANT=<variant>`")],
                {**slot.keys, "switch": "", "setting": "", "n_trials": 0})
            continue
        apart = ""
        if len(found) > 1:
            differ = fixed_differences([st.trials for st in found], ignore_prefixes=VARIANT_OWN_PARAMS)
            apart = " " + table.notes.mark(
                f"{len(found)} studies of this variant (different {contract.TAG_STUDY_ID}, e.g. the same name in "
                "two storages) are kept apart, never averaged"
                + (f"; they differ in fixed settings: {', '.join(differ)}" if differ else ""))
        for study in found:
            ablation_rows(table, slot, study.trials, study.label, apart,
                          {"study": study.name, "study_id": study.study_id})
        table.end_group()
    return table


def ablation_rows(table: Table, slot: Slot, trials: pd.DataFrame, label: str, marks: str,
                  study: dict[str, str]) -> None:
    """One study's rows: all its trials, then each switch's settings, then the switches jointly;
    ``marks`` (note marks) follow the study's label on its first row."""
    acc = metric_values(trials, VAL_ACC)
    switches = [p for p in ABLATION_SWITCHES.get(slot.variant, ()) + COMMON_SWITCHES
                if hparam_column(p) in trials.columns]
    blocks: list[tuple[str, list[str]]] = [("(all trials)", [DASH] * len(trials))]
    for p in switches:
        blocks.append((p, [switch_value(p, v) for v in trials[hparam_column(p)]]))
    if len(switches) > 1:
        joint = [", ".join(f"{p}={switch_value(p, v)}" for p, v in zip(switches, values))
                 for values in zip(*(trials[hparam_column(p)] for p in switches))]
        blocks.append(("joint: " + ", ".join(switches), joint))
    first = len(table)
    for switch, settings in blocks:
        for setting in sorted(set(settings), key=_setting_key):
            mask = np.array([s == setting for s in settings])
            s = summarize(acc[mask])
            n_cell = str(int(mask.sum()))
            if mask.sum() < MIN_SETTING_TRIALS:
                n_cell += " " + table.notes.mark(
                    f"fewer than {MIN_SETTING_TRIALS} trials: this mean is not a reliable comparison")
            table.add(slot.labels + [label + ("" if len(table) > first else marks), switch, setting,
                                     n_cell, fmt_pm(s, 2, 100)],
                      {**slot.keys, **study, "switch": switch, "setting": csv_setting(setting),
                       "n_trials": int(mask.sum()),
                       "val_acc_mean": s.mean, "val_acc_std": s.std})


# ----------------------------------------------------------------------------- 5. importance
def open_study_storage(storage: str):
    """(storage object or None, words for a note when it cannot be opened). Never creates a
    store, and names the storage with its password masked."""
    import optuna

    shown = contract.redact(storage, storage)
    if "://" in storage:
        db = contract.sqlite_file(storage)
        if db is not None:
            if not db or not Path(db).is_file():
                return None, f"no Optuna storage at {shown} (give an existing one with --storage)"
        try:
            return optuna.storages.get_storage(storage), ""
        except Exception as exc:  # unreachable database, bad URL
            return None, contract.redact(f"cannot open Optuna storage {shown}: {contract.error_line(exc)}", storage)
    path = Path(storage)
    if not path.is_file():
        return None, f"no Optuna storage at {storage} (give one with --storage)"
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        return JournalStorage(JournalFileBackend(str(path))), ""
    except ValueError as exc:  # a damaged record (json.JSONDecodeError, Optuna's "Invalid log format.")
        return None, f"cannot read Optuna storage {storage}: {contract.error_line(exc)}"


def importance(ctx: Context) -> Table:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shown = contract.redact(ctx.storage, ctx.storage)  # the storage as the tables name it
    table = Table(
        "importance", "Hyperparameter importance per variant (Optuna fANOVA)",
        ["Dataset", "Backbone", "Variant", "Study", "Hyperparameter", "Complete trials", "Importance"],
        label_columns=5,
        csv_columns=["dataset", "backbone", "variant", "study", "study_id", "n_complete", "param", "importance",
                     "note"],
        caption=f"optuna.importance.get_param_importances (fANOVA, seed 0) on the study in {shown}; "
                f"importances sum to 1 within a study. Studies with fewer than {MIN_IMPORTANCE_TRIALS} complete "
                "trials are marked.")
    storage, problem = open_study_storage(ctx.storage)
    names = set()
    if storage is not None:
        try:
            names = set(optuna.get_all_study_names(storage))
        except Exception as exc:
            storage, problem = None, contract.redact(
                f"cannot read Optuna storage {shown}: {contract.error_line(exc)}", ctx.storage)
    for slot in slots(ctx, table):
        default = contract.study_name(slot.dataset, slot.backbone, slot.variant)
        logged = studies(group_runs(ctx.trials, slot.dataset, slot.backbone, slot.variant))  # the runs' studies
        forks = sorted({st.name for st in logged
                        if st.name and st.name != default and st.name in names})  # `--study-name` studies
        for name in ([default] if default in names or not forks else []) + forks:
            rows, note, study_id = [], problem, ""
            n_complete: int | None = None
            if storage is not None and name not in names:
                note = f"no study of this name in {shown}"
            elif storage is not None:
                study = optuna.load_study(study_name=name, storage=storage)
                study_id = str(study.user_attrs.get(contract.STUDY_ID_ATTR, ""))
                complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                n_complete = len(complete)
                if n_complete < 2:
                    note = "fewer than 2 complete trials: importance needs at least 2"
                elif len({t.value for t in complete}) == 1:  # fANOVA raises "zero total variance"
                    note = "every complete trial has the same value: no variance for an importance to explain"
                else:
                    try:
                        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
                        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
                        rows = sorted(values.items(), key=lambda kv: (-round(kv[1], 12), kv[0]))
                        if not rows:
                            note = "no hyperparameter varied across the complete trials"
                    except Exception as exc:  # e.g. no parameter common to every trial
                        note = f"importance could not be computed: {contract.error_line(exc)}"
            trials_cell = NA if n_complete is None else str(n_complete)
            label = f"{name} ({study_id[:SHORT_ID]})" if study_id else name
            others = {st.study_id for st in logged if st.name == name and st.study_id} - {study_id}
            label_note = ""
            if others and n_complete is not None:
                label_note = ("the MLflow store also holds trials of other studies of this name (other ids: another "
                              f"storage); the importance is of the study in {shown}")
                label += " " + table.notes.mark(label_note)
            few = ""
            if rows and n_complete is not None and n_complete < MIN_IMPORTANCE_TRIALS:
                few = (f"fewer than {MIN_IMPORTANCE_TRIALS} complete trials: the fANOVA importance rests on too few "
                       "trials to rank hyperparameters reliably")
                trials_cell += " " + table.notes.mark(few)
            base = {**slot.keys, "study": name, "study_id": study_id, "n_complete": n_complete}
            for param, value in rows:  # every row of the study carries the study's notes
                table.add(slot.labels + [label, param, trials_cell, fmt(value, 3)],
                          {**base, "param": param, "importance": value, "note": "; ".join(
                              t for t in (label_note, few) if t)})
            if not rows:
                table.add(slot.labels + [label, DASH, trials_cell, f"{NA} " + table.notes.mark(note)],
                          {**base, "param": "", "importance": None, "note": note})
    return table


# ----------------------------------------------------------------------------- 6. significance
@dataclass
class SampleCorrectness:
    """Which test samples each final run of one dataset and backbone got right, on the samples
    common to all of them (from ``predictions.npz``)."""

    n_samples: int = 0
    correct: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (variant, seed) -> (N,) bool
    problems: list[str] = field(default_factory=list)  # notes for every row of the group


def sample_correctness(ctx: Context, runs: pd.DataFrame) -> SampleCorrectness:
    out = SampleCorrectness()
    loaded = []  # (variant, seed, index, label, pred), each sorted by sample index
    for variant, seed, run_id in zip(runs["variant"], runs["seed"], runs["run_id"]):
        data = ctx.artifacts.predictions(run_id)
        if seed is None or not data or not {"index", "label", "pred"} <= set(data):
            continue
        index = np.asarray(data["index"], dtype=np.int64).ravel()
        if len(np.unique(index)) != len(index):
            out.problems.append(f"a run's {contract.PREDICTIONS_ARTIFACT} repeats a sample index: left out")
            continue
        order = np.argsort(index, kind="stable")
        loaded.append((variant, int(seed), index[order], np.asarray(data["label"]).ravel()[order],
                       np.asarray(data["pred"]).ravel()[order]))
    if not loaded:
        return out
    common = loaded[0][2]
    for *_, index, _, _ in loaded[1:]:
        common = np.intersect1d(common, index, assume_unique=True)  # sorted
    if any(len(index) != len(common) for *_, index, _, _ in loaded):
        out.problems.append(f"the runs' test samples differ: only the {len(common)} sample indices common to all "
                            "runs are compared")
    labels = None
    for variant, seed, index, label, pred in loaded:
        at = np.searchsorted(index, common)  # (N,) positions of the common samples
        if labels is None:
            labels = label[at]
        elif not np.array_equal(labels, label[at]):
            out.problems.append("the runs disagree on the label of the same sample index (another test split?): "
                                "no per-sample comparison")
            out.correct.clear()
            return out
        out.correct[(variant, seed)] = pred[at] == label[at]
    out.n_samples = len(common)
    return out


@dataclass(eq=False)
class SignificanceRow:
    """One seed's comparison (``seed``), or the pooled one over a variant's seeds (``seed`` None).

    Accuracy and difference are kept per sample as integer numerators over a divisor (the
    number of seeds averaged), so the bootstrap's sums are exact."""

    seed: int | None
    n_seeds: int
    n_samples: int
    acc: tuple[np.ndarray, int] | None  # (N,) int: seeds right on each sample; divisor
    diff: tuple[np.ndarray, int] | None = None  # (N,) int: sum over seeds of (variant - baseline) right; divisor
    b: int | None = None
    c: int | None = None
    p: float = math.nan
    notes: list[str] = field(default_factory=list)  # texts of the row's notes
    acc_ci: tuple[float, float] = (math.nan, math.nan)
    diff_ci: tuple[float, float] = (math.nan, math.nan)
    p_holm: float = math.nan

    @property
    def pooled(self) -> bool:
        return self.seed is None

    @property
    def tested(self) -> bool:
        """A pooled test against the baseline: one member of Holm's family."""
        return self.pooled and self.b is not None

    @staticmethod
    def mean(stat: tuple[np.ndarray, int] | None) -> float:
        return math.nan if stat is None else float(stat[0].sum() / (len(stat[0]) * stat[1]))


def significance_slots(ctx: Context, table: Table) -> list[tuple[FinalSlot, list[SignificanceRow]]]:
    """Per (dataset, backbone, variant): a row per seed, then the pooled row (the baseline's rows
    carry only accuracy); with Holm's adjusted p over the pooled tests and the bootstrap
    intervals, one bootstrap per dataset and backbone (the same resamples for all its rows)."""
    groups: dict[tuple[str, str], SampleCorrectness] = {}
    out = []
    for slot in final_slots(ctx, table):
        if (slot.dataset, slot.backbone) not in groups:
            groups[(slot.dataset, slot.backbone)] = sample_correctness(
                ctx, group_runs(ctx.final, slot.dataset, slot.backbone))
        group = groups[(slot.dataset, slot.backbone)]
        own = {seed: x for (v, seed), x in group.correct.items() if v == slot.variant}
        base = {seed: x for (v, seed), x in group.correct.items() if v == "baseline"}
        if not own:
            lost = len(set(slot.runs["run_id"]) & ctx.artifacts.unreachable) if slot.n else 0
            why = [] if not slot.n else [
                f"the artifacts of {lost} of these runs were not found or could not be read (stderr names each run, "
                "where it was looked for and why): no per-sample test" if lost else
                f"no {contract.PREDICTIONS_ARTIFACT} in these runs (finished before per-sample predictions were "
                "logged): no per-sample test"]
            out.append((slot, [SignificanceRow(None, slot.n, 0, None, notes=group.problems + why)]))
            continue
        compare = slot.variant != "baseline"
        rows = []
        for seed in sorted(own):
            paired = compare and seed in base
            b, c = discordant(own[seed], base[seed]) if paired else (None, None)
            rows.append(SignificanceRow(seed, 1, group.n_samples, (own[seed].astype(np.int64), 1),
                                        (own[seed].astype(np.int64) - base[seed], 1) if paired else None, b, c,
                                        mcnemar_p(b, c) if paired else math.nan))
        pooled = SignificanceRow(None, len(own), group.n_samples,
                                 (np.sum([own[s] for s in sorted(own)], axis=0, dtype=np.int64), len(own)),
                                 notes=list(group.problems))
        common = sorted(set(own) & set(base)) if compare else []
        if compare and not base:
            pooled.notes.append(f"no baseline final run with a {contract.PREDICTIONS_ARTIFACT}: no McNemar test")
        elif compare and not common:
            pooled.notes.append("no seed in common with the baseline: no McNemar test")
        if common:
            pooled.b, pooled.c, pooled.p = stratified_mcnemar(discordant(own[s], base[s]) for s in common)
            pooled.diff = (np.sum([own[s].astype(np.int64) - base[s] for s in common], axis=0), len(common))
            if len(common) < len(own):
                pooled.notes.append(
                    "the pooled test and difference are over the seeds both this variant and the baseline have")
            setup = setup_difference(slot.runs, group_runs(ctx.final, slot.dataset, slot.backbone, "baseline"),
                                     "baseline")
            pooled.notes += [setup] if setup else []
            if len(common) < MIN_SEEDS:
                pooled.notes.append(
                    f"pooled over fewer than {MIN_SEEDS} seeds: the test and its interval are over test samples and "
                    f"say little about seed-to-seed variation; run {MIN_SEEDS} or more seeds")
        out.append((slot, rows + [pooled]))
    rows = [r for _, part in out for r in part]
    family = [r for r in rows if r.tested]
    for r, p in zip(family, holm([r.p for r in family])):
        r.p_holm = float(p)
    for key in groups:
        part = [r for slot, slot_rows in out if (slot.dataset, slot.backbone) == key for r in slot_rows]
        stats = [(r, "acc_ci", r.acc) for r in part if r.acc is not None]
        stats += [(r, "diff_ci", r.diff) for r in part if r.diff is not None]
        if stats:
            intervals = bootstrap_intervals(np.stack([s[0] for _, _, s in stats]), [s[1] for _, _, s in stats])
            for (r, name, _), (lo, hi) in zip(stats, intervals):
                setattr(r, name, (float(lo), float(hi)))
    return out


def significance(ctx: Context) -> Table:
    columns = ["Dataset", "Backbone", "Variant", "Seed", "Samples", "b / c", "McNemar p", "Holm p",
               "Top-1 (%) [95% CI]", "Δ vs baseline (pp) [95% CI]"]
    csv_columns = ["dataset", "backbone", "variant", "seed", "n_seeds", "n_samples", "b", "c", "mcnemar_p",
                   "mcnemar_p_holm", "acc", "acc_ci_low", "acc_ci_high", "diff_vs_baseline", "diff_ci_low",
                   "diff_ci_high", "note"]
    # the numbers first (Holm's family is the whole table); the notes are numbered while writing
    computed = significance_slots(ctx, Table("significance", "", columns, 4, csv_columns))
    table = Table(
        "significance", "Significance against the baseline on the same test samples", columns, label_columns=4,
        csv_columns=csv_columns,
        caption=f"Final runs' per-sample test predictions ({contract.PREDICTIONS_ARTIFACT}, last epoch), each "
                "variant paired with the baseline by seed on the same test samples. b: samples the variant gets "
                "right and the baseline wrong; c: the reverse. McNemar's exact test: p = binomtest(b, b + c, 1/2), "
                "two-sided (scipy). Pooled rows: the seeds are strata; b and c are summed over the seeds both have "
                "and one exact binomial test is run, an exact conditional test of no difference in any stratum (the "
                "strata share the test samples, which the test treats as independent). Holm p: Holm's step-down "
                f"correction over the {sum(r.tested for _, rows in computed for r in rows)} pooled test(s) of this "
                "table (every variant against the baseline, all datasets and backbones). 95% CI: percentile "
                f"bootstrap over test samples ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}: the same "
                "resamples for every row of a dataset, so intervals are paired across variants); a pooled row's "
                "accuracy and difference are means over its seeds.")
    for slot, (_, rows) in zip(final_slots(ctx, table), computed):
        seeds_notes = table.notes.take()  # the seeds cell's notes belong to the pooled row
        reference = slot.variant == "baseline"
        for r in rows:
            acc, diff = r.mean(r.acc), r.mean(r.diff)
            marks = "".join(" " + table.notes.mark(text) for text in r.notes)
            if r.acc is not None:
                acc_cell = f"{fmt(acc, 2, 100)} [{fmt(r.acc_ci[0], 2, 100)}, {fmt(r.acc_ci[1], 2, 100)}]"
            else:
                acc_cell = NA if slot.n else "no finished runs"
            if reference:
                diff_cell = DASH
            elif r.diff is not None:
                diff_cell = (f"{fmt(diff, 2, 100, sign=True)} [{fmt(r.diff_ci[0], 2, 100, sign=True)}, "
                             f"{fmt(r.diff_ci[1], 2, 100, sign=True)}]")
            else:
                diff_cell = NA
            cells = [(f"pooled ({slot.seeds})" if r.pooled else str(r.seed)) + marks,
                     str(r.n_samples) if r.n_samples else NA,
                     DASH if reference else (f"{r.b} / {r.c}" if r.b is not None else NA),
                     DASH if reference else fmt_pvalue(r.p),
                     DASH if reference or not r.pooled else fmt_pvalue(r.p_holm), acc_cell, diff_cell]
            note = "; ".join([t for t in ([seeds_notes] if r.pooled else []) + r.notes if t])
            table.notes.take()
            table.add(slot.labels + cells, {
                **slot.keys, "seed": "pooled" if r.pooled else r.seed, "n_seeds": r.n_seeds,
                "n_samples": r.n_samples, "b": r.b, "c": r.c, "mcnemar_p": r.p, "mcnemar_p_holm": r.p_holm,
                "acc": acc, "acc_ci_low": r.acc_ci[0], "acc_ci_high": r.acc_ci[1], "diff_vs_baseline": diff,
                "diff_ci_low": r.diff_ci[0], "diff_ci_high": r.diff_ci[1], "note": note})
    return table


def fmt_pvalue(p: float) -> str:
    """A p-value cell: three significant digits, ``<0.001`` below."""
    if p is None or not math.isfinite(p):
        return NA
    return "<0.001" if p < 0.001 else f"{p:.3f}"


# ----------------------------------------------------------------------------- command line
TABLES = (main_results, significance, confusable_pairs, reference_pairs, geometry, ablations, importance)


def build_context(runs: pd.DataFrame, expected_seeds: int | None, storage: str, client=None) -> Context:
    final = final_runs(runs)
    return Context(runs=runs, final=final.kept, duplicates=final.duplicates, other_configs=final.other_configs,
                   trials=study_trials(runs), variants=known_variants(runs), groups=dataset_groups(runs),
                   expected_seeds=expected_seeds, storage=storage, artifacts=Artifacts(client))


def build_tables(ctx: Context) -> list[Table]:
    return [make(ctx) for make in TABLES]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `carrot tables -- --flag ...` passes the separator through
        argv = argv[1:]
    parser = contract.ArgumentParser(prog="carrot tables", description=__doc__.splitlines()[0])
    add_store_arguments(parser)
    parser.add_argument("--storage", default=contract.DEFAULT_STORAGE,
                        help="Optuna storage for hyperparameter importance: a journal file or a URL "
                             "(default %(default)s)")
    parser.add_argument("--seeds", type=contract.int_argument(1), default=None,
                        help="seeds every variant should have (default: as many as the most-seeded variant)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    contract.remember_url(args.storage)
    client, runs = open_store(args, "carrot tables")
    if client is None:
        return 2
    if not len(runs):
        print(f"carrot tables: no runs in experiment {args.experiment!r}"
              + (" matching the filters" if args.dataset or args.backbone else "")
              + "; writing empty tables", file=sys.stderr)
    ctx = build_context(runs, args.seeds, args.storage, client)
    for table in build_tables(ctx):
        paths = write_table(table, args.out)
        print(f"{table.name}: {len(table)} rows -> " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
