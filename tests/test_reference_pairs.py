"""Confusable pairs are pairs that were confused, and reference pairs are defined (the best
baseline trial of the matching study), not found: they do not depend on run order."""
from __future__ import annotations

import json

import numpy as np
import optuna
import pytest

from conftest import tiny_config

pytestmark = pytest.mark.slow


def test_no_zero_score_pair_in_any_logged_pair_set(store, mlflow_client):
    from carrot.train import run

    result = run(tiny_config(**{"optim.epochs": 2}), log=lambda s: None)
    rid = result.run_id
    cms = np.load(mlflow_client.download_artifacts(rid, "confusion.npz"))["confusion"].astype(float)
    records = json.load(open(mlflow_client.download_artifacts(rid, "diagnostics.json")))
    n_top = {m.step: m.value for m in mlflow_client.get_metric_history(rid, "pairs/n_top")}
    pairs = json.load(open(mlflow_client.download_artifacts(rid, "pairs.json")))
    assert pairs["reference_source"] == "self:epoch1"
    for record, cm in zip(records, cms):
        n = cm.sum(1)
        # the top pairs of every epoch, and the reference pairs where they were chosen (epoch 1)
        for key in ("top_pairs",) + (("ref_pairs",) if record["epoch"] == 1 else ()):
            for i, j in record[key]:
                score = (cm[i, j] / n[i] + cm[j, i] / n[j]) / 2  # S_ij, written out
                assert score > 0, (record["epoch"], key, i, j)
        confused = sum(1 for i in range(len(cm)) for j in range(i + 1, len(cm)) if cm[i, j] + cm[j, i] > 0)
        assert n_top[record["epoch"]] == len(record["top_pairs"]) == min(20, confused)


def _baseline_store(root, monkeypatch, order):
    """A baseline study whose two trials (the recommended lr and 3x it) run in ``order``."""
    from carrot.study import open_storage, run_study

    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    cfg = tiny_config(**{"optim.epochs": 2})
    storage = open_storage(str(root / "optuna.journal"))
    study = optuna.create_study(study_name="digits-test_resnet-baseline", storage=storage, direction="maximize")
    for lr in order:
        study.enqueue_trial({"optim.lr": lr, "optim.weight_decay": 0.05, "data.sampler": "random",
                             "data.m_per_class": 4})
    run_study(cfg, trials=2, storage=str(root / "optuna.journal"), log=lambda s: None)
    return storage


def test_reference_pairs_do_not_depend_on_the_order_trials_finished(tmp_path, monkeypatch):
    from carrot.reference import best_baseline_pairs, count_classes

    probe = tiny_config(**{"variant.name": "expansion"})
    found = []
    for name, order in (("a", (3e-3, 9e-3)), ("b", (9e-3, 3e-3))):
        root = tmp_path / name
        root.mkdir()
        storage = _baseline_store(root, monkeypatch, order)
        study = optuna.load_study(study_name="digits-test_resnet-baseline", storage=storage)
        assert [t.params["optim.lr"] for t in study.trials] == list(order)
        ref = best_baseline_pairs(probe, storage, count_classes(probe))
        assert ref.pairs and ref.source.startswith("study:")
        found.append((ref.pairs, ref.source.split("/run:")[0].split("/trial:")[1]))
    (pairs_a, trial_a), (pairs_b, trial_b) = found
    assert pairs_a == pairs_b
    assert trial_a != trial_b  # the same configuration, under another trial number


def test_a_study_fixes_its_reference_pairs_at_its_first_trial(store, mlflow_client):
    from carrot.study import open_storage, run_study

    base = tiny_config(**{"optim.epochs": 1})
    run_study(base, trials=1, log=lambda s: None)
    summary = run_study(tiny_config(**{"optim.epochs": 1, "variant.name": "pairwise_confusion"}), trials=1,
                        log=lambda s: None)
    study = optuna.load_study(study_name=summary.name, storage=open_storage(None))
    recorded = study.user_attrs["reference_pairs"]
    run = mlflow_client.get_run(summary.best_run_id)
    assert run.data.tags["carrot.ref_pairs_source"] == recorded["source"]
    pairs = json.load(open(mlflow_client.download_artifacts(summary.best_run_id, "pairs.json")))
    assert pairs["reference"] == recorded["pairs"]
    assert run.data.metrics["pairs/n_ref"] == len(recorded["pairs"])
