"""Every trial logs the paper's diagnostics, per epoch, and the artifacts load back to the numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from carrot.cli import main
from conftest import tiny_config

pytestmark = pytest.mark.slow

PER_EPOCH = ["train/loss", "train/ce", "val/acc", "val/mean_class_acc", "pairs/top_error", "pairs/ref_error",
             "proto_cos/top_mean", "proto_cos/ref_mean", "proto_cos/offdiag_mean", "proto_cos/offdiag_std",
             "nc/nc1"]


def test_synthetic_baseline_recovers_planted_pairs(store, mlflow_client):
    from carrot.data import ImageSpec, build_dataset
    from carrot.train import run

    cfg = tiny_config(**{"data.name": "synthetic", "optim.epochs": 4, "data.batch_size": 64})
    planted = {tuple(p) for p in build_dataset(cfg.data, ImageSpec()).planted_pairs}
    result = run(cfg, log=lambda s: None)
    pairs = json.load(open(mlflow_client.download_artifacts(result.run_id, "pairs.json")))
    top = {tuple(p) for p in pairs["top"][: len(planted)]}
    assert len(top & planted) >= 0.8 * len(planted), (pairs["top"], planted)
    assert pairs["reference_source"] == "self:epoch1"


def test_expansion_study_logs_every_key_per_epoch(store, mlflow_client):
    argv = ["study", "--variant", "expansion", "--trials", "2", "--epochs", "3", "--image-size", "16",
            "--no-progress", "--set", "eval.probe_max_train=300", "--set", "data.batch_size=32"]
    # the default eval.probe: trials that reach their last epoch probe there
    assert main(argv) == 0
    exp = mlflow_client.get_experiment_by_name("carrot")
    runs = [r for r in mlflow_client.search_runs([exp.experiment_id]) if r.data.tags.get("carrot.trial")]
    assert len(runs) == 2
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert finished, [r.info.status for r in runs]  # the median pruner waits for 4 trials: none pruned
    for r in finished:
        rid = r.info.run_id
        keys = set(r.data.metrics)
        layers = sorted({k.split("/")[1] for k in keys if k.startswith("rho/")})
        assert len(layers) >= 2, keys
        expected = PER_EPOCH + [f"rho/{l}/top_mean" for l in layers] + [f"rho/{l}/ref_mean" for l in layers]
        expected += [k for k in keys if k.startswith("var/")] + [f"train/{r.data.params['variant.hparams.mode']}"]
        for key in expected:
            steps = [m.step for m in mlflow_client.get_metric_history(rid, key)]
            assert steps == [1, 2, 3], (key, steps)
        assert any(k.startswith("var/gamma") for k in keys)
        for layer in layers + ["embedding"]:
            assert f"probe/{layer}/acc" in keys
            assert [m.step for m in mlflow_client.get_metric_history(rid, f"probe/{layer}/acc")] == [3]

        # the confusion-matrix artifact loads back to the logged numbers
        cm_all = np.load(mlflow_client.download_artifacts(rid, "confusion.npz"))["confusion"]
        assert cm_all.shape[0] == 3 and cm_all.shape[1] == cm_all.shape[2] == 10
        pairs = json.load(open(mlflow_client.download_artifacts(rid, "pairs.json")))
        for epoch in range(3):
            cm = cm_all[epoch].astype(float)
            hist = {m.step: m.value for m in mlflow_client.get_metric_history(rid, "val/acc")}
            assert hist[epoch + 1] == pytest.approx(np.trace(cm) / cm.sum())
            recall = np.diag(cm) / cm.sum(1)
            hist = {m.step: m.value for m in mlflow_client.get_metric_history(rid, "val/mean_class_acc")}
            assert hist[epoch + 1] == pytest.approx(recall.mean())
        ref = pairs["reference"]
        errors = [(cm[i, j] + cm[j, i]) / (cm[i].sum() + cm[j].sum()) for i, j in ref]
        assert r.data.metrics["pairs/ref_error"] == pytest.approx(np.mean(errors), rel=1e-12)
        top = pairs["top"]
        errors = [(cm[i, j] + cm[j, i]) / (cm[i].sum() + cm[j].sum()) for i, j in top]
        assert r.data.metrics["pairs/top_error"] == pytest.approx(np.mean(errors), rel=1e-12)
        assert r.data.tags["carrot.ref_pairs_source"].startswith(("self:", "study:"))
