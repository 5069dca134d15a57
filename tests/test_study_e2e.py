"""End to end on the real stores: a tiny study, continued, every trial an MLflow child run."""
from __future__ import annotations

import optuna
import pytest

from carrot.cli import main

pytestmark = pytest.mark.slow

TAGS = ["carrot.variant", "carrot.study", "carrot.trial", "carrot.dataset", "carrot.backbone", "carrot.seed",
        "carrot.split", "carrot.git_commit"]
METRICS = ["val/acc", "val/mean_class_acc", "train/loss", "train/ce"]


def test_study_runs_and_continues(store, mlflow_client, capsys):
    argv = ["study", "--variant", "baseline", "--epochs", "2", "--image-size", "16", "--no-progress",
            "--set", "eval.probe_max_train=300"]
    assert main(argv + ["--trials", "3"]) == 0
    out = capsys.readouterr().out
    assert "best trial" in out and "mlruns" in out

    exp = mlflow_client.get_experiment_by_name("carrot")
    runs = mlflow_client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("carrot.role") == "study"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3
    assert all(c.info.status == "FINISHED" for c in children)  # no pruning before 4 full trials
    for child in children:
        for tag in TAGS:
            assert tag in child.data.tags, tag
        assert child.data.tags["carrot.study"] == "digits-test_resnet-baseline"
        assert child.data.tags["carrot.split"] == "val"
        if child.info.status == "FINISHED":  # all of them here
            for key in METRICS:
                history = mlflow_client.get_metric_history(child.info.run_id, key)
                assert [m.step for m in history] == [1, 2], key
            assert "optim.lr" in child.data.params and "data.sampler" in child.data.params
    assert sorted(int(c.data.tags["carrot.trial"]) for c in children) == [0, 1, 2]

    # trial 0 is the recommended setting
    study = optuna.load_study(study_name="digits-test_resnet-baseline", storage=_journal(store))
    assert study.trials[0].params["optim.lr"] == pytest.approx(3e-3)
    assert study.trials[0].params["data.sampler"] == "random"

    # running again continues the same study under the same parent run
    assert main(argv + ["--trials", "2"]) == 0
    study = optuna.load_study(study_name="digits-test_resnet-baseline", storage=_journal(store))
    assert len(study.trials) == 5
    runs = mlflow_client.search_runs([exp.experiment_id])
    assert len([r for r in runs if r.data.tags.get("carrot.role") == "study"]) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(c.data.tags["carrot.trial"]) for c in children) == [0, 1, 2, 3, 4]
    # continuing with another training budget is refused before any run is created
    n_runs = len(mlflow_client.search_runs([exp.experiment_id]))
    argv_changed = [a if a != "2" else "3" for a in argv]  # --epochs 3
    assert main(argv_changed + ["--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "optim.epochs" in err
    assert len(mlflow_client.search_runs([exp.experiment_id])) == n_runs
    # every trial's run id is recorded in the study
    ids = {t.user_attrs.get("mlflow_run_id") for t in study.trials if t.state.name == "COMPLETE"}
    assert ids <= {c.info.run_id for c in children}

    # a worker joining the study reopens its parent run while it works and closes it when it is
    # the last one out: nothing stays RUNNING
    assert mlflow_client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert main(["worker", "--study-name", "digits-test_resnet-baseline", "--trials", "1", "--no-progress"]) == 0
    runs = mlflow_client.search_runs([exp.experiment_id])
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]) == 6
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    assert mlflow_client.get_run(parent.info.run_id).info.status == "FINISHED"


def _journal(store):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(store / "studies" / "optuna.journal")))
