"""`make ui` serves the runs: fetch the run list through MLflow's REST API from the served UI; and a
study logs through an `mlflow server`, as workers on other machines do."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import REPO, tiny_config

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(target: list[str]) -> subprocess.Popen:
    return subprocess.Popen(["make", "-s", "-C", str(REPO), *target], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout and proc.poll() is not None else ""
            pytest.fail(f"server did not come up at {url}: {out[-2000:]}")
        time.sleep(1)


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_make_dashboard_serves_the_study(store):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = store / "studies" / "optuna.journal"
    journal.parent.mkdir()
    study = optuna.create_study(study_name="digits-test_resnet-baseline",
                                storage=JournalStorage(JournalFileBackend(str(journal))))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    port = _free_port()
    proc = _serve(["dashboard", f"DASHBOARD_PORT={port}", f"STORAGE={journal}"])
    try:
        _wait_for(proc, f"http://127.0.0.1:{port}/api/studies")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10) as r:
            names = [s["study_name"] for s in json.load(r)["study_summaries"]]
        assert names == ["digits-test_resnet-baseline"]
    finally:
        _stop(proc)


def test_make_ui_serves_runs_over_rest(store):
    from carrot.train import run

    result = run(tiny_config(**{"optim.epochs": 1}), log=lambda s: None)
    port = _free_port()
    proc = _serve(["ui", f"PORT={port}"])
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for(proc, base + "/health")
        req = urllib.request.Request(
            base + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=carrot")
        with urllib.request.urlopen(req, timeout=10) as r:
            exp_id = json.load(r)["experiment"]["experiment_id"]
        body = json.dumps({"experiment_ids": [exp_id], "max_results": 10}).encode()
        req = urllib.request.Request(base + "/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            runs = json.load(r)["runs"]
        assert [r["info"]["run_id"] for r in runs] == [result.run_id]
        metrics = {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}
        assert metrics["val/acc"] == pytest.approx(result.objective)
        tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
        assert tags["carrot.variant"] == "baseline"
        # the run's pictures, fetched as the UI's image view fetches them: served as SVG images
        from carrot.run_report import CONFUSION_IMAGE

        with urllib.request.urlopen(f"{base}/get-artifact?path={CONFUSION_IMAGE}&run_uuid={result.run_id}",
                                    timeout=10) as r:
            assert r.headers["Content-Type"].startswith("image/svg+xml")
            assert r.read().startswith(b"<svg ")
    finally:
        _stop(proc)


def test_a_study_logs_through_an_mlflow_tracking_server(tmp_path):
    """Workers on other machines log to an ``mlflow server`` (REST store, proxied artifacts): a
    study through one ends every run, with its metrics, artifacts and pictures on the server, and
    links its trials to the server's pages."""
    import sys

    import optuna
    from mlflow.tracking import MlflowClient

    from carrot import contract
    from carrot.run_report import CONFUSION_IMAGE, PAIRS_IMAGE, TRAJECTORY_IMAGE
    from carrot.study import open_storage

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    (tmp_path / "server").mkdir()
    log = (tmp_path / "server.log").open("wb")  # a file: a pipe nobody reads could fill and stall the server
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}",
                               "--artifacts-destination", str(tmp_path / "server" / "artifacts")],
                              cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    worker = tmp_path / "worker"
    worker.mkdir()
    try:
        _wait_for(server, base + "/health")
        env = {**os.environ, "MLFLOW_TRACKING_URI": base}
        done = subprocess.run([sys.executable, "-m", "carrot.cli", "study", "--variant", "baseline", "--trials", "3",
                               "--epochs", "2", "--no-progress"], cwd=worker, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        client = MlflowClient(tracking_uri=base)
        experiment = client.get_experiment_by_name("carrot").experiment_id
        runs = client.search_runs([experiment])
        trials = [r for r in runs if r.data.tags.get(contract.TAG_ROLE) == contract.ROLE_TRIAL]
        assert len(trials) == 3 and len(runs) == 4  # and the study's parent run
        assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}
        for run in trials:
            epochs = int(run.data.tags[contract.TAG_EPOCHS_DONE])
            history = client.get_metric_history(run.info.run_id, "val/acc")
            assert sorted(m.step for m in history) == list(range(1, epochs + 1))
            assert run.data.metrics["time/logging_s"] > 0
            names = {a.path for a in client.list_artifacts(run.info.run_id, "images")}
            assert names == {CONFUSION_IMAGE, PAIRS_IMAGE, TRAJECTORY_IMAGE}
            picture = client.download_artifacts(run.info.run_id, CONFUSION_IMAGE, str(tmp_path / run.info.run_id))
            assert open(picture, "rb").read().startswith(b"<svg ")
            assert contract.CONFIG_ARTIFACT in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert not list(worker.glob("mlruns"))  # nothing logged locally
        study = optuna.load_study(study_name="digits-test_resnet-baseline",
                                  storage=open_storage(str(worker / "studies" / "optuna.journal")))
        by_id = {r.info.run_id: r for r in trials}
        for trial in study.trials:
            run_id = trial.user_attrs[contract.TRIAL_RUN_ID_ATTR]
            assert trial.user_attrs[contract.TRIAL_RUN_URL_ATTR] == (
                f"{base}/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning")
            assert run_id in by_id
    finally:
        _stop(server)
        log.close()


def test_make_ui_and_dashboard_say_what_is_missing_in_one_line(store):
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://user:s3cret-pw@127.0.0.1:1"}
    ui = subprocess.run(["make", "-s", "-C", str(REPO), "ui", f"PORT={_free_port()}"], env=env,
                        capture_output=True, text=True, timeout=120)
    assert ui.returncode == 2 and "Traceback" not in ui.stderr and "s3cret-pw" not in ui.stdout + ui.stderr
    assert "make ui: MLFLOW_TRACKING_URI names a tracking server, which serves the MLflow UI itself" in ui.stderr
    missing = store / "studies" / "none.journal"
    board = subprocess.run(["make", "-s", "-C", str(REPO), "dashboard", f"STORAGE={missing}",
                            f"DASHBOARD_PORT={_free_port()}"], capture_output=True, text=True, timeout=120)
    assert board.returncode == 2 and "Traceback" not in board.stderr
    assert f"make dashboard: no Optuna storage at {missing}; expected the journal of a study" in board.stderr
    assert not missing.exists()
    worker = subprocess.run(["make", "-s", "-C", str(REPO), "worker"], capture_output=True, text=True, timeout=120)
    assert worker.returncode == 2 and worker.stderr.startswith("make worker: STUDY= is required"), worker.stderr


def test_make_ui_and_dashboard_refuse_a_port_they_cannot_serve_in_one_line(store):
    """`make ui PORT=99999` gave uvicorn's traceback and exit 0; a port in use, an error line
    among MLflow's start-up lines and exit 0."""
    journal = store / "studies" / "optuna.journal"
    journal.parent.mkdir()
    journal.touch()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for target, variable, value, words in [
            ("ui", "PORT", "99999", "is not a port; expected an integer from 1 to 65535"),
            ("ui", "PORT", "http", "is not a port; expected an integer from 1 to 65535"),
            ("ui", "PORT", str(busy), "is in use on 127.0.0.1"),
            ("dashboard", "DASHBOARD_PORT", "0", "is not a port; expected an integer from 1 to 65535"),
            ("dashboard", "DASHBOARD_PORT", str(busy), "is in use on 127.0.0.1"),
        ]:
            done = subprocess.run(["make", "-s", "-C", str(REPO), target, f"{variable}={value}", f"STORAGE={journal}"],
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 2, (target, value, done.stdout, done.stderr)
            assert done.stderr.splitlines()[0].startswith(f"make {target}: {variable}={value} {words}")
            assert "Traceback" not in done.stderr and done.stdout == ""
