"""The paper tables as a reader sees them, on a real MLflow store and a real Optuna journal in a
temporary folder: true minus signs, accuracy intervals kept inside [0, 100] with a note, every
number that rests on too few seeds or trials marked, D_B readable at any magnitude, and LaTeX
that compiles with ``pdflatex`` and fits the text width (compiled where ``pdflatex`` exists).

The runs are written with ``MlflowClient`` (the helpers of ``test_tables_identity``), so every
expected number is known in advance and recomputed here with NumPy and SciPy.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import md_rows, read_csv
from test_tables_identity import BACKBONE, Spec, Store, confusion_of, note_text, predictions

MINUS = "\u2212"
K = 10
# top-1 per seed: the baseline's 2-seed t-interval runs past 100%; barrier is worse than the
# baseline (negative differences); expansion has 3 seeds; prototype one.
ACC = {"baseline": {0: 0.95, 1: 0.99}, "barrier": {0: 0.90, 1: 0.92}, "expansion": {0: 0.50, 1: 0.51, 2: 0.52},
       "prototype": {0: 0.70}}
LAYERS = ("layer1", "layer2", "layer3", "layer4", "layer5")
DB_HUGE = 2.5e6  # D_B of the widest layer: shown as m×10ⁿ
NC1_TINY = 3.0e-5  # would show as 0.000
STUDY_ID = "0123456789abcdef"
TRIALS = ({"lr": 1e-3, "use_var": True}, {"lr": 3e-3, "use_var": False}, {"lr": 1e-2, "use_var": True})


def geometry_metrics(seed: int) -> dict[str, float]:
    metrics = {f"dB/{layer}/ref_mean": 2.0 * (n + 1) + 0.1 * seed for n, layer in enumerate(LAYERS[:-1])}
    metrics[f"dB/{LAYERS[-1]}/ref_mean"] = DB_HUGE * (1 + 0.01 * seed)
    metrics.update({f"probe/{layer}/acc": 0.5 + 0.01 * n for n, layer in enumerate(LAYERS)})
    metrics.update({"proto_cos/ref_mean": 0.4, "nc/nc1": NC1_TINY * (1 + seed)})
    return metrics


def write_journal(path: Path) -> None:
    """A barrier study with three complete trials: too few for a reliable fANOVA importance."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from carrot import contract

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(study_name=contract.study_name("digits", BACKBONE, "barrier"), storage=storage,
                                direction="maximize")
    study.set_user_attr(contract.STUDY_ID_ATTR, STUDY_ID)
    dists = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "use_var": CategoricalDistribution([True, False])}
    for n, params in enumerate(TRIALS):
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=0.5 + 0.1 * n))


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    store = Store(root / "store")
    labels = np.repeat(np.arange(K), 20)
    for variant, by_seed in ACC.items():
        for seed, acc in by_seed.items():
            rng = np.random.default_rng(100 * seed + len(variant))
            pred = predictions(labels, acc, rng, K, {0: 1, 1: 0})
            store.write(f"{variant}-{seed}", Spec(
                variant, seed, params={"optim.epochs": 3}, predictions=pred, confusion=confusion_of(pred, K, rng),
                metrics={"test/acc": acc, "pairs/top_error": 0.2, **geometry_metrics(seed)}))
    parent = store.write("study", Spec("barrier", None, role="study", split="val", study="s", study_id=STUDY_ID))
    assert parent
    for n, params in enumerate(TRIALS):
        store.write(f"trial-{n}", Spec(
            "barrier", 0, role="trial", split="val", config_hash=f"t{n}", study="s", study_id=STUDY_ID,
            parent="study", params={"variant.hparams.use_var": params["use_var"], "optim.lr": params["lr"]},
            metrics={"val/acc": 0.5 + 0.1 * n}))
    journal = root / "optuna.journal"
    write_journal(journal)
    out = store.tables(root / "out", "--storage", str(journal))
    return {"root": root, "store": store, "out": out}


def md_row(out: Path, table: str, **match) -> dict[str, str]:
    rows = [r for r in md_rows(out / f"{table}.md") if all(r[k] == v for k, v in match.items())]
    assert len(rows) == 1, (match, rows)
    return rows[0]


def csv_row(out: Path, table: str, **match) -> dict[str, str]:
    rows = [r for r in read_csv(out / f"{table}.csv") if all(r[k] == v for k, v in match.items())]
    assert len(rows) == 1, (match, rows)
    return rows[0]


def t_interval(values) -> tuple[float, float]:
    from scipy import stats

    x = np.asarray(values, float)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return x.mean() - half, x.mean() + half


# ----------------------------------------------------------------------------- minus signs
def test_negative_numbers_are_shown_with_a_true_minus_sign_and_stay_ascii_in_the_csv(paper):
    out = paper["out"]
    diff = np.mean([ACC["barrier"][s] - ACC["baseline"][s] for s in (0, 1)])
    assert diff < 0
    cell = md_row(out, "main_results", Variant="barrier")["Δ vs baseline (pp)"]
    assert cell.startswith(f"{MINUS}{abs(100 * diff):.2f} (")
    assert "-" not in cell.split(" (")[0]
    assert csv_row(out, "main_results", variant="barrier")["diff_vs_baseline"].startswith("-")
    for csv in sorted(out.glob("*.csv")):  # the ablations' "(all trials)" setting was an em dash
        assert csv.read_text(encoding="utf-8").isascii(), csv.name
    from analysis.tables import csv_setting, switch_value

    assert switch_value("delta", 0.5) == "≥ 0.1" and csv_setting(switch_value("delta", 0.5)) == ">= 0.1"
    # the significance table's differences and their bootstrap bounds too
    pooled = next(r for r in md_rows(out / "significance.md") if r["Variant"] == "barrier"
                  and r["Seed"].startswith("pooled"))
    assert pooled["Δ vs baseline (pp) [95% CI]"].startswith(MINUS)
    assert not re.search(r"(^|[\s\[(])-\d", (out / "significance.md").read_text())
    # LaTeX: a math minus, and no bare hyphen before a digit in any cell
    tex = (out / "main_results.tex").read_text()
    assert f"$-${abs(100 * diff):.2f} (" in tex
    for name in ("main_results", "significance"):
        body = [line for line in (out / f"{name}.tex").read_text().splitlines() if " & " in line]
        assert not any(re.search(r"(^|[\s\[(])-\d", line) for line in body), name


# ----------------------------------------------------------------------------- intervals
def test_an_accuracy_interval_past_100_is_clipped_with_a_note(paper):
    out = paper["out"]
    low, high = t_interval(list(ACC["baseline"].values()))
    assert high > 1.0, "the 2-seed t-interval runs past 100%"
    cell = md_row(out, "main_results", Variant="baseline")["95% CI"]
    assert cell.startswith(f"[{100 * low:.2f}, 100.00] [")
    texts = note_text(out / "main_results.md", cell)
    assert any("clipped to [0, 100]" in t for t in texts), texts
    # the CSV keeps the interval's true bounds
    row = csv_row(out, "main_results", variant="baseline")
    assert float(row["acc_ci_high"]) == pytest.approx(high, abs=1e-9) and "clipped" in row["note"]
    # an interval inside [0, 100] is not clipped and carries no such note
    e_low, e_high = t_interval(list(ACC["expansion"].values()))
    cell = md_row(out, "main_results", Variant="expansion")["95% CI"]
    assert cell == f"[{100 * e_low:.2f}, {100 * e_high:.2f}]"


# ----------------------------------------------------------------------------- too few seeds or trials
def test_intervals_and_tests_over_too_few_seeds_are_marked(paper):
    out = paper["out"]
    md = out / "main_results.md"
    two = note_text(md, md_row(out, "main_results", Variant="baseline")["95% CI"])
    assert any("95% t-interval over 2 seeds" in t and "t = 12.71" in t for t in two), two
    one = md_row(out, "main_results", Variant="prototype")["95% CI"]
    assert one.startswith("n/a [") and any("one seed" in t for t in note_text(md, one))
    # a paired t-test over two seeds
    delta = md_row(out, "main_results", Variant="barrier")["Δ vs baseline (pp)"]
    assert any("paired t-test over fewer than 3 seeds" in t for t in note_text(md, delta))
    # significance pooled over two seeds
    sig = out / "significance.md"
    pooled = next(r for r in md_rows(sig) if r["Variant"] == "barrier" and r["Seed"].startswith("pooled"))
    assert any("pooled over fewer than 3 seeds" in t for t in note_text(sig, pooled["Seed"]))
    assert "pooled over fewer than 3 seeds" in csv_row(out, "significance", variant="barrier", seed="pooled")["note"]


def test_importance_and_ablations_from_too_few_trials_are_marked(paper):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    out = paper["out"]
    study = optuna.load_study(study_name=f"digits-{BACKBONE}-barrier",
                              storage=JournalStorage(JournalFileBackend(str(paper["root"] / "optuna.journal"))))
    expected = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    rows = [r for r in md_rows(out / "importance.md") if r["Variant"] == "barrier"]
    assert {r["Hyperparameter"] for r in rows} == set(expected)
    for r in rows:
        assert r["Complete trials"].startswith("3 [")
        assert any("fewer than 10 complete trials" in t for t in note_text(out / "importance.md", r["Complete trials"]))
    assert all("fewer than 10 complete trials" in r["note"] for r in read_csv(out / "importance.csv")
               if r["variant"] == "barrier")
    # ablations: each use_var setting has 1 or 2 of the 3 trials; all trials together 3
    abl = out / "ablations.md"
    got = {r["Setting"]: r["Trials"] for r in md_rows(abl) if r["Variant"] == "barrier" and r["Switch"] == "use_var"}
    assert set(got) == {"True", "False"}
    for trials in got.values():
        assert any("fewer than 3 trials" in t for t in note_text(abl, trials)), trials
    everything = next(r for r in md_rows(abl) if r["Variant"] == "barrier" and r["Switch"] == "(all trials)")
    assert everything["Trials"] == "3"


# ----------------------------------------------------------------------------- D_B readable
def test_db_and_tiny_values_stay_readable(paper):
    out = paper["out"]
    row = md_row(out, "geometry", Variant="baseline")
    huge = [DB_HUGE * (1 + 0.01 * s) for s in (0, 1)]
    mean, std = np.mean(huge), np.std(huge, ddof=1)
    exp_m = int(math.floor(math.log10(mean)))
    assert exp_m == 6
    assert row[f"D_B {LAYERS[-1]} (ref)"] == f"({mean / 1e6:.2f} ± {std / 1e6:.2f})×10⁶"
    nc1 = [NC1_TINY * (1 + s) for s in (0, 1)]
    assert row["NC1"] == f"({np.mean(nc1) * 1e5:.2f} ± {np.std(nc1, ddof=1) * 1e5:.2f})×10⁻⁵"
    assert row[f"D_B {LAYERS[0]} (ref)"] == f"{np.mean([2.0, 2.1]):.2f} ± {np.std([2.0, 2.1], ddof=1):.2f}"
    # one seed: the mean alone in m×10ⁿ
    one = md_row(out, "geometry", Variant="prototype")
    assert one[f"D_B {LAYERS[-1]} (ref)"] == f"{DB_HUGE / 1e6:.2f}×10⁶ ± n/a"
    assert one["NC1"] == f"{NC1_TINY * 1e5:.2f}×10⁻⁵ ± n/a"
    assert "0.000 ± 0.000" not in (out / "geometry.md").read_text()
    assert f"D_B {LAYERS[0]} (ref)" in row and not any(c.startswith(("rho", "ρ")) for c in row)
    # the CSV keeps the plain numbers
    got = csv_row(out, "geometry", variant="baseline")
    assert float(got[f"dB/{LAYERS[-1]}/ref_mean:mean"]) == pytest.approx(mean, rel=1e-9)
    assert float(got["nc/nc1:mean"]) == pytest.approx(np.mean(nc1), rel=1e-9)
    # LaTeX writes the power of ten in math mode
    tex = (out / "geometry.tex").read_text()
    assert rf"$\times 10^{{{exp_m}}}$" in tex and r"$\times 10^{-5}$" in tex and "×" not in tex


# ----------------------------------------------------------------------------- LaTeX
def latex_body(text: str) -> list[str]:
    """The lines LaTeX reads (comments dropped)."""
    return [line for line in text.splitlines() if not line.startswith("%")]


def test_latex_is_ascii_with_code_in_typewriter_and_every_tabular_fitted(paper):
    from analysis.tables import LATEX_FIT

    for path in sorted(paper["out"].glob("*.tex")):
        body = latex_body(path.read_text())
        bad = sorted({ch for line in body for ch in line if ord(ch) > 127})
        assert not bad, (path.name, bad)  # pdflatex would stop at an unmapped character
        assert not any("`" in line for line in body), path.name  # a backtick is set as a quote
        fitted = [line for line in body if line.endswith(LATEX_FIT)]
        tabulars = [line for line in body if line.startswith(r"\begin{tabular}{")]
        assert tabulars and len(fitted) == len(tabulars), path.name
    # the note's command in typewriter, not between backticks (which LaTeX sets as two opening quotes)
    assert "run `make study VARIANT=<variant>`" in (paper["out"] / "ablations.md").read_text()
    assert r"run \texttt{make study VARIANT=$<$variant$>$}" in (paper["out"] / "ablations.tex").read_text()


def test_a_wide_table_is_split_into_panels_that_repeat_the_labels(paper):
    tex = (paper["out"] / "geometry.tex").read_text()
    panels = [line for line in tex.splitlines() if line.startswith(r"\begin{tabular}{")]
    assert len(panels) >= 2, "15 columns do not fit one readable panel"
    headers = [line for line in tex.splitlines() if line.startswith("Dataset & Backbone & Variant & ")]
    assert len(headers) == len(panels)
    # every value column is in exactly one panel, in order
    md_header = list(md_rows(paper["out"] / "geometry.md")[0])
    specs = [re.match(r"\\begin\{tabular\}\{(l*)(r+)\}", line).groups() for line in panels]
    assert all(labels == "lll" for labels, _ in specs)
    assert sum(len(values) for _, values in specs) == len(md_header) - 3
    assert headers[0].startswith("Dataset & Backbone & Variant & Seeds & ")
    rows = [line for line in tex.splitlines() if line.startswith("digits & ")]
    assert len(rows) == len(panels) * len(md_rows(paper["out"] / "geometry.md"))


PDFLATEX = shutil.which("pdflatex")


@pytest.mark.skipif(PDFLATEX is None, reason="pdflatex is not installed")
def test_every_table_compiles_with_pdflatex_and_fits_the_text_width(paper, tmp_path):
    from analysis.tables import LATEX_PACKAGES

    names = sorted(p.stem for p in paper["out"].glob("*.tex"))
    assert len(names) == 7, names
    for name in names:
        shutil.copy(paper["out"] / f"{name}.tex", tmp_path / f"{name}.tex")
        doc = tmp_path / f"doc-{name}.tex"
        doc.write_text("\\documentclass{article}\n\\usepackage{" + ",".join(LATEX_PACKAGES) + "}\n"
                       "\\begin{document}\n\\input{" + name + "}\n\\end{document}\n")
        done = subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        log = (tmp_path / f"doc-{name}.log").read_text(errors="replace")
        assert done.returncode == 0, (name, log[-3000:])
        assert "Overfull \\hbox" not in log, (name, re.findall(r"Overfull \\hbox.*", log))
        assert not re.search(r"^! ", log, flags=re.M), name
        assert "Missing character" not in log, name
        assert (tmp_path / f"doc-{name}.pdf").stat().st_size > 1000


def test_importance_covers_a_study_started_with_its_own_name(tmp_path):
    """`carrot study --study-name fork` trials were in the ablations table while the importance
    table looked only for <dataset>-<backbone>-<variant> and said "no study of this name"."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from carrot import contract

    store = Store(tmp_path / "store")
    parent = store.write("study", Spec("barrier", None, role="study", split="val", study="fork", study_id=STUDY_ID))
    for n, params in enumerate(TRIALS):
        store.write(f"trial-{n}", Spec(
            "barrier", 0, role="trial", split="val", config_hash=f"t{n}", study="fork", study_id=STUDY_ID,
            parent="study", params={"variant.hparams.use_var": params["use_var"], "optim.lr": params["lr"]},
            metrics={"val/acc": 0.5 + 0.1 * n}))
    assert parent
    journal = tmp_path / "optuna.journal"
    study = optuna.create_study(study_name="fork", storage=JournalStorage(JournalFileBackend(str(journal))),
                                direction="maximize")
    study.set_user_attr(contract.STUDY_ID_ATTR, STUDY_ID)
    dists = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "use_var": CategoricalDistribution([True, False])}
    for n, params in enumerate(TRIALS):
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=0.5 + 0.1 * n))
    out = store.tables(tmp_path / "out", "--storage", str(journal))
    rows = [r for r in read_csv(out / "importance.csv") if r["variant"] == "barrier"]
    expected = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    assert {r["param"]: float(r["importance"]) for r in rows} == pytest.approx(expected, abs=1e-9)
    assert {r["study"] for r in rows} == {"fork"} and all(r["n_complete"] == "3" for r in rows)
