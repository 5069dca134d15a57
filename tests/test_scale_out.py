"""Scale-out on the real stores: parallel workers on a fresh store, submitit's local executor,
and two workers on a real PostgreSQL server with Optuna's heartbeat."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

ARGS = ["--variant", "baseline", "--epochs", "2", "--image-size", "16", "--no-progress",
        "--set", "eval.probe_max_train=200", "--set", "data.batch_size=32"]
NAME = "digits-test_resnet-baseline"


def _carrot(cwd: Path, *argv: str, env: dict | None = None, wait: bool = True):
    proc = subprocess.Popen([sys.executable, "-m", "carrot.cli", *argv], cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=900)
    return proc.returncode, out, err


def _check_study(storage, client, expected: int, recommended_lr: float = 3e-3) -> optuna.Study:
    study = optuna.load_study(study_name=NAME, storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert expected <= len(finished) <= expected + 2, len(finished)  # workers finishing together may add one each
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)
    assert sum(t.params.get("optim.lr") == recommended_lr and t.params.get("data.sampler") == "random"
               for t in study.trials) == 1  # the recommended setting, trained once
    searched = [json.dumps(t.params, sort_keys=True) for t in finished]
    assert len(set(searched)) == len(searched)  # workers draw apart (no shared sampler seed)
    exp = client.get_experiment_by_name("carrot")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("carrot.role") == "study"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("carrot.role") == "trial"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.info.run_id for c in children} == {t.user_attrs["mlflow_run_id"] for t in study.trials
                                                 if "mlflow_run_id" in t.user_attrs}
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []
    return study


def test_three_jobs_on_a_fresh_store(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from carrot.study import open_storage

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"  # neither store exists yet
    rc, out, err = _carrot(tmp_path, "study", *ARGS, "--trials", "6", "--jobs", "3",
                           env={"MLFLOW_TRACKING_URI": uri})
    logs = "".join(p.read_text() for p in (tmp_path / "studies" / "logs" / NAME).glob("worker-*.log"))
    assert rc == 0, err + logs
    assert "Traceback" not in out + err + logs
    assert "trials finished" in out  # one progress display for the whole study
    monkeypatch.chdir(tmp_path)
    _check_study(open_storage(None), MlflowClient(tracking_uri=uri), expected=6)


def test_submitit_local_executor_runs_a_two_worker_study(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from carrot.study import open_storage

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    rc, out, err = _carrot(tmp_path, "study", *ARGS, "--trials", "3", "--jobs", "2", "--launcher", "submitit-local",
                           env={"MLFLOW_TRACKING_URI": uri})
    assert rc == 0, out + err
    assert "job array" in out
    monkeypatch.chdir(tmp_path)
    _check_study(open_storage(None), MlflowClient(tracking_uri=uri), expected=3)


# ----------------------------------------------------------------------------- PostgreSQL
def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture()
def postgres(tmp_path):
    """A PostgreSQL server of its own in a temporary folder (Debian's postgresql package)."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="carrot-pg-"))  # outside pytest's root-only folders
    data = home / "pg"
    run_as = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        shutil.chown(home, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run(run_as + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "carrot"],
                   check=True, capture_output=True)
    port = 55432 + os.getpid() % 1000
    subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(home / "pg.log"), "-o",
                             f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        subprocess.run(run_as + [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "carrot",
                                 "studies"], check=True, capture_output=True)
        yield f"postgresql+psycopg://carrot:secretpw@127.0.0.1:{port}/studies"
    finally:
        subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def test_two_workers_on_postgresql_and_a_killed_worker(postgres, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from carrot import liveness
    from carrot.study import open_storage

    work = tmp_path / "work"
    work.mkdir()
    uri = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # this process closes the killed worker's run
    rc, out, err = _carrot(work, "study", *ARGS, "--trials", "4", "--jobs", "2", "--storage", postgres, env=env)
    assert rc == 0, err
    assert "secretpw" not in out + err
    monkeypatch.chdir(work)
    client = MlflowClient(tracking_uri=uri)
    _check_study(open_storage(postgres), client, expected=4)
    parent = [r for r in client.search_runs([client.get_experiment_by_name("carrot").experiment_id])
              if r.data.tags.get("carrot.role") == "study"][0]
    assert "secretpw" not in json.dumps(parent.data.tags) and "***" in parent.data.tags["carrot.study_storage"]

    # a worker SIGKILLed mid-trial: Optuna's heartbeat fails its trial once the grace period has passed
    monkeypatch.setattr(liveness, "GRACE_PERIOD_S", 4.0)
    monkeypatch.setattr(liveness, "HEARTBEAT_INTERVAL_S", 1.0)
    proc = _carrot(work, "worker", "--storage", postgres, "--study-name", NAME, "--trials", "1", "--no-progress",
                   env={**env, "CARROT_HEARTBEAT_S": "1", "CARROT_GRACE_S": "4"}, wait=False)
    storage = open_storage(postgres)
    deadline = time.time() + 300
    while time.time() < deadline:
        running = [t for t in optuna.load_study(study_name=NAME, storage=storage).trials
                   if t.state == optuna.trial.TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
        if running:
            break
        time.sleep(0.2)
    assert running, proc.communicate()
    proc.send_signal(signal.SIGKILL)  # at once: its trial takes seconds
    proc.communicate(timeout=60)
    time.sleep(5)  # past the grace period: no heartbeat since the kill
    optuna.storages.fail_stale_trials(optuna.load_study(study_name=NAME, storage=storage))
    dead = optuna.load_study(study_name=NAME, storage=storage).trials[running[0].number]
    assert dead.state == optuna.trial.TrialState.FAIL
    run = client.get_run(dead.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["carrot.error"]
    waiting = [t for t in optuna.load_study(study_name=NAME, storage=storage).trials
               if t.state == optuna.trial.TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].params == dead.params  # its configuration, queued again
