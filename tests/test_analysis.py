"""analysis/ end to end on a real MLflow store and a real Optuna journal in a temporary folder.

The module's fixture trains tiny real runs with carrot's own training loop: two final runs
(split=test, two seeds) of ``baseline`` and of ``barrier``, and a two-trial ``barrier``
study (split=val). Every number a test checks is recomputed from MlflowClient or Optuna
directly, never from analysis/.
"""
from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import md_rows, read_csv

from conftest import REPO, module_store, tiny_config

pytestmark = pytest.mark.slow

DATASET, BACKBONE = "digits", "test_resnet"
VARIANTS = ("baseline", "barrier")
SEEDS = (0, 1)
TABLES = ("main_results", "significance", "confusable_pairs", "reference_pairs", "geometry", "ablations", "importance")
PLOTS = ("confusion_concentration.png", "proto_cos_ref.png", "pair_error_vs_baseline.png", "db_per_layer.png",
         "probe_per_layer.png", "variant_stats_barrier.png")
# Small enough that the whole fixture trains in well under a minute on two shared cores.
TINY = {"optim.epochs": 2, "data.limit_per_class": 30, "eval.probe_max_train": 100, "data.batch_size": 32}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with 2 variants x 2 final seeds and a 2-trial barrier study, tables and plots built once."""
    from carrot.study import run_study
    from carrot.train import run

    root = tmp_path_factory.mktemp("analysis_store")
    with module_store(root) as (uri, client):
        final_ids: dict[tuple[str, int], str] = {}
        for variant in VARIANTS:  # baseline first: the later runs score its reference pairs
            for seed in SEEDS:
                cfg = tiny_config(**{"variant.name": variant, "split": "test", "seed": seed, **TINY})
                result = run(cfg, run_name=f"final-{variant}-s{seed}", log=lambda s: None)
                client.set_tag(result.run_id, "carrot.role", "final")
                client.set_tag(result.run_id, "carrot.study", f"{DATASET}-{BACKBONE}-{variant}")
                final_ids[(variant, seed)] = result.run_id
        summary = run_study(tiny_config(**{"variant.name": "barrier", **TINY}), trials=2, log=lambda s: None)
        assert summary.n_complete == 2, summary

        from analysis import plots, tables

        out = root / "out"
        assert tables.main(["--out", str(out)]) == 0
        assert plots.main(["--out", str(out)]) == 0
        yield {"root": root, "uri": uri, "client": client, "out": out, "final": final_ids}


# ----------------------------------------------------------------------------- helpers
def row(rows: list[dict[str, str]], **match) -> dict[str, str]:
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


def last_epoch(client, run_id: str, key: str) -> float:
    """The value at the highest step, read from the metric's full history."""
    history = client.get_metric_history(run_id, key)
    assert history, (run_id, key)
    return max(history, key=lambda m: (m.step, m.timestamp)).value


def final_values(st, variant: str, key: str) -> dict[int, float]:
    return {seed: last_epoch(st["client"], st["final"][(variant, seed)], key) for seed in SEEDS}


def val_trials(st) -> list:
    exp = st["client"].get_experiment_by_name("carrot")
    runs = st["client"].search_runs([exp.experiment_id], "tags.`carrot.split` = 'val'")
    return [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get("carrot.role") != "study"]


def copy_store(st, dest: Path) -> str:
    """A copy of the sqlite store (artifacts stay where they are); returns its URI."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(st["root"] / "mlruns" / "mlflow.db", dest / "mlflow.db")
    return f"sqlite:///{dest / 'mlflow.db'}"


# ----------------------------------------------------------------------------- tables
def test_every_table_is_written_in_three_formats(store):
    for name in TABLES:
        md = (store["out"] / f"{name}.md").read_text()
        tex = (store["out"] / f"{name}.tex").read_text()
        rows = read_csv(store["out"] / f"{name}.csv")
        assert md.startswith("## ") and "\n| Dataset | Backbone |" in md, name
        for rule in (r"\begin{tabular}", r"\toprule", r"\midrule", r"\bottomrule", r"\end{tabular}"):
            assert rule in tex, (name, rule)
        assert "±" not in tex and "_resnet" not in tex.replace(r"\_resnet", ""), "LaTeX special characters escaped"
        assert rows, name
        if name == "reference_pairs":  # one row per pair of the dataset, not per variant
            assert {(r["dataset"], r["backbone"]) for r in rows} == {(DATASET, BACKBONE)}
            continue
        assert {r["variant"] for r in rows} == set(VARIANTS), name
        # baseline first, then the others
        assert [r["Variant"] for r in md_rows(store["out"] / f"{name}.md")][0] == "baseline"


def test_main_results_cells_equal_the_runs_metrics(store):
    from scipy import stats

    csv_rows = read_csv(store["out"] / "main_results.csv")
    md = md_rows(store["out"] / "main_results.md")
    assert [r["variant"] for r in csv_rows] == ["baseline", "barrier"]
    for variant in VARIANTS:
        acc = np.array(list(final_values(store, variant, "test/acc").values()))
        mca = np.array(list(final_values(store, variant, "test/mean_class_acc").values()))
        c = row(csv_rows, variant=variant)
        assert int(c["n_seeds"]) == 2 and c["seeds"] == "0 1"
        assert float(c["acc_mean"]) == pytest.approx(acc.mean(), abs=1e-9)
        assert float(c["acc_std"]) == pytest.approx(acc.std(ddof=1), abs=1e-9)
        half = stats.t.ppf(0.975, 1) * acc.std(ddof=1) / math.sqrt(2)
        assert float(c["acc_ci_low"]) == pytest.approx(acc.mean() - half, abs=1e-9)
        assert float(c["acc_ci_high"]) == pytest.approx(acc.mean() + half, abs=1e-9)
        assert float(c["mean_class_acc_mean"]) == pytest.approx(mca.mean(), abs=1e-9)
        m = row(md, Variant=variant)
        assert m["Seeds"] == "2"
        assert m["Top-1 (%)"] == f"{100 * acc.mean():.2f} ± {100 * acc.std(ddof=1):.2f}"
        # the interval as shown: clipped to [0, 100], true minus signs, and marked as resting on 2 seeds
        low, high = max(acc.mean() - half, 0.0), min(acc.mean() + half, 1.0)
        shown = f"[{100 * low:.2f}, {100 * high:.2f}]".replace("-", "\u2212")
        assert m["95% CI"].startswith(shown + " [")
        text = (store["out"] / "main_results.md").read_text()
        assert "95% t-interval over 2 seeds" in text
        if (low, high) != (acc.mean() - half, acc.mean() + half):
            assert "shown clipped to [0, 100]" in text
        assert m["Mean class acc. (%)"] == f"{100 * mca.mean():.2f} ± {100 * mca.std(ddof=1):.2f}"


def test_paired_difference_to_baseline_by_hand(store):
    from scipy import stats

    base = final_values(store, "baseline", "test/acc")
    barrier = final_values(store, "barrier", "test/acc")
    d = np.array([barrier[s] - base[s] for s in SEEDS])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    p = 2 * stats.t.sf(abs(t), len(d) - 1)
    c = row(read_csv(store["out"] / "main_results.csv"), variant="barrier")
    assert float(c["diff_vs_baseline"]) == pytest.approx(d.mean(), abs=1e-9)
    assert float(c["p_vs_baseline"]) == pytest.approx(p, rel=1e-9)
    assert c["n_paired_vs_baseline"] == "2"
    cell = row(md_rows(store["out"] / "main_results.md"), Variant="barrier")["Δ vs baseline (pp)"]
    p_text = "p<0.001" if p < 0.001 else f"p={p:.3f}"
    assert cell.startswith(f"{100 * d.mean():+.2f} ({p_text}, n=2) [".replace("-", "\u2212"))
    assert "paired t-test over fewer than 3 seeds" in (store["out"] / "main_results.md").read_text()
    # the reference row compares with nothing; no pairwise_confusion run exists: said, not zero
    assert row(md_rows(store["out"] / "main_results.md"), Variant="baseline")["Δ vs baseline (pp)"] == "—"
    pc = row(md_rows(store["out"] / "main_results.md"), Variant="barrier")["Δ vs PC (pp)"]
    assert pc.startswith("n/a [")
    assert "no finished final run of pairwise_confusion" in (store["out"] / "main_results.md").read_text()


def last_confusion(st, variant: str, seed: int) -> np.ndarray:
    with np.load(st["client"].download_artifacts(st["final"][(variant, seed)], "confusion.npz")) as data:
        return data["confusion"][-1].astype(float)


def test_pairs_and_geometry_cells_equal_the_runs_metrics(store):
    pairs = read_csv(store["out"] / "confusable_pairs.csv")
    geometry = read_csv(store["out"] / "geometry.csv")
    client = store["client"]
    metrics = client.get_run(store["final"][("baseline", 0)]).data.metrics
    layers = sorted({k.split("/")[1] for k in metrics if k.endswith("/ref_mean") and k.startswith("dB/")
                     or k.endswith("/ref_distance") and k.startswith("bhattacharyya/")})
    assert layers, "the runs log D_B per layer"
    db = {layer: (f"dB/{layer}/ref_mean" if f"dB/{layer}/ref_mean" in metrics
                  else f"bhattacharyya/{layer}/ref_distance") for layer in layers}
    for variant in VARIANTS:
        for key, column, table in (("pairs/top_error", "top_error_mean", pairs),
                                   ("proto_cos/ref_mean", "proto_cos/ref_mean:mean", geometry),
                                   ("nc/nc1", "nc/nc1:mean", geometry),
                                   ("probe/embedding/acc", "probe/embedding/acc:mean", geometry),
                                   *[(db[layer], f"dB/{layer}/ref_mean:mean", geometry) for layer in layers]):
            values = np.array(list(final_values(store, variant, key).values()))
            assert float(row(table, variant=variant)[column]) == pytest.approx(values.mean(), rel=1e-9, abs=1e-9), key
    # the reference pairs: the top pairs (S > 0, at most 20) of the baseline's pooled last-epoch confusion,
    # and every run re-scored on them from its confusion.npz
    pooled = sum(last_confusion(store, "baseline", seed) for seed in SEEDS)
    n = pooled.sum(axis=1)
    scored = sorted((-(pooled[i, j] / n[i] + pooled[j, i] / n[j]) / 2, i, j)
                    for i in range(len(pooled)) for j in range(i + 1, len(pooled)))
    ref = [(i, j) for s, i, j in scored if s < 0][:20]
    listed = [(int(r["i"]), int(r["j"])) for r in read_csv(store["out"] / "reference_pairs.csv")]
    assert listed == ref and ref
    for variant in VARIANTS:
        errors = []
        for seed in SEEDS:
            cm = last_confusion(store, variant, seed)
            errors.append(np.mean([(cm[i, j] + cm[j, i]) / (cm[i].sum() + cm[j].sum()) for i, j in ref]))
        got = row(pairs, variant=variant)
        assert float(got["ref_error_mean"]) == pytest.approx(np.mean(errors), abs=1e-9)
        assert int(got["n_ref_pairs"]) == len(ref)
        cell = row(md_rows(store["out"] / "confusable_pairs.md"), Variant=variant)["Ref-pair error (%)"]
        assert cell.startswith(f"{100 * np.mean(errors):.2f} ± {100 * np.std(errors, ddof=1):.2f}")


def test_significance_cells_equal_mcnemar_on_the_runs_predictions(store):
    from scipy.stats import binomtest

    client = store["client"]
    rows = [r for r in read_csv(store["out"] / "significance.csv") if r["variant"] == "barrier"]
    pooled = row(rows, seed="pooled")
    names = {a.path for a in client.list_artifacts(store["final"][("barrier", 0)])}
    if "predictions.npz" not in names:  # runs of a training side that does not log predictions yet
        assert pooled["b"] == "" and "no predictions.npz" in pooled["note"]
        return
    right = {}
    for key, run_id in store["final"].items():
        with np.load(client.download_artifacts(run_id, "predictions.npz")) as data:
            order = np.argsort(data["index"])
            right[key] = (data["pred"] == data["label"])[order]
    b = [int((right[("barrier", s)] & ~right[("baseline", s)]).sum()) for s in SEEDS]
    c = [int((~right[("barrier", s)] & right[("baseline", s)]).sum()) for s in SEEDS]
    for seed, bs, cs in zip(SEEDS, b, c):
        got = row(rows, seed=str(seed))
        assert (int(got["b"]), int(got["c"])) == (bs, cs)
        want = binomtest(bs, bs + cs, 0.5).pvalue if bs + cs else 1.0
        assert float(got["mcnemar_p"]) == pytest.approx(want, rel=1e-9)
    assert (int(pooled["b"]), int(pooled["c"])) == (sum(b), sum(c))
    want = binomtest(sum(b), sum(b) + sum(c), 0.5).pvalue if sum(b) + sum(c) else 1.0
    assert float(pooled["mcnemar_p"]) == pytest.approx(want, rel=1e-9)
    assert float(pooled["mcnemar_p_holm"]) == pytest.approx(want, rel=1e-9), "one test: Holm changes nothing"
    acc = np.mean([right[("barrier", s)].mean() for s in SEEDS])
    assert float(pooled["acc"]) == pytest.approx(acc, abs=1e-9)
    assert float(pooled["acc"]) == pytest.approx(np.mean(list(final_values(store, "barrier", "test/acc").values())),
                                                 abs=1e-6), "predictions.npz agrees with test/acc"


def test_ablation_groups_match_the_study_trials(store):
    trials = [r for r in val_trials(store) if r.data.tags["carrot.variant"] == "barrier"]
    assert len(trials) == 2
    rows = read_csv(store["out"] / "ablations.csv")
    for switch in ("use_var", "use_rank", "data.sampler"):
        groups: dict[str, list[float]] = {}
        for r in trials:
            groups.setdefault(r.data.params[switch if "." in switch else f"variant.hparams.{switch}"], []).append(
                last_epoch(store["client"], r.info.run_id, "val/acc"))
        got = {r["setting"]: r for r in rows if r["variant"] == "barrier" and r["switch"] == switch}
        assert set(got) == set(groups), switch
        for setting, values in groups.items():
            assert int(got[setting]["n_trials"]) == len(values)
            assert float(got[setting]["val_acc_mean"]) == pytest.approx(np.mean(values), abs=1e-9)
    everything = row([r for r in rows if r["variant"] == "barrier"], switch="(all trials)")
    assert int(everything["n_trials"]) == 2
    # the baseline has no study here: its row says so instead of disappearing
    assert row(md_rows(store["out"] / "ablations.md"), Variant="baseline")["Val top-1 (%)"].startswith(
        "no finished trials [")


def test_importance_equals_optuna_on_the_journal(store):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(store["root"] / "studies" / "optuna.journal")))
    study = optuna.load_study(study_name=f"{DATASET}-{BACKBONE}-barrier", storage=storage)
    rows = read_csv(store["out"] / "importance.csv")
    base = row(rows, variant="baseline")
    assert base["importance"] == "" and "no study of this name" in base["note"]
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    if len({t.value for t in study.trials}) == 1:  # the two trials tied (it depends on the CPU's kernels)
        with pytest.raises(RuntimeError, match="zero total variance"):
            optuna.importance.get_param_importances(study, evaluator=evaluator)
        assert "every complete trial has the same value" in row(rows, variant="barrier")["note"]
        return
    expected = optuna.importance.get_param_importances(study, evaluator=evaluator)
    got = {r["param"]: float(r["importance"]) for r in rows if r["variant"] == "barrier"}
    assert set(got) == set(expected) and got
    for param, value in expected.items():
        assert got[param] == pytest.approx(value, abs=1e-9), param
    assert all(r["n_complete"] == "2" for r in rows if r["variant"] == "barrier")


def test_tables_are_byte_identical_when_rebuilt(store, tmp_path):
    from analysis import tables
    from carrot.cli import main as carrot_main

    # the fixture's arguments again (its environment and working folder are still in place):
    # in this process, through `carrot tables`, and in a fresh process with another hash seed
    assert Path.cwd() == store["root"]
    assert tables.main(["--out", str(tmp_path / "again")]) == 0
    assert carrot_main(["tables"]) == 0  # what `make tables` runs: default --out analysis/output
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "analysis.tables", "--out", str(tmp_path / "fresh")],
                          cwd=store["root"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for build in (tmp_path / "again", store["root"] / "analysis" / "output", tmp_path / "fresh"):
        for name in TABLES:
            for ext in ("md", "tex", "csv"):
                first = (store["out"] / f"{name}.{ext}").read_bytes()
                assert (build / f"{name}.{ext}").read_bytes() == first, (build, f"{name}.{ext}")


def test_fewer_seeds_than_expected_are_noted(store, tmp_path):
    from analysis import tables

    assert tables.main(["--out", str(tmp_path), "--tracking-uri", store["uri"], "--seeds", "3"]) == 0
    md = (tmp_path / "main_results.md").read_text()
    for variant in VARIANTS:
        assert row(md_rows(tmp_path / "main_results.md"), Variant=variant)["Seeds"].startswith("2 of 3 [")
    assert "fewer seeds than expected (--seeds)" in md
    assert {r["n_expected"] for r in read_csv(tmp_path / "main_results.csv")} == {"3"}


def test_failed_and_missing_runs_are_shown_not_dropped(store, tmp_path):
    from analysis import tables

    uri = copy_store(store, tmp_path / "store")
    copy = _client(uri)
    copy.set_terminated(store["final"][("barrier", 1)], "FAILED")
    out = tmp_path / "one_seed"
    assert tables.main(["--out", str(out), "--tracking-uri", uri]) == 0
    barrier = row(md_rows(out / "main_results.md"), Variant="barrier")
    assert barrier["Seeds"].startswith("1 of 2 [")
    value = final_values(store, "barrier", "test/acc")[0]
    assert barrier["Top-1 (%)"] == f"{100 * value:.2f} ± n/a" and barrier["95% CI"].startswith("n/a [")
    assert barrier["Δ vs baseline (pp)"].startswith("n/a [")
    text = (out / "main_results.md").read_text()
    assert "fewer seeds than expected" in text and "fewer than 2 seeds in common" in text
    assert "one seed: no interval" in text
    assert row(read_csv(out / "main_results.csv"), variant="barrier")["diff_vs_baseline"] == ""

    copy.set_terminated(store["final"][("barrier", 0)], "FAILED")
    out = tmp_path / "no_seed"
    assert tables.main(["--out", str(out), "--tracking-uri", uri]) == 0
    barrier = row(md_rows(out / "main_results.md"), Variant="barrier")
    assert barrier["Seeds"].startswith("0 of 2 [") and barrier["Top-1 (%)"] == "no finished runs"
    assert row(md_rows(out / "geometry.md"), Variant="barrier")["Seeds"].startswith("0 of 2 [")
    assert "no finished final (test-split) run of this variant" in (out / "main_results.md").read_text()
    # the baseline's numbers did not change
    assert row(md_rows(out / "main_results.md"), Variant="baseline") == row(
        md_rows(store["out"] / "main_results.md"), Variant="baseline")


def test_missing_store_is_a_clear_error(tmp_path, capsys):
    from analysis import tables

    uri = f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}"
    assert tables.main(["--out", str(tmp_path / "o"), "--tracking-uri", uri]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists(), "reading never creates a store"


# ----------------------------------------------------------------------------- plots
def test_every_plot_is_a_real_png(store):
    import matplotlib.image as mpimg

    folder = store["out"] / "plots" / f"{DATASET}-{BACKBONE}"
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(PLOTS)
    for name in PLOTS:
        path = folder / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert path.stat().st_size > 10_000, name
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200, (name, image.shape)
        assert float(image[..., :3].std()) > 0.01, f"{name} is blank"


def test_plots_skip_absent_data_with_a_note(store, tmp_path, capsys):
    from analysis import plots

    uri = copy_store(store, tmp_path / "store")
    copy = _client(uri)
    for seed in SEEDS:
        copy.set_terminated(store["final"][("baseline", seed)], "FAILED")
    assert plots.main(["--out", str(tmp_path / "o"), "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "skipped pair error vs baseline: no baseline runs" in out
    assert (tmp_path / "o" / "plots" / f"{DATASET}-{BACKBONE}" / "variant_stats_barrier.png").is_file()
    # no final run at all: the study trials are drawn and the title says so
    for seed in SEEDS:
        copy.set_terminated(store["final"][("barrier", seed)], "FAILED")
    assert plots.main(["--out", str(tmp_path / "val"), "--tracking-uri", uri]) == 0
    assert (tmp_path / "val" / "plots" / f"{DATASET}-{BACKBONE}" / "proto_cos_ref.png").is_file()
    capsys.readouterr()
    assert plots.main(["--out", str(tmp_path / "x"), "--tracking-uri", uri, "--experiment", "nope"]) == 2
    assert "carrot plots: error: --experiment nope: no such experiment in the store" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_plot_sources_say_which_split(store):
    from analysis.common import connect, load_runs, plot_source

    runs = load_runs(connect(store["uri"]), "carrot")
    chosen, split, words = plot_source(runs, DATASET, BACKBONE)
    assert split == "test" and "final runs" in words
    assert sorted(chosen["run_id"]) == sorted(store["final"].values())


# ----------------------------------------------------------------------------- the boundary
ANALYSIS_MODULES = ["analysis"] + sorted(f"analysis.{p.stem}" for p in (REPO / "analysis").glob("*.py")
                                         if p.stem != "__init__")
# In a fresh interpreter: import, then list every carrot module and every top-level package loaded.
BOUNDARY_PROBE = """
import sys
before = set(sys.modules)
import {modules}
carrot = sorted(m for m in sys.modules if m == "carrot" or m.startswith("carrot."))
assert set(carrot) <= {{"carrot", "carrot.contract"}}, "analysis imports carrot beyond carrot.contract: %s" % carrot
packages = {{m.split(".")[0] for m in set(sys.modules) - before}}
print(" ".join(sorted(packages - set(sys.stdlib_module_names))))
"""


def _import_fresh(*modules: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", BOUNDARY_PROBE.format(modules=", ".join(modules))], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def test_analysis_imports_carrot_contract_and_nothing_else_of_carrot():
    assert {"analysis.common", "analysis.tables", "analysis.plots"} <= set(ANALYSIS_MODULES)
    done = _import_fresh(*ANALYSIS_MODULES)
    assert done.returncode == 0, done.stderr
    # carrot.contract is what crosses the boundary, so it must not pull the training stack in:
    # the standard library and NumPy only
    done = _import_fresh("carrot.contract")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["carrot", "numpy"], done.stdout
    # the probe catches a breach: the same imports plus one training module fail
    done = _import_fresh(*ANALYSIS_MODULES, "carrot.diagnostics")
    assert done.returncode != 0 and "beyond carrot.contract" in done.stderr and "carrot.diagnostics" in done.stderr


# ----------------------------------------------------------------------------- pure helpers
def test_confusion_concentration_and_pair_error_by_hand():
    from analysis.common import confusion_concentration
    from carrot.contract import pair_error

    cm = np.array([[5, 3, 1, 0],
                   [0, 6, 0, 0],
                   [2, 2, 4, 4],
                   [0, 0, 0, 9]])
    # rows with errors: 0 (off 3,1,0 -> 4) and 2 (off 2,2,4 -> 8)
    got = confusion_concentration(cm, (1, 3))
    assert got[1] == pytest.approx((3 / 4 + 4 / 8) / 2)
    assert got[3] == pytest.approx(1.0)
    assert math.isnan(confusion_concentration(np.eye(3) * 5, (1,))[1])
    # e_ij = (C_ij + C_ji) / (n_i + n_j); n = row sums 9, 6, 12, 9
    np.testing.assert_allclose(pair_error(cm, [(0, 1), (0, 2), (2, 3)]), [3 / 15, 3 / 21, 4 / 21])


def test_variant_order_and_switch_bins():
    from analysis.common import order_variants
    from analysis.tables import ABLATION_SWITCHES, COMMON_SWITCHES, SWITCH_BINS, switch_value
    from carrot.variants import get_variant_class

    assert order_variants(["prototype", "barrier", "", "pairwise_confusion", "baseline", "barrier"]) == [
        "baseline", "pairwise_confusion", "barrier", "prototype"]
    assert [switch_value("delta", v) for v in ("0.01", "0.05", "0.1", "0.3")] == [
        "< 0.03", "[0.03, 0.1)", "≥ 0.1", "≥ 0.1"]
    assert switch_value("union", "True") == "True"
    # every switch the ablation table groups by is a hyperparameter the variant really declares
    # (a switch it does not have would silently drop out of the table)
    from carrot.config import RunConfig
    from carrot.tracking import flatten

    config_keys = set(flatten("", RunConfig().to_dict()))
    assert set(COMMON_SWITCHES) <= config_keys, sorted(config_keys)  # logged as params of every run
    for variant, switches in ABLATION_SWITCHES.items():
        declared = set(get_variant_class(variant).recommended())
        assert set(switches) <= declared, (variant, sorted(declared))
    assert set(SWITCH_BINS) <= {s for switches in ABLATION_SWITCHES.values() for s in switches}


def test_one_table_frame_rendered_three_ways():
    import io

    from analysis.tables import Table, render

    table = Table("t", "T", ["Dataset", "Variant", "Top-1 (%)"], label_columns=2,
                  csv_columns=["dataset", "variant", "acc", "note"])
    table.add(["a_1", "baseline", "50.00 ± 1.00"], {"dataset": "a_1", "variant": "baseline", "acc": 0.5})
    table.add(["a_1", "x|y", "n/a " + table.notes.mark("why")], {"dataset": "a_1", "variant": "x|y", "acc": None})
    table.end_group()
    table.add(["b", "baseline", "1/3"], {"dataset": "b", "variant": "baseline", "acc": 1 / 3})
    table.end_group()
    out = render(table)
    # CSV: the values at full precision, the row's marked note, nothing for a missing value
    got = list(csv.DictReader(io.StringIO(out["csv"])))
    assert [r["acc"] for r in got] == ["0.5", "", "0.3333333333"]
    assert [r["note"] for r in got] == ["", "why", ""]
    # Markdown: one line per row, '|' escaped inside a cell, the note under the table
    assert "| a_1 | x\\|y | n/a [1] |" in out["md"].splitlines() and out["md"].endswith("[1] why\n")
    # LaTeX (booktabs): escaped cells, a rule between the two datasets and none after the last row
    tex = out["tex"].splitlines()
    body = tex[tex.index(r"\midrule") + 1:tex.index(r"\bottomrule")]
    assert body == [r"a\_1 & baseline & 50.00 $\pm$ 1.00 \\", r"a\_1 & x|y & n/a [1] \\", r"\midrule",
                    r"b & baseline & 1/3 \\"]
    assert tex[tex.index(r"\begin{tabular}{llr}") + 1] == r"\toprule"
    assert render(table) == out, "rendering is deterministic"
