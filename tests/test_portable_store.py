"""A store moved as a whole folder still builds the same tables.

Real final runs are trained into ``<project>/mlruns/`` (``mlflow.db`` and ``artifacts/``, the
layout ``carrot`` writes), the tables are built, then the whole project folder is moved away
(``shutil.move``: the original path is gone) and the tables are built again from the moved
store. The runs' artifact URIs still name the old folder; ``analysis`` finds each run's
``confusion.npz`` and ``predictions.npz`` at the same relative place under the moved store.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import module_store, read_csv, tiny_config

TABLES = ("main_results", "significance", "confusable_pairs", "reference_pairs", "geometry", "ablations", "importance")
FINAL = (("baseline", 0), ("barrier", 0))
# As small as a final run gets: one epoch on 10 images per class, one probed layer, one L2 value.
TINY = {"optim.epochs": 1, "data.limit_per_class": 10, "eval.probe_max_train": 40, "eval.probe_l2_grid": [1e-2],
        "model.probe_layers": ["layer4"], "data.batch_size": 32}
STORAGE = "no-study.journal"  # the same (absent) Optuna storage before and after the move


def build_tables(uri: str, out: Path, capsys) -> tuple[int, str]:
    from analysis import tables

    capsys.readouterr()
    code = tables.main(["--out", str(out), "--tracking-uri", uri, "--storage", STORAGE])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """Two real final runs in <root>/project/mlruns, tables built, then the project moved."""
    from carrot.train import run

    root = tmp_path_factory.mktemp("portable")
    project = root / "project"
    with module_store(project) as (uri, client):
        ids = {}
        for variant, seed in FINAL:
            cfg = tiny_config(**{"variant.name": variant, "split": "test", "seed": seed, **TINY})
            result = run(cfg, run_name=f"final-{variant}-s{seed}", log=lambda s: None)
            client.set_tag(result.run_id, "carrot.role", "final")
            ids[(variant, seed)] = result.run_id
        logged = {key: client.get_run(rid).info.artifact_uri for key, rid in ids.items()}
        os.chdir(root)  # module_store returns to the first folder when it closes
        from analysis import tables

        assert tables.main(["--out", str(root / "before"), "--tracking-uri", uri, "--storage", STORAGE]) == 0
        (root / "elsewhere").mkdir()
        shutil.move(str(project), str(root / "elsewhere" / "project"))
        assert not project.exists()
        new_uri = f"sqlite:///{root / 'elsewhere' / 'project' / 'mlruns' / 'mlflow.db'}"
        yield {"root": root, "old": project, "uri": new_uri, "ids": ids, "logged": logged}


def test_tables_from_a_moved_store_equal_the_tables_before_the_move(moved, capsys):
    root = moved["root"]
    code, err = build_tables(moved["uri"], root / "after", capsys)
    assert code == 0
    assert "not found" not in err, err
    # the artifact-dependent tables read every run's confusion.npz and predictions.npz ...
    pairs = read_csv(root / "after" / "reference_pairs.csv")
    assert pairs and all(r["n_baseline_runs"] == "1" for r in pairs)
    rescored = {r["variant"]: r for r in read_csv(root / "after" / "confusable_pairs.csv")}
    assert rescored["baseline"]["n_rescored"] == "1" and rescored["barrier"]["n_rescored"] == "1"
    sig = [r for r in read_csv(root / "after" / "significance.csv") if r["variant"] == "barrier"]
    assert sig and sig[0]["b"] != "" and sig[0]["n_samples"] not in ("", "0")
    # ... and every table is the same, byte for byte, as before the move
    for name in TABLES:
        for ext in ("md", "tex", "csv"):
            before = (root / "before" / f"{name}.{ext}").read_bytes()
            assert (root / "after" / f"{name}.{ext}").read_bytes() == before, f"{name}.{ext}"


def test_an_artifact_is_read_from_the_moved_folder(moved, tmp_path):
    from analysis.common import Artifacts, artifact_folder, connect, download_artifact, local_path

    client = connect(moved["uri"])
    rid = moved["ids"][("baseline", 0)]
    old = local_path(moved["logged"][("baseline", 0)])
    assert old is not None and not old.exists(), "the run's logged artifact folder is gone"
    folder = artifact_folder(client, rid)
    new_store = Path(moved["uri"][len("sqlite:///"):]).parent
    assert folder.path == new_store / old.relative_to(moved["old"] / "mlruns")
    got = download_artifact(client, rid, "confusion.npz", tmp_path)
    assert got is not None and got.read_bytes() == (folder.path / "confusion.npz").read_bytes()
    with np.load(got) as data:
        cm = data["confusion"][-1]
    assert np.array_equal(Artifacts(client).confusion(rid), cm) and cm.sum() > 0


def test_a_store_copied_without_its_artifacts_says_which_run_and_where_it_looked(moved, tmp_path, capsys):
    # only the database is copied: the artifacts are neither at the logged path (moved away)
    # nor under the copy's folder
    copy = tmp_path / "copy" / "mlruns"
    copy.mkdir(parents=True)
    shutil.copy(Path(moved["uri"][len("sqlite:///"):]), copy / "mlflow.db")
    code, err = build_tables(f"sqlite:///{copy / 'mlflow.db'}", tmp_path / "out", capsys)
    assert code == 0
    for (variant, seed), rid in moved["ids"].items():
        line = next((x for x in err.splitlines() if f"run {rid}: artifact confusion.npz not found" in x), None)
        assert line is not None, (variant, seed, err)
        old = local_path_of(moved["logged"][(variant, seed)])
        assert str(old) in line, line
        assert str(copy / old.relative_to(moved["old"] / "mlruns")) in line, line
    assert f"run {moved['ids'][('barrier', 0)]}: artifact predictions.npz not found" in err
    # the tables say why there are no reference pairs instead of implying the runs never logged any
    text = (tmp_path / "out" / "reference_pairs.md").read_text()
    assert "the artifacts of 1 baseline run(s) were found neither where the run logged them nor under " \
           "the store's folder" in text
    # and the significance table names the same cause, not runs that never logged predictions
    text = (tmp_path / "out" / "significance.md").read_text()
    assert "the artifacts of 1 of these runs were not found or could not be read" in text \
        and "finished before" not in text


def local_path_of(uri: str) -> Path:
    from analysis.common import local_path

    path = local_path(uri)
    assert path is not None, uri
    return path


def test_evaluate_reads_a_moved_store(moved, monkeypatch):
    """`carrot evaluate` finds a run's artifacts where the tables find them (it said the run had
    no config.json). These runs were trained by `run` itself, which keeps no weights: that is
    what it now says."""
    from carrot.config import ConfigError
    from carrot.reevaluate import reevaluate

    monkeypatch.setenv("MLFLOW_TRACKING_URI", moved["uri"])
    monkeypatch.chdir(moved["root"])
    rid = moved["ids"][("baseline", 0)]
    with pytest.raises(ConfigError) as exc:
        reevaluate(rid, log=lambda s: None)
    assert str(exc.value).startswith(f"run {rid} kept no weights.pt"), exc.value


def test_evaluate_says_where_it_looked_for_a_runs_artifacts(moved, tmp_path, monkeypatch):
    from carrot.config import ConfigError
    from carrot.reevaluate import reevaluate

    copy = tmp_path / "copy" / "mlruns"  # the database alone
    copy.mkdir(parents=True)
    shutil.copy(Path(moved["uri"][len("sqlite:///"):]), copy / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{copy / 'mlflow.db'}")
    rid = moved["ids"][("baseline", 0)]
    with pytest.raises(ConfigError) as exc:
        reevaluate(rid, log=lambda s: None)
    assert f"run {rid}: artifact config.json not found" in str(exc.value)
    assert str(copy) in str(exc.value)


def test_a_copied_store_says_where_its_new_runs_write(tmp_path, monkeypatch, capsys):
    """MLflow fixes an experiment's artifact folder when the experiment is made: new runs of a
    copied store wrote their files into the original's folder without a word."""
    from mlflow.tracking import MlflowClient

    from carrot import tracking

    original = tmp_path / "a" / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{original / 'mlflow.db'}")
    tracking.experiment_id(tracking.client(), "carrot")
    assert "note" not in capsys.readouterr().err  # its own store: nothing to say
    copy = tmp_path / "b" / "mlruns"
    shutil.copytree(original, copy)
    uri = f"sqlite:///{copy / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.experiment_id(tracking.client(), "carrot")
    assert capsys.readouterr().err == (
        f"carrot: note: experiment 'carrot' of the store in {copy} keeps its runs' files in "
        f"{original / 'artifacts' / 'carrot'}, outside that folder (the store was copied or moved), and new runs write "
        "there too; give another --experiment to keep a copy's new runs with it\n")
    fresh = tracking.experiment_id(tracking.client(), "copy-experiment")  # a new experiment lives with the copy
    assert MlflowClient(uri).get_experiment(fresh).artifact_location.startswith((copy / "artifacts").as_uri())
