"""Bad input: one clear line naming what is wrong and what is valid, exit 2, no run created."""
from __future__ import annotations

import pytest

from carrot.cli import main


def _runs(store):
    from mlflow.tracking import MlflowClient

    import os

    c = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("carrot")
    return [] if exp is None else c.search_runs([exp.experiment_id])


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["study", "--variant", "nope"], ["unknown", "nope", "baseline", "expansion"]),
        (["train", "--dataset", "imagenet42"], ["dataset", "imagenet42", "digits", "synthetic"]),
        (["study", "--backbone", "resnet_does_not_exist"], ["backbone", "resnet_does_not_exist", "timm"]),
        (["study", "--epochs", "-1"], ["epochs=-1", "positive integer"]),
        (["study", "--trials", "0"], ["trials=0", "positive integer"]),
        (["train", "--set", "optim.nonsense=3"], ["unknown config key", "optim.nonsense"]),
        (["train", "--set", "variant.hparams.zzz=1"], ["zzz", "valid"]),
        (["train", "--dataset", "cub"], ["cub", "root"]),
        (["train", "--device", "tpu"], ["device", "tpu", "cpu"]),
    ],
)
def test_bad_input_is_one_clear_line(store, capsys, argv, expected):
    code = main(argv + ["--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("carrot: error:")
    for word in expected:
        assert word in err, (word, err)
    assert _runs(store) == []
    assert not (store / "studies" / "optuna.journal").exists() or argv[0] != "study" or "--trials" in argv


def test_unwritable_store_fails_before_any_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the store folder should be")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")
    code = main(["study", "--trials", "1", "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "MLflow store is not writable" in err and str(blocker) in err
    assert not (tmp_path / "studies").exists()


def test_unwritable_study_storage(store, capsys):
    blocker = store / "blocker"
    blocker.write_text("x")
    code = main(["study", "--trials", "1", "--epochs", "1", "--storage", str(blocker / "s.journal"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Optuna study storage is not writable" in err
    assert _runs(store) == []
