"""What the paper tables may and may not put together, on real MLflow stores in a temporary folder.

The runs here are written with ``MlflowClient`` directly (tags, params, metrics and the
``confusion.npz`` / ``predictions.npz`` artifacts a finished run holds), so every number is
known in advance and the tests do not depend on the training side. Every expected value is
recomputed here from the arrays written, with NumPy and SciPy, never with ``analysis``.

- same-named studies of two storages (different study ids, different epochs) keep their own
  ablation rows; final runs of another configuration are left out, with a note;
- McNemar's exact test (per seed, and pooled over seeds by summing the discordant counts),
  Holm's correction and a seeded bootstrap, by hand and in the ``significance`` table;
- the paper's reference pairs: the top pairs of the baseline's pooled confusion, the same
  whatever order the runs finished in, and every run re-scored on them;
- D_B per layer from ``dB/<layer>/ref_mean`` or, in older runs, the ``bhattacharyya/`` key.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, md_rows, read_csv

EXPERIMENT = "carrot"
BACKBONE = "test_resnet"
T0 = 1_800_000_000_000  # ms; start and end times are set so "newest" is known


# ----------------------------------------------------------------------------- writing a store
@dataclass
class Spec:
    """One run to write."""

    variant: str
    seed: int | None
    dataset: str = "digits"
    role: str = "final"
    split: str = "test"
    config_hash: str = "cfg-a"
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # key -> value, or key -> [value per epoch]
    confusion: np.ndarray | None = None  # (E, K, K)
    predictions: dict | None = None
    study: str = ""
    study_id: str = ""
    parent: str = ""  # the key of this run's parent Spec (a study's parent run)
    status: str = "FINISHED"


class Store:
    """A sqlite MLflow store in a folder; ``write`` adds runs finishing in the order given."""

    def __init__(self, root: Path) -> None:
        from mlflow.tracking import MlflowClient

        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment = self.client.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
        self.ids: dict[str, str] = {}  # spec key -> run id
        self.clock = T0

    def write(self, key: str, spec: Spec) -> str:
        from mlflow.entities import Metric, Param

        c = self.client
        self.clock += 1000
        tags = {"carrot.variant": spec.variant, "carrot.dataset": spec.dataset, "carrot.backbone": BACKBONE,
                "carrot.split": spec.split, "carrot.role": spec.role, "carrot.config_hash": spec.config_hash,
                "mlflow.runName": key}
        if spec.seed is not None:
            tags["carrot.seed"] = str(spec.seed)
        if spec.study:
            tags["carrot.study"] = spec.study
        if spec.study_id:
            tags["carrot.study_id"] = spec.study_id
        if spec.parent:
            tags["mlflow.parentRunId"] = self.ids[spec.parent]
        run = c.create_run(self.experiment, start_time=self.clock, tags=tags)
        rid = run.info.run_id
        params = {"seed": spec.seed if spec.seed is not None else 0, "data.name": spec.dataset,
                  "model.backbone": BACKBONE, "variant.name": spec.variant, **spec.params}
        metrics = []
        for name, value in spec.metrics.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            metrics += [Metric(name, float(v), self.clock + step, step) for step, v in enumerate(values, start=1)]
        c.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
        folder = self.root / "files" / key
        folder.mkdir(parents=True)
        if spec.confusion is not None:
            np.savez_compressed(folder / "confusion.npz", confusion=spec.confusion,
                                epochs=np.arange(1, len(spec.confusion) + 1),
                                class_names=np.array([f"class{k}" for k in range(spec.confusion.shape[-1])]))
            c.log_artifact(rid, str(folder / "confusion.npz"))
        if spec.predictions is not None:
            np.savez_compressed(folder / "predictions.npz", **spec.predictions)
            c.log_artifact(rid, str(folder / "predictions.npz"))
        c.set_terminated(rid, spec.status, end_time=self.clock + 500)
        self.ids[key] = rid
        return rid

    def tables(self, out: Path, *extra: str) -> Path:
        from analysis import tables

        args = ["--out", str(out), "--tracking-uri", self.uri, "--storage", str(self.root / "none.journal")]
        assert tables.main(args + list(extra)) == 0
        return out


def note_text(md: Path, cell: str) -> list[str]:
    """The texts of the numbered notes a Markdown cell marks."""
    import re

    notes = dict(re.findall(r"^\[(\d+)\] (.*?)\s*$", md.read_text(), flags=re.M))
    return [notes[n] for n in re.findall(r"\[(\d+)\]", cell)]


# ----------------------------------------------------------------------------- synthetic predictions
def predictions(labels: np.ndarray, accuracy: float, rng: np.random.Generator, k: int,
                confusable: dict[int, int] | None = None) -> dict[str, np.ndarray]:
    """A run's ``predictions.npz``: each sample right with probability ``accuracy``, else a
    wrong class (``confusable[y]`` half of the time); rows shuffled so runs must be aligned by
    ``index``."""
    n = len(labels)
    right = rng.random(n) < accuracy
    wrong = (labels + rng.integers(1, k, n)) % k
    if confusable:
        partner = np.array([confusable.get(int(y), int(w)) for y, w in zip(labels, wrong)])
        wrong = np.where(rng.random(n) < 0.5, partner, wrong)
    pred = np.where(right, labels, wrong)
    order = rng.permutation(n)
    top5 = np.stack([(pred + s) % k for s in range(5)], axis=1)
    prob = np.sort(rng.dirichlet(np.ones(5), n), axis=1)[:, ::-1]
    return {"index": order.astype(np.int64), "label": labels[order], "pred": pred[order],
            "top5_class": top5[order], "top5_prob": prob[order]}


def confusion_of(pred: dict[str, np.ndarray], k: int, rng: np.random.Generator) -> np.ndarray:
    """(2, K, K): a noisy first epoch, then the last epoch counted from the predictions."""
    last = np.zeros((k, k), np.int64)
    np.add.at(last, (pred["label"], pred["pred"]), 1)
    first = np.zeros((k, k), np.int64)
    np.add.at(first, (pred["label"], rng.integers(0, k, len(pred["label"]))), 1)
    return np.stack([first, last])


def correct_by_index(p: dict[str, np.ndarray]) -> np.ndarray:
    """Right/wrong per sample, in sample-index order."""
    order = np.argsort(p["index"])
    return (p["pred"] == p["label"])[order]


# ----------------------------------------------------------------------------- 1. configurations
def trial(variant: str, study: str, study_id: str, parent: str, acc: float, epochs: int, use_var: bool) -> Spec:
    return Spec(variant, 0, role="trial", split="val", config_hash=f"trial-{study_id}-{acc}", study=study,
                study_id=study_id, parent=parent,
                params={"optim.epochs": epochs, "data.image_size": 16, "data.sampler": "pk",
                        "variant.hparams.use_var": use_var, "variant.hparams.use_rank": True},
                metrics={"val/acc": [acc / 2, acc][-epochs:]})


def test_same_named_studies_of_two_storages_keep_their_own_ablation_rows(tmp_path):
    store = Store(tmp_path / "store")
    name = f"digits-{BACKBONE}-barrier"
    # two storages, one study name: two studies (two ids), trained for 1 and for 3 epochs
    plan = {"one": ("0123456789abcdef", 1, (0.20, 0.30)), "three": ("fedcba9876543210", 3, (0.80, 0.95))}
    for key, (sid, epochs, accs) in plan.items():
        store.write(f"parent-{key}", Spec("barrier", None, role="study", split="val", study=name, study_id=sid,
                                          params={"optim.epochs": epochs}))
        for n, (acc, use_var) in enumerate(zip(accs, (True, False))):
            store.write(f"{key}-{n}", trial("barrier", name, sid, f"parent-{key}", acc, epochs, use_var))
    out = store.tables(tmp_path / "out")

    rows = [r for r in read_csv(out / "ablations.csv") if r["variant"] == "barrier"]
    assert {r["study_id"] for r in rows} == {"0123456789abcdef", "fedcba9876543210"}
    assert {r["study"] for r in rows} == {name}
    everything = {r["study_id"]: r for r in rows if r["switch"] == "(all trials)"}
    for key, (sid, epochs, accs) in plan.items():
        assert int(everything[sid]["n_trials"]) == 2
        assert float(everything[sid]["val_acc_mean"]) == pytest.approx(np.mean(accs), abs=1e-9)
        for use_var, acc in zip(("True", "False"), accs):
            got = [r for r in rows if r["study_id"] == sid and r["switch"] == "use_var" and r["setting"] == use_var]
            assert len(got) == 1 and float(got[0]["val_acc_mean"]) == pytest.approx(acc, abs=1e-9)
    # no cell of the table is an average over both studies
    mixed = {np.mean([a for _, _, accs in plan.values() for a in accs])}
    mixed |= {np.mean([plan["one"][2][i], plan["three"][2][i]]) for i in (0, 1)}  # one setting across studies
    for r in rows:
        if r["val_acc_mean"]:
            assert all(abs(float(r["val_acc_mean"]) - m) > 1e-9 for m in mixed), r
        assert int(r["n_trials"]) <= 2
    # the Markdown labels each study by name and short id and says why they are apart
    md = out / "ablations.md"
    labels = {r["Study"].split(" [")[0] for r in md_rows(md) if r["Variant"] == "barrier"}
    assert labels == {f"{name} (01234567)", f"{name} (fedcba98)"}
    first = next(r for r in md_rows(md) if r["Variant"] == "barrier")
    (why,) = note_text(md, first["Study"])
    assert "2 studies of this variant" in why and "never averaged" in why and "optim.epochs" in why

    # the plots drawn from trials take each variant's newest study only
    from analysis.common import connect, load_runs, plot_source

    chosen, split, words = plot_source(load_runs(connect(store.uri), EXPERIMENT), "digits", BACKBONE)
    assert split == "val" and "newest study" in words
    assert sorted(chosen["run_id"]) == sorted(store.ids[f"three-{n}"] for n in (0, 1))


def test_final_runs_of_another_configuration_are_left_out_with_a_note(tmp_path):
    store = Store(tmp_path / "store")
    old = {0: 0.10, 1: 0.20, 2: 0.30}  # an earlier configuration (1 epoch), three seeds
    new = {0: 0.80, 1: 0.90}  # the newest configuration (3 epochs), two seeds
    for seed, acc in old.items():
        store.write(f"old-{seed}", Spec("baseline", seed, config_hash="cfg-old", params={"optim.epochs": 1},
                                        metrics={"test/acc": acc}))
    for seed, acc in new.items():
        store.write(f"new-{seed}", Spec("baseline", seed, config_hash="cfg-new", params={"optim.epochs": 3},
                                        metrics={"test/acc": acc}))
    # another variant finishing last does not change the baseline's choice (per variant)
    store.write("expansion-0", Spec("expansion", 0, config_hash="cfg-x", metrics={"test/acc": 0.5}))
    out = store.tables(tmp_path / "out")

    base = next(r for r in read_csv(out / "main_results.csv") if r["variant"] == "baseline")
    assert int(base["n_seeds"]) == 2 and base["seeds"] == "0 1"
    assert float(base["acc_mean"]) == pytest.approx(np.mean(list(new.values())), abs=1e-9)
    assert "3 final run(s) of 1 other configuration(s)" in base["note"] and "optim.epochs" in base["note"]
    md = out / "main_results.md"
    cell = next(r for r in md_rows(md) if r["Variant"] == "baseline")["Seeds"]
    assert any("left out" in t and "never averaged" in t for t in note_text(md, cell))

    # a newer run of the old configuration makes the old configuration the kept one
    store.write("old-again", Spec("baseline", 1, config_hash="cfg-old", params={"optim.epochs": 1},
                                  metrics={"test/acc": 0.25}))
    out = store.tables(tmp_path / "out2")
    base = next(r for r in read_csv(out / "main_results.csv") if r["variant"] == "baseline")
    assert base["seeds"] == "0 1 2"
    assert float(base["acc_mean"]) == pytest.approx(np.mean([0.10, 0.25, 0.30]), abs=1e-9)
    assert "2 final run(s) of 1 other configuration(s)" in base["note"]


# ----------------------------------------------------------------------------- 2. significance maths
def test_mcnemar_by_hand_and_against_scipy():
    from scipy.stats import binomtest

    from analysis.significance import discordant, mcnemar_p, stratified_mcnemar

    # b=10, c=2: two-sided exact p = 2 * P(X <= 2), X ~ Binomial(12, 1/2)
    by_hand = 2 * (math.comb(12, 0) + math.comb(12, 1) + math.comb(12, 2)) / 2 ** 12
    assert by_hand == pytest.approx(0.0385742, abs=1e-7)
    assert mcnemar_p(10, 2) == pytest.approx(by_hand, rel=1e-12)
    assert mcnemar_p(2, 10) == pytest.approx(by_hand, rel=1e-12)
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == pytest.approx(1.0)
    for b in range(0, 25, 3):
        for c in range(0, 25, 4):
            if b + c:
                assert mcnemar_p(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-12), (b, c)
    v = np.array([1, 1, 1, 0, 0, 1, 0], bool)
    r = np.array([0, 1, 0, 1, 0, 1, 0], bool)
    assert discordant(v, r) == (2, 1)
    # pooled over strata: the discordant counts summed, one exact test
    assert stratified_mcnemar([(4, 1), (6, 1)]) == (10, 2, pytest.approx(by_hand, rel=1e-12))


def test_holm_by_hand():
    from analysis.significance import holm

    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06], rtol=1e-12)
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])  # capped at 1, monotone
    got = holm([0.02, math.nan, 0.01])  # NaN is not a test: m = 2
    assert math.isnan(got[1]) and got[0] == pytest.approx(0.02) and got[2] == pytest.approx(0.02)


def test_bootstrap_is_seeded_and_equals_resampling_by_hand():
    from analysis.significance import BOOTSTRAP_CHUNK, bootstrap_intervals

    rng = np.random.default_rng(7)
    right = rng.random((2, 300)) < 0.7  # two seeds' correctness
    other = rng.random((2, 300)) < 0.6
    x = np.stack([right[0], right.sum(0), right.sum(0) - other.sum(0)]).astype(int)  # (3, N) numerators
    divisors = [1, 2, 2]  # one seed; the mean over two seeds; a difference averaged over two seeds
    got = bootstrap_intervals(x, divisors, resamples=600, seed=3)
    # the slow obvious way with the same draws: resample sample indices, take means, percentiles
    draws = np.random.default_rng(3)
    means = []
    for start in range(0, 600, BOOTSTRAP_CHUNK):
        for idx in draws.integers(0, 300, size=(min(BOOTSTRAP_CHUNK, 600 - start), 300)):
            means.append([np.mean(row[idx] / d) for row, d in zip(x, divisors)])
    want = np.quantile(np.array(means), [0.025, 0.975], axis=0).T
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.array_equal(got, bootstrap_intervals(x, divisors, resamples=600, seed=3)), "seeded"
    assert not np.array_equal(got, bootstrap_intervals(x, divisors, resamples=600, seed=4))
    estimate = x.mean(axis=1) / divisors
    assert (got[:, 0] < estimate).all() and (estimate < got[:, 1]).all()
    # a row's interval does not depend on the rows beside it (exact integer sums)
    assert np.array_equal(bootstrap_intervals(x[2:], divisors[2:], resamples=600, seed=3), got[2:])
    with pytest.raises(TypeError):
        bootstrap_intervals(x / 2.0)


# ----------------------------------------------------------------------------- the shared store
K = 10  # classes of the "digits" runs; "tiny" has 5
N_PER_CLASS = 30
ACCURACY = {"baseline": 0.60, "barrier": 0.70, "expansion": 0.62}
CONFUSABLE = {0: 1, 1: 0, 2: 3, 3: 2, 4: 5, 5: 4}


def shared_specs() -> dict[str, Spec]:
    """Final runs of three variants x two seeds on "digits" (K=10, dense confusion), baseline
    and barrier on "tiny" (K=5, two confused pairs), with predictions and confusion matrices.
    Each run's logged ``pairs/ref_error`` mimics the training side: scored on pairs that
    depend on which baseline run had finished (so it differs between finishing orders)."""
    specs = {}
    labels = np.repeat(np.arange(K), N_PER_CLASS)
    for variant, acc in ACCURACY.items():
        for seed in (0, 1):
            rng = np.random.default_rng(1000 * seed + list(ACCURACY).index(variant))
            pred = predictions(labels, acc, rng, K, CONFUSABLE)
            layer_metrics = ({"dB/layer1/ref_mean": [4.0 + seed, 3.0 + seed]} if variant != "expansion"
                             else {"bhattacharyya/layer1/ref_distance": [9.0, 7.0 + seed]})
            specs[f"digits-{variant}-{seed}"] = Spec(
                variant, seed, params={"optim.epochs": 3}, predictions=pred, confusion=confusion_of(pred, K, rng),
                metrics={"test/acc": float((pred["pred"] == pred["label"]).mean()), "pairs/top_error": 0.3,
                         **layer_metrics, "dB/layer2/ref_mean": [100.0 + seed, 120.0 + seed]})
    tiny = np.array([[9, 1, 0, 0, 0], [2, 8, 0, 0, 0], [0, 0, 10, 0, 0], [0, 0, 0, 7, 3], [0, 0, 0, 0, 10]])
    for variant in ("baseline", "barrier"):
        for seed in (0, 1):
            cm = tiny + (np.diag([0, 0, 0, 1, 0]) if seed else 0)
            specs[f"tiny-{variant}-{seed}"] = Spec(variant, seed, dataset="tiny", params={"optim.epochs": 3},
                                                  confusion=np.stack([cm, cm]), metrics={"test/acc": 0.9})
    return specs


def finishing_order(specs: dict[str, Spec], order: str) -> list[str]:
    keys = sorted(specs)
    return keys if order == "forward" else keys[::-1]


def with_training_side_ref_error(specs: dict[str, Spec], keys: list[str]) -> dict[str, Spec]:
    """Each run's logged ref-pair error on the top pairs of the first baseline that finished."""
    first = {}
    for key in keys:
        spec = specs[key]
        if spec.variant == "baseline":
            first.setdefault(spec.dataset, spec.confusion[-1])
    out = {}
    for key in keys:
        spec = specs[key]
        cm = spec.confusion[-1]
        ref = first.get(spec.dataset, cm)
        pairs = top_pairs_by_hand(ref, 20)
        error = np.mean([(cm[i, j] + cm[j, i]) / (cm[i].sum() + cm[j].sum()) for i, j in pairs])
        out[key] = Spec(**{**spec.__dict__, "metrics": {**spec.metrics, "pairs/ref_error": float(error)}})
    return out


def top_pairs_by_hand(cm: np.ndarray, n: int) -> list[tuple[int, int]]:
    """S_ij = (C_ij / n_i + C_ji / n_j) / 2 over i < j, written out; the top n with S > 0, S
    descending, ties by i then j."""
    cm = np.asarray(cm, float)
    rows = cm.sum(axis=1)
    scored = []
    for i in range(len(cm)):
        for j in range(i + 1, len(cm)):
            s = (cm[i, j] / rows[i] + cm[j, i] / rows[j]) / 2
            if s > 0:
                scored.append((-s, i, j))
    return [(i, j) for _, i, j in sorted(scored)[:n]]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The same runs written into two stores, finishing in opposite orders; tables of both."""
    root = tmp_path_factory.mktemp("identity")
    specs = shared_specs()
    built = {}
    for order in ("forward", "backward"):
        keys = finishing_order(specs, order)
        store = Store(root / order)
        for key, spec in with_training_side_ref_error(specs, keys).items():
            store.write(key, spec)
        built[order] = (store, store.tables(root / f"out-{order}"))
    return {"specs": specs, "built": built, "root": root}


# ----------------------------------------------------------------------------- 2. significance table
def test_significance_table_equals_mcnemar_and_holm_by_hand(shared):
    from scipy.stats import binomtest

    specs = shared["specs"]
    store, out = shared["built"]["forward"]
    rows = read_csv(out / "significance.csv")
    md = md_rows(out / "significance.md")
    correct = {(v, s): correct_by_index(specs[f"digits-{v}-{s}"].predictions) for v in ACCURACY for s in (0, 1)}
    pooled_p = {}
    for variant in ("barrier", "expansion"):
        bs, cs = [], []
        for seed in (0, 1):
            v, r = correct[(variant, seed)], correct[("baseline", seed)]
            b, c = int((v & ~r).sum()), int((~v & r).sum())
            bs.append(b)
            cs.append(c)
            got = next(x for x in rows if x["dataset"] == "digits" and x["variant"] == variant
                       and x["seed"] == str(seed))
            assert (int(got["b"]), int(got["c"])) == (b, c)
            assert float(got["mcnemar_p"]) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9)
            assert float(got["acc"]) == pytest.approx(v.mean(), abs=1e-9)
            assert float(got["diff_vs_baseline"]) == pytest.approx(v.mean() - r.mean(), abs=1e-9)
            assert got["mcnemar_p_holm"] == "", "Holm is over the pooled tests only"
        pooled = next(x for x in rows if x["dataset"] == "digits" and x["variant"] == variant
                      and x["seed"] == "pooled")
        assert (int(pooled["b"]), int(pooled["c"])) == (sum(bs), sum(cs))
        pooled_p[variant] = binomtest(sum(bs), sum(bs) + sum(cs), 0.5).pvalue
        assert float(pooled["mcnemar_p"]) == pytest.approx(pooled_p[variant], rel=1e-9)
        assert float(pooled["acc"]) == pytest.approx(np.mean([correct[(variant, s)].mean() for s in (0, 1)]))
        assert int(pooled["n_samples"]) == K * N_PER_CLASS
        lo, hi = float(pooled["acc_ci_low"]), float(pooled["acc_ci_high"])
        assert lo < float(pooled["acc"]) < hi and hi - lo < 0.2
        cell = next(x for x in md if x["Dataset"] == "digits" and x["Variant"] == variant
                    and x["Seed"].startswith("pooled"))
        assert cell["b / c"] == f"{sum(bs)} / {sum(cs)}"
    # Holm over the table's pooled tests: digits' two variants (tiny has no predictions)
    ordered = sorted(pooled_p.items(), key=lambda kv: kv[1])
    holm = {ordered[0][0]: min(1, 2 * ordered[0][1])}
    holm[ordered[1][0]] = min(1, max(holm[ordered[0][0]], ordered[1][1]))
    for variant, want in holm.items():
        pooled = next(x for x in rows if x["dataset"] == "digits" and x["variant"] == variant
                      and x["seed"] == "pooled")
        assert float(pooled["mcnemar_p_holm"]) == pytest.approx(want, rel=1e-9)
    text = (out / "significance.md").read_text()
    assert "Holm's step-down correction over the 2 pooled test(s)" in text
    assert "b and c are summed over the seeds" in text
    # runs without predictions.npz say so instead of showing numbers
    tiny = next(x for x in md if x["Dataset"] == "tiny" and x["Variant"] == "barrier")
    assert tiny["McNemar p"] == "n/a" and any("no predictions.npz" in t
                                              for t in note_text(out / "significance.md", tiny["Seed"]))


# ----------------------------------------------------------------------------- 3. reference pairs
def test_reference_pairs_are_the_baselines_pooled_top_pairs_and_every_run_is_rescored(shared):
    specs = shared["specs"]
    store, out = shared["built"]["forward"]
    for dataset in ("digits", "tiny"):
        pooled = sum(specs[f"{dataset}-baseline-{s}"].confusion[-1] for s in (0, 1))
        want = top_pairs_by_hand(pooled, 20)
        listed = [r for r in read_csv(out / "reference_pairs.csv") if r["dataset"] == dataset]
        assert [(int(r["i"]), int(r["j"])) for r in listed] == want
        assert all(int(r["n_baseline_runs"]) == 2 for r in listed)
        rows = read_csv(out / "confusable_pairs.csv")
        for variant in {s.variant for s in specs.values() if s.dataset == dataset}:
            per_seed = []
            for seed in (0, 1):
                cm = specs[f"{dataset}-{variant}-{seed}"].confusion[-1].astype(float)
                per_seed.append(np.mean([(cm[i, j] + cm[j, i]) / (cm[i].sum() + cm[j].sum()) for i, j in want]))
            got = next(r for r in rows if r["dataset"] == dataset and r["variant"] == variant)
            assert int(got["n_ref_pairs"]) == len(want)
            assert float(got["ref_error_mean"]) == pytest.approx(np.mean(per_seed), abs=1e-9), (dataset, variant)
            assert float(got["ref_error_std"]) == pytest.approx(np.std(per_seed, ddof=1), abs=1e-9)
    assert len(top_pairs_by_hand(sum(specs[f"digits-baseline-{s}"].confusion[-1] for s in (0, 1)), 99)) > 20
    # "tiny" has two confused pairs only: the table says the set is smaller than N
    tiny = next(r for r in md_rows(out / "confusable_pairs.md") if r["Dataset"] == "tiny")
    assert tiny["Ref pairs"].startswith("2 [")
    assert any("fewer than N = 20" in t for t in note_text(out / "confusable_pairs.md", tiny["Ref pairs"]))


def test_reference_pairs_do_not_depend_on_the_order_runs_finished(shared):
    (a, out_a), (b, out_b) = shared["built"]["forward"], shared["built"]["backward"]
    # the training side's own ref-pair errors do differ between the two orders ...
    logged = {}
    for name, store in (("a", a), ("b", b)):
        rid = store.ids["digits-barrier-0"]
        logged[name] = store.client.get_run(rid).data.metrics["pairs/ref_error"]
    assert logged["a"] != logged["b"]
    # ... the paper tables' do not: the same reference set, the same errors, the same bytes
    for name in ("reference_pairs", "confusable_pairs", "significance", "main_results", "geometry"):
        for ext in ("md", "tex", "csv"):
            assert (out_a / f"{name}.{ext}").read_bytes() == (out_b / f"{name}.{ext}").read_bytes(), (name, ext)


# ----------------------------------------------------------------------------- 4. D_B
def test_geometry_and_plots_use_db_with_the_older_key_as_fallback(shared, tmp_path):
    specs = shared["specs"]
    store, out = shared["built"]["forward"]
    rows = read_csv(out / "geometry.csv")
    for variant in ACCURACY:
        got = next(r for r in rows if r["dataset"] == "digits" and r["variant"] == variant)
        last = [specs[f"digits-{variant}-{s}"].metrics for s in (0, 1)]
        want = [m.get("dB/layer1/ref_mean", m.get("bhattacharyya/layer1/ref_distance"))[-1] for m in last]
        assert float(got["dB/layer1/ref_mean:mean"]) == pytest.approx(np.mean(want), abs=1e-9), variant
        assert float(got["dB/layer2/ref_mean:mean"]) == pytest.approx(np.mean([120.0, 121.0]), abs=1e-9)
    header = md_rows(out / "geometry.md")[0]
    assert "D_B layer1 (ref)" in header and not any(c.startswith("ρ") for c in header)

    from analysis.common import Artifacts, connect, db_keys, load_runs, mean_history, plot_source
    from analysis.plots import make_plots

    client = connect(store.uri)
    runs = load_runs(client, EXPERIMENT)
    written = make_plots(client, runs, tmp_path, log=lambda s: None)
    assert tmp_path / "plots" / f"digits-{BACKBONE}" / "db_per_layer.png" in written
    assert not list(tmp_path.rglob("rho_per_layer.png"))
    # the drawn history takes each run's dB key, else its older key
    final, _, _ = plot_source(runs, "digits", BACKBONE)
    ids = final[final["variant"] == "expansion"]["run_id"]
    hist = mean_history(client, ids, db_keys("layer1"))
    assert hist["mean"].tolist() == pytest.approx([9.0, 7.5])
    assert Artifacts(client).confusion(ids.iloc[0]).shape == (K, K)


# ----------------------------------------------------------------------------- byte-identical rebuilds
def test_tables_are_byte_identical_when_rebuilt_in_a_fresh_process(shared, tmp_path):
    store, out = shared["built"]["forward"]
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert {"significance.csv", "reference_pairs.tex", "confusable_pairs.md"} <= set(names)
    store.tables(tmp_path / "again")
    env = {**os.environ, "PYTHONHASHSEED": "999", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "analysis.tables", "--out", str(tmp_path / "fresh"),
                           "--tracking-uri", store.uri, "--storage", str(store.root / "none.journal")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for build in (tmp_path / "again", tmp_path / "fresh"):
        for name in names:
            assert (build / name).read_bytes() == (out / name).read_bytes(), (build, name)
