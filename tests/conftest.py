"""Shared fixtures: real MLflow and Optuna stores in a temporary folder."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _tracking_uri_restored():
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI in the environment; a test must not
    leave its store's URI to the next one."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """Run inside an empty folder with its own sqlite MLflow store and studies/ folder."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "mlruns").mkdir()
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield tmp_path


@pytest.fixture()
def mlflow_client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def tiny_config(**overrides):
    """A RunConfig that trains in a second or two on a CPU."""
    from carrot.config import RunConfig

    data = {
        "data": {"name": "digits", "image_size": 16, "batch_size": 32},
        "optim": {"epochs": 2, "lr": 3e-3},
        "eval": {"probe_max_train": 300, "probe_l2_grid": [1e-3, 1e-2]},
        "show_progress": False,
        "device": "cpu",
    }
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return RunConfig.from_dict(data)


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV table, keyed by header."""
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def md_rows(path: Path) -> list[dict[str, str]]:
    """The rows of the first Markdown table in a file, keyed by header."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    return [dict(zip(header, [c.strip() for c in line.strip().strip("|").split(" | ")])) for line in lines[1:]]


@contextlib.contextmanager
def module_store(root: Path):
    """A fresh MLflow store ``root/mlruns/mlflow.db`` for a module-scoped fixture: the
    tracking URI set (environment and mlflow) and the working folder at ``root`` while it is
    open; both restored after. Yields (uri, MlflowClient)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    (root / "mlruns").mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.chdir(root)
    mlflow.set_tracking_uri(uri)
    try:
        yield uri, MlflowClient(tracking_uri=uri)
    finally:
        mp.undo()
        mlflow.set_tracking_uri(previous)
