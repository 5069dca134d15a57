"""`carrot final`: best trial of each study, several seeds on the test split, resumable."""
from __future__ import annotations

import pytest

from carrot.cli import main

pytestmark = pytest.mark.slow

TINY = ["--epochs", "1", "--image-size", "16", "--no-progress", "--set", "eval.probe_max_train=200",
        "--set", "data.batch_size=32"]


def _final_runs(client):
    exp = client.get_experiment_by_name("carrot")
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("carrot.role") == "final"]


def test_study_all_then_final_resumes(store, mlflow_client, capsys):
    assert main(["study", "--variant", "all", "--trials", "1"] + TINY) == 0
    out = capsys.readouterr().out
    from carrot.variants import list_variants

    for name in list_variants():
        assert f"digits-test_resnet-{name}" in out

    assert main(["final", "--seeds", "2", "--variant", "baseline", "--no-progress"]) == 0
    runs = _final_runs(mlflow_client)
    assert sorted(int(r.data.tags["carrot.seed"]) for r in runs) == [0, 1]
    for r in runs:
        assert r.data.tags["carrot.split"] == "test"
        assert r.data.tags["carrot.study"] == "digits-test_resnet-baseline"
        assert "test/acc" in r.data.metrics and "val/acc" not in r.data.metrics
        # the best trial's resolved configuration is what was re-trained
        assert r.data.params["data.image_size"] == "16"

    # the final run keeps its weights and per-sample predictions: the weights reproduce test/acc
    import numpy as np
    import torch

    from carrot.config import RunConfig
    from carrot.train import build_run

    r = runs[0]
    state = torch.load(mlflow_client.download_artifacts(r.info.run_id, "weights.pt"), map_location="cpu")
    import json

    data = json.load(open(mlflow_client.download_artifacts(r.info.run_id, "config.json")))
    data["data"].pop("effective_batch_size")
    cfg = RunConfig.from_dict(data)
    parts = build_run(cfg)
    parts.model.load_state_dict(state)
    parts.model.eval()
    with torch.no_grad():
        preds = torch.cat([parts.model(x).logits.argmax(1) for x, _ in parts.eval_loader]).numpy()
    saved = np.load(mlflow_client.download_artifacts(r.info.run_id, "predictions.npz"))
    assert np.array_equal(saved["pred"], preds)
    assert np.array_equal(saved["index"], np.arange(len(preds)))
    assert (saved["pred"] == saved["label"]).mean() == pytest.approx(r.data.metrics["test/acc"])
    assert np.allclose(saved["top5_prob"].sum(1) <= 1 + 1e-5, True) and saved["top5_class"].shape == (len(preds), 5)

    # a finished seed is not run again; a larger SEEDS adds only the missing ones
    assert main(["final", "--seeds", "2", "--variant", "baseline", "--no-progress"]) == 0
    assert len(_final_runs(mlflow_client)) == 2
    # a SIGKILLed `carrot final` left its seed's run RUNNING for ever; the next one closes it
    killed = _killed_final(store, mlflow_client)
    assert main(["final", "--seeds", "3", "--variant", "baseline", "--no-progress"]) == 0
    assert f"closed final run {killed.info.run_id} ({killed.info.run_name}) as KILLED: its process" in \
        capsys.readouterr().out
    assert mlflow_client.get_run(killed.info.run_id).info.status == "KILLED"
    finished = [r for r in _final_runs(mlflow_client) if r.info.status == "FINISHED"]
    assert sorted(int(r.data.tags["carrot.seed"]) for r in finished) == [0, 1, 2]
    assert [r.info.run_id for r in _final_runs(mlflow_client) if r.info.status != "FINISHED"] == [killed.info.run_id]

    # the run flags apply on top of the study's best configuration, as --set does
    assert main(["final", "--seeds", "1", "--variant", "barrier", "--image-size", "24", "--batch-size", "16",
                 "--no-progress"]) == 0
    (barrier,) = [r for r in _final_runs(mlflow_client) if r.data.tags["carrot.variant"] == "barrier"]
    assert barrier.data.params["data.image_size"] == "24" and barrier.data.params["data.batch_size"] == "16"


def _killed_final(store, client):
    """A `carrot final` process killed (SIGKILL) while its run trains; that run."""
    import os
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "carrot.cli", "final", "--seeds", "3", "--variant", "baseline",
                             "--no-progress", "--epochs", "50"], cwd=store, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (running := [r for r in _final_runs(client) if r.info.status == "RUNNING"]):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.kill()
    proc.communicate(timeout=60)
    (run,) = running
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    return run


def test_final_without_any_study_says_so(store, capsys):
    assert main(["final", "--seeds", "1", "--no-progress"]) == 2  # no storage: none is created
    assert "no Optuna storage at studies/optuna.journal" in capsys.readouterr().err
    assert not (store / "studies").exists()
    from carrot.study import open_storage

    open_storage(None)  # an empty journal: a storage without studies
    assert main(["final", "--seeds", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no variant has a finished study" in err
