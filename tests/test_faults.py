"""A study that survives real use, on the real stores in a temporary folder: SIGTERM, SIGINT and
SIGKILL during a trial, then a restart; dead workers found; failures that carry their reason."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

pytestmark = pytest.mark.slow

ARGS = ["--variant", "baseline", "--epochs", "4", "--image-size", "16", "--no-progress",
        "--set", "eval.probe_max_train=200", "--set", "data.batch_size=32"]


def _carrot(store: Path, *argv: str, wait: bool = True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "carrot.cli", *argv], cwd=store, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = proc.communicate(timeout=600)
        return proc.returncode, out, err
    return proc


def _wait_for(path_glob: str, root: Path, proc, timeout: float = 300) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted(root.glob(path_glob))
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"nothing matched {path_glob}")


def _study(store: Path) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(store / "studies" / "optuna.journal")))
    return optuna.load_study(study_name="digits-test_resnet-baseline", storage=storage)


def _runs(client):
    exp = client.get_experiment_by_name("carrot")
    return client.search_runs([exp.experiment_id])


def _nothing_running(store: Path, client) -> None:
    assert [t.number for t in _study(store).trials if t.state == optuna.trial.TrialState.RUNNING] == []
    assert [(r.info.run_name, r.info.status) for r in _runs(client) if r.info.status == "RUNNING"] == []


@pytest.mark.heavy
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_the_trial_cleanly_and_the_restart_resumes_it(store, mlflow_client, sig, code):
    proc = _carrot(store, "study", *ARGS, "--trials", "2", wait=False)
    _wait_for("studies/checkpoints/*/trial-0/last.pt", store, proc)  # trial 0 is past its first epoch
    sent = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert time.time() - sent < 30
    assert proc.returncode == code, err
    assert "Traceback" not in err and "Traceback" not in out
    assert err.strip().splitlines() == [  # one line when the signal arrives, one when the trial has stopped
        f"carrot: {sig.name} received: stopping at the next step (send it again, 3 s or more later, to exit "
        "at once)",
        f"carrot: interrupted by {sig.name}: the current run ended KILLED; run the same command again to resume "
        "(the trial goes on from its last checkpoint)"], err
    assert "trial 0" not in out, out

    study = _study(store)
    trial0 = study.trials[0]
    assert trial0.state == optuna.trial.TrialState.FAIL
    assert trial0.user_attrs["error"] == f"interrupted by {sig.name}"
    run = mlflow_client.get_run(trial0.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["carrot.error"] == f"interrupted by {sig.name}"
    parents = [r for r in _runs(mlflow_client) if r.data.tags.get("carrot.role") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    _nothing_running(store, mlflow_client)
    waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].params == trial0.params  # the killed configuration, queued again

    rc, out, err = _carrot(store, "study", *ARGS, "--trials", "1")
    assert rc == 0, err
    study = _study(store)
    retry = study.trials[1]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == trial0.params
    run = mlflow_client.get_run(retry.user_attrs["mlflow_run_id"])
    assert run.data.tags["carrot.resumed_from"].endswith("trial-0/last.pt")
    assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "val/acc")] == [1, 2, 3, 4]
    _nothing_running(store, mlflow_client)
    assert not list(store.glob("studies/checkpoints/*/trial-*"))  # finished trials keep none


@pytest.mark.heavy
def test_sigkill_then_restart_retries_from_the_checkpoint(store, mlflow_client):
    from carrot.study import trial_config
    from carrot.train import run

    proc = _carrot(store, "study", *ARGS, "--trials", "4", wait=False)
    _wait_for("studies/checkpoints/*/trial-1/last.pt", store, proc)
    proc.kill()  # SIGKILL: no handler runs, trial 1 and its run stay RUNNING
    proc.communicate(timeout=60)
    study = _study(store)
    assert study.trials[1].state == optuna.trial.TrialState.RUNNING

    rc, out, err = _carrot(store, "study", *ARGS, "--trials", "1")
    assert rc == 0, err
    assert "trial 1: worker process" in out
    study = _study(store)
    dead = study.trials[1]
    assert dead.state == optuna.trial.TrialState.FAIL and "is gone" in dead.user_attrs["error"]
    dead_run = mlflow_client.get_run(dead.user_attrs["mlflow_run_id"])
    assert dead_run.info.status == "KILLED" and "is gone" in dead_run.data.tags["carrot.error"]
    retry = study.trials[2]
    assert retry.params == dead.params and retry.state == optuna.trial.TrialState.COMPLETE
    retry_run = mlflow_client.get_run(retry.user_attrs["mlflow_run_id"])
    assert retry_run.data.tags["carrot.resumed_from"].endswith("trial-1/last.pt")
    _nothing_running(store, mlflow_client)

    # the same configuration trained without interruption ends with the same accuracy
    from carrot.cli import build_config
    import argparse

    ns = argparse.Namespace(variant="baseline", dataset=None, data_root=None, workers=None, image_size=16,
                            batch_size=None, backbone=None, pretrained_path=None, epochs=4, device=None, seed=None,
                            experiment=None, config=None, no_progress=True,
                            set=["eval.probe_max_train=200", "data.batch_size=32"])
    cfg = trial_config(build_config(ns), retry.params)
    whole = run(cfg, track=False, log=lambda s: None)
    assert retry.value == whole.objective


def test_a_diverging_trial_is_pruned_with_its_reason_and_the_study_goes_on(store, mlflow_client):
    from carrot.study import open_storage, run_study
    from conftest import tiny_config

    # a learning rate of 1e30 turns the weights, then the loss, into inf/NaN within an epoch
    base = tiny_config(**{"optim.epochs": 2, "optim.grad_clip": None})
    study = optuna.create_study(study_name="digits-test_resnet-baseline", storage=open_storage(None),
                                direction="maximize")
    study.enqueue_trial({"optim.lr": 1e30, "optim.weight_decay": 0.05, "data.sampler": "random",
                         "data.m_per_class": 4})
    summary = run_study(base, trials=2, log=lambda s: None)
    study = _study(store)
    diverged = study.trials[0]
    assert diverged.state == optuna.trial.TrialState.PRUNED
    assert "non-finite training loss" in diverged.user_attrs["pruned_reason"]
    run = mlflow_client.get_run(diverged.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and "non-finite training loss" in run.data.tags["carrot.error"]
    assert "non-finite" in run.data.tags["mlflow.note.content"]
    assert summary.n_complete == 1  # the next trial ran
    assert not list(store.glob("studies/checkpoints/*/trial-*"))  # pruned and finished trials keep none


def test_same_named_studies_in_two_storages_have_two_parent_runs(store, mlflow_client):
    from carrot.study import run_study
    from conftest import tiny_config

    a = run_study(tiny_config(**{"optim.epochs": 1}), trials=1, storage=str(store / "a.journal"), log=lambda s: None)
    b = run_study(tiny_config(**{"optim.epochs": 2}), trials=1, storage=str(store / "b.journal"), log=lambda s: None)
    assert a.name == b.name and a.study_id != b.study_id and a.parent_run_id != b.parent_run_id
    for summary in (a, b):
        parent = mlflow_client.get_run(summary.parent_run_id)
        assert parent.data.tags["carrot.study_id"] == summary.study_id
        trial = mlflow_client.get_run(summary.best_run_id)
        assert trial.data.tags["carrot.study_id"] == summary.study_id
        assert trial.data.tags["mlflow.parentRunId"] == summary.parent_run_id
    # continuing study a again finds its own parent run, not b's
    again = run_study(tiny_config(**{"optim.epochs": 1}), trials=1, storage=str(store / "a.journal"),
                      log=lambda s: None)
    assert again.parent_run_id == a.parent_run_id


@pytest.mark.heavy
def test_ctrl_c_to_the_group_of_a_study_with_two_workers_ends_every_trial_cleanly(store, mlflow_client):
    """A terminal's Ctrl-C reaches the coordinator and both workers, and the coordinator passes the
    stop on as well: each worker gets two signals at once, which are one request, so each ends its
    trial (FAIL with the reason, its run KILLED) instead of exiting on the spot."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "carrot.cli", "study", *ARGS, "--epochs", "6", "--trials", "2",
                             "--jobs", "2"], cwd=store, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    for number in (0, 1):
        _wait_for(f"studies/checkpoints/*/trial-{number}/last.pt", store, proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err + out and "exiting now" not in err
    logs = "".join(p.read_text() for p in store.glob("studies/logs/*/worker-*.log"))
    assert "exiting now" not in logs and "Traceback" not in logs and "exited with status" not in out + err
    study = _study(store)
    stopped = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert sorted(t.number for t in stopped) == [0, 1]
    for trial in stopped:
        assert trial.user_attrs["error"] == "interrupted by SIGINT"
        run = mlflow_client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["carrot.error"] == "interrupted by SIGINT"
    _nothing_running(store, mlflow_client)
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]) == 2  # both queued again


def test_a_failed_trial_with_a_queued_retry_does_not_count_as_finished():
    from optuna.storages import RetryFailedTrialCallback

    from carrot.study import _finished

    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.COMPLETE, value=0.5, params={"x": 0.1},
                                        distributions=dist))
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.FAIL, params={"x": 0.2}, distributions=dist))
    assert _finished(study) == 2  # a failure with no retry is a finished trial
    retry = RetryFailedTrialCallback(max_retry=1)
    retry(study, study.trials[1])  # its configuration queued again (WAITING): the retry stands for it
    assert _finished(study) == 1
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # the retry fails as well ...
    retry(study, study.trials[2])  # ... and max_retry=1 queues nothing more: it counts, once
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "FAIL"]
    assert _finished(study) == 2


@pytest.mark.heavy
def test_a_worker_until_n_runs_the_retry_of_the_trial_it_reaps(store, mlflow_client):
    proc = _carrot(store, "study", *ARGS, "--trials", "1", wait=False)
    _wait_for("studies/checkpoints/*/trial-0/last.pt", store, proc)
    proc.kill()  # trial 0 and its run stay RUNNING
    proc.communicate(timeout=60)
    rc, out, err = _carrot(store, "worker", "--study-name", "digits-test_resnet-baseline", "--until", "1",
                           "--no-progress")
    assert rc == 0, err
    assert "trial 0: worker process" in out
    study = _study(store)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]  # the reaped trial's retry ran
    assert study.trials[1].params == study.trials[0].params
    run = mlflow_client.get_run(study.trials[1].user_attrs["mlflow_run_id"])
    assert run.data.tags["carrot.resumed_from"].endswith("trial-0/last.pt")
    _nothing_running(store, mlflow_client)


def test_a_study_that_ends_while_another_process_runs_a_trial_leaves_the_parent_run_to_it(store, mlflow_client):
    """Two `carrot study` on one study: the first to end must not close the parent run while the
    other's trial runs; whoever ends last closes it."""
    import socket

    from carrot import liveness
    from carrot.study import open_storage, run_study
    from conftest import tiny_config

    base = tiny_config(**{"optim.epochs": 1})
    first = run_study(base, trials=1, log=lambda s: None)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # the other live worker
    try:
        study = optuna.load_study(study_name=first.name, storage=open_storage(None))
        trial = study.ask()  # its trial, RUNNING
        trial.set_user_attr(liveness.WORKER_ATTR, {"host": socket.gethostname(), "pid": other.pid,
                                                   "start": liveness.process_start_time(other.pid)})
        second = run_study(base, trials=1, log=lambda s: None)
        assert second.parent_run_id == first.parent_run_id
        assert mlflow_client.get_run(first.parent_run_id).info.status == "RUNNING"  # the other is still at work
    finally:
        other.kill()
        other.wait()
    # the other worker is gone: the next one to end reaps its trial and, last out, closes the run
    run_study(base, trials=1, log=lambda s: None)
    assert mlflow_client.get_run(first.parent_run_id).info.status == "FINISHED"
    _nothing_running(store, mlflow_client)


@pytest.mark.heavy
def test_the_coordinator_of_two_workers_cleans_up_after_workers_killed_mid_trial(store, mlflow_client):
    """Workers that die mid-trial (SIGKILL, the OOM killer, a second signal's exit at once) leave
    their trials RUNNING; the coordinator that started them fails those trials with the reason,
    closes their runs and queues them again, so nothing stays RUNNING."""
    proc = _carrot(store, "study", *ARGS, "--epochs", "6", "--trials", "2", "--jobs", "2", wait=False)
    for number in (0, 1):
        _wait_for(f"studies/checkpoints/*/trial-{number}/last.pt", store, proc)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 2
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in out + err
    assert out.count("exited with status -9") == 2 and out.count("is gone; marked failed") == 2, out
    study = _study(store)
    assert sorted(t.number for t in study.trials if t.state == optuna.trial.TrialState.FAIL) == [0, 1]
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]) == 2
    _nothing_running(store, mlflow_client)


def test_the_study_summary_counts_the_trials_still_running_or_queued(store, capsys):
    from carrot.cli import main
    from carrot.study import open_storage

    args = ["--variant", "baseline", "--epochs", "1", "--image-size", "16", "--no-progress",
            "--set", "eval.probe=final", "--set", "data.batch_size=32"]
    assert main(["study", *args, "--trials", "1"]) == 0
    study = optuna.load_study(study_name="digits-test_resnet-baseline", storage=open_storage(None))
    study.enqueue_trial(study.trials[0].params)  # e.g. a retry queued by another worker's stop
    study.enqueue_trial(study.trials[0].params)
    capsys.readouterr()
    assert main(["study", *args, "--trials", "1"]) == 0  # runs one of the two queued trials
    out = capsys.readouterr().out
    assert "study digits-test_resnet-baseline: 3 trials in total (2 complete, 0 pruned, 0 failed, 1 running or " \
           "queued)" in out, out


def test_a_worker_until_a_count_the_study_already_holds_says_so(store, capsys):
    from carrot.cli import main

    args = ["--variant", "baseline", "--epochs", "1", "--image-size", "16", "--no-progress",
            "--set", "eval.probe=final", "--set", "data.batch_size=32"]
    assert main(["study", *args, "--trials", "1"]) == 0
    capsys.readouterr()
    assert main(["worker", "--study-name", "digits-test_resnet-baseline", "--until", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "study digits-test_resnet-baseline already holds 1 finished trials (--until 1): nothing to run" in out


def test_a_retry_carries_the_configuration_not_the_dead_attempt(monkeypatch):
    """A queued retry inherits the trial's user attrs but not its worker, heartbeat, error or run:
    with them it looked dead from the moment it started until it stamped its own worker, and a
    worker finishing then would fail it and close the study's parent run under it."""
    from carrot import liveness

    monkeypatch.setattr(liveness, "close_run", lambda run_id, reason: None)  # no MLflow store in this test
    study = optuna.create_study(direction="maximize")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr(liveness.WORKER_ATTR, {"host": __import__("socket").gethostname(), "pid": dead.pid,
                                               "start": "1"})
    trial.set_user_attr(liveness.HEARTBEAT_ATTR, time.time() - 3600)
    trial.set_user_attr(liveness.ERROR_ATTR, "worker process gone")
    trial.set_user_attr("mlflow_run_id", "abc")
    trial.set_user_attr("var/gamma_mean", 1.5)  # the trial's own record stays
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    liveness.RetryDeadTrial(max_retry=2)(study, study.trials[0])
    waiting = study.trials[1]
    assert waiting.state == optuna.trial.TrialState.WAITING and waiting.params == study.trials[0].params
    assert waiting.user_attrs == {"var/gamma_mean": 1.5}
    retry = study.ask()  # started, before its worker stamps itself: alive
    assert retry.number == 1 and liveness.is_dead(study._storage.get_trial(retry._trial_id)) is None


def test_interruptions_do_not_use_up_the_retries_of_a_configuration(monkeypatch):
    """A trial pre-empted three times and then killed outright is still retried: max_retry counts
    the configuration's failures, not the signals that stopped it (both share retry_history)."""
    from carrot import liveness

    monkeypatch.setattr(liveness, "close_run", lambda run_id, reason: None)  # no MLflow store in this test
    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    requeue, retry = liveness.RetryDeadTrial(max_retry=None), liveness.RetryDeadTrial(max_retry=2)
    errors = ["interrupted by SIGTERM"] * 3 + ["worker process 1 on h is gone"] * 3
    for number, error in enumerate(errors):
        trial = study.ask(dist) if number == 0 else study.ask()
        assert trial.number == number  # each attempt is the retry queued by the one before
        trial.set_user_attr(liveness.ERROR_ATTR, error)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        (requeue if error.startswith("interrupted") else retry)(study, study.trials[number])
        waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
        assert len(waiting) == (1 if number < 5 else 0), number  # the third failure is one too many
    assert [liveness.failures_counted(study, t) for t in study.trials] == [0, 0, 0, 1, 2, 3]


def test_a_stop_after_the_last_step_of_a_trial_starts_no_other_and_exits_as_stopped(store, monkeypatch, capsys):
    """A signal that came after the trial's last look at the stop flag (while its run was closed)
    let the trial finish, and the command then went on or exited 0, as if no stop was asked."""
    from carrot import interrupt, tracking
    from carrot.cli import main
    from carrot.study import open_storage

    real = tracking.RunLogger.finish

    def finish_then_signal(self, status="FINISHED"):
        real(self, status)
        if not interrupt._received:
            interrupt._received.append(signal.SIGINT)  # as the handler does on the first signal

    monkeypatch.setattr(interrupt, "_received", [])
    monkeypatch.setattr(tracking.RunLogger, "finish", finish_then_signal)
    args = ["--variant", "baseline", "--epochs", "1", "--image-size", "16", "--no-progress",
            "--set", "eval.probe=final", "--set", "data.batch_size=32"]
    assert main(["study", *args, "--trials", "3"]) == 130
    study = optuna.load_study(study_name="digits-test_resnet-baseline", storage=open_storage(None))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]


def test_a_retry_of_a_retry_resumes_from_the_newest_checkpoint_of_its_line(store, monkeypatch, mlflow_client):
    """Trial 1 resumed trial 0's checkpoint and was stopped before an epoch of its own ended;
    trial 2 (retrying both) started over from epoch 0 while trial 0's checkpoint was on disk."""
    from carrot import interrupt
    from carrot import train as train_module
    from carrot.cli import main

    real = train_module.train_one_epoch

    def stop_at_epoch_1(parts, epoch):
        if epoch == 1:
            interrupt._received.append(signal.SIGTERM)  # as the handler does on the first signal
        return real(parts, epoch)

    monkeypatch.setattr(interrupt, "_received", [])
    monkeypatch.setattr(train_module, "train_one_epoch", stop_at_epoch_1)
    args = ["--variant", "baseline", "--epochs", "3", "--image-size", "16", "--no-progress",
            "--set", "eval.probe=final", "--set", "data.batch_size=32"]
    assert main(["study", *args, "--trials", "1"]) == 143  # trial 0 stops after its first epoch
    interrupt._received.clear()
    assert main(["study", *args, "--trials", "1"]) == 143  # trial 1 resumes it, stops before an epoch ends
    interrupt._received.clear()
    monkeypatch.setattr(train_module, "train_one_epoch", real)
    assert main(["study", *args, "--trials", "1"]) == 0
    study = _study(store)
    retry = study.trials[2]
    assert retry.system_attrs["retry_history"] == [0, 1] and retry.state == optuna.trial.TrialState.COMPLETE
    run = mlflow_client.get_run(retry.user_attrs["mlflow_run_id"])
    assert run.data.tags["carrot.resumed_from"].endswith("trial-0/last.pt")
    assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "val/acc")] == [1, 2, 3]


def test_a_running_trial_that_no_worker_recorded_itself_on_is_dead_after_a_minute():
    """A worker killed between Optuna starting its trial and recording itself on it left the
    trial (and the study's parent run) RUNNING for the whole 5-minute heartbeat grace."""
    from carrot import liveness

    study = optuna.create_study(direction="maximize")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    frozen = study._storage.get_trial(trial._trial_id)
    start = frozen.datetime_start.timestamp()
    assert liveness.is_dead(frozen, now=start + 10) is None  # its worker may still be about to record itself
    reason = liveness.is_dead(frozen, now=start + liveness.UNCLAIMED_S + 1)
    assert reason is not None and "no worker recorded itself on it" in reason
    trial.set_user_attr(liveness.WORKER_ATTR, {"host": "elsewhere", "pid": 1})  # recorded: the heartbeat decides
    assert liveness.is_dead(study._storage.get_trial(trial._trial_id), now=start + liveness.UNCLAIMED_S + 1) is None


def test_a_dead_trial_that_never_recorded_its_run_has_the_run_closed_too(store, mlflow_client):
    """A worker killed after starting the trial's MLflow run and before recording the run's id
    on the trial left the run RUNNING for ever: the reaper knew the run only by that id."""
    from carrot import contract, liveness
    from carrot.tracking import client, experiment_id

    study = optuna.create_study(direction="maximize")
    study.set_user_attr(contract.STUDY_ID_ATTR, "s-123")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    mlf = client()
    tags = {contract.TAG_STUDY_ID: "s-123", contract.TAG_TRIAL: str(trial.number),
            contract.TAG_ROLE: contract.ROLE_TRIAL}
    orphan = mlf.create_run(experiment_id(mlf, "carrot"), tags=tags).info.run_id
    other = mlf.create_run(experiment_id(mlf, "carrot"), tags={**tags, contract.TAG_TRIAL: "7"}).info.run_id
    trial.set_user_attr(liveness.ERROR_ATTR, "worker process 1 on h is gone")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    liveness.RetryDeadTrial(max_retry=2)(study, study.trials[0])
    run = mlflow_client.get_run(orphan)
    assert run.info.status == "KILLED" and run.data.tags[contract.TAG_ERROR] == "worker process 1 on h is gone"
    assert mlflow_client.get_run(other).info.status == "RUNNING"  # another trial's run is left alone


def test_a_journal_that_becomes_read_only_mid_study_is_one_line(store, monkeypatch, capsys):
    """A storage remounted read-only under a running study gave Optuna's 40-line traceback
    (AssertionError "Should not reach." raised while handling the OSError)."""
    import errno

    from carrot import train as train_module
    from carrot.cli import main

    real_epoch, real_symlink = train_module.train_one_epoch, os.symlink

    def read_only(src, dst, *args, **kwargs):
        if str(dst).endswith("optuna.journal.lock"):  # Optuna's lock of every journal append
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real_symlink(src, dst, *args, **kwargs)

    def then_read_only(parts, epoch):
        result = real_epoch(parts, epoch)
        monkeypatch.setattr(os, "symlink", read_only)
        return result

    monkeypatch.setattr(train_module, "train_one_epoch", then_read_only)
    args = ["--variant", "baseline", "--epochs", "1", "--image-size", "16", "--no-progress",
            "--set", "eval.probe=final", "--set", "data.batch_size=32"]
    capsys.readouterr()
    assert main(["study", *args, "--trials", "1"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"carrot: error: cannot write {store / 'studies' / 'optuna.journal.lock'}: Read-only file "
                   "system; expected a store this user can write (a trial left RUNNING is failed and queued "
                   "again by the next command once it can)"], err


def test_a_killed_train_run_is_closed_by_the_next_command(store, mlflow_client, capsys):
    """SIGKILL of `carrot train` (or `carrot final`) left its run RUNNING for ever: no trial
    tracks it. Each run records its process; the next command of its kind closes it KILLED."""
    from carrot.cli import main

    proc = _carrot(store, "train", *ARGS, "--epochs", "50", wait=False)
    deadline = time.time() + 300
    while mlflow_client.get_experiment_by_name("carrot") is None or not [
            r for r in _runs(mlflow_client) if r.data.metrics.get("val/acc") is not None]:  # an epoch in
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.5)
    (killed,) = _runs(mlflow_client)
    assert killed.info.status == "RUNNING"
    proc.kill()
    proc.communicate(timeout=60)

    assert main(["train", *ARGS, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    reason = f"its process {proc.pid} on {os.uname().nodename} is gone"
    assert f"closed train run {killed.info.run_id} ({killed.info.run_name}) as KILLED: {reason}" in out
    run = mlflow_client.get_run(killed.info.run_id)
    assert run.info.status == "KILLED" and run.data.tags["carrot.error"] == reason
    assert sorted(r.info.status for r in _runs(mlflow_client)) == ["FINISHED", "KILLED"]


@pytest.mark.parametrize("proc_fs", [True, False])
def test_a_gone_process_is_told_from_a_live_one_with_or_without_proc(monkeypatch, proc_fs):
    """Without /proc (macOS) there is no start time to read: every live process looked gone,
    so a concurrent command's runs would have been closed."""
    import socket

    from carrot import liveness

    if not proc_fs:
        isdir = os.path.isdir
        monkeypatch.setattr(liveness.os.path, "isdir", lambda p: False if p == "/proc" else isdir(p))
        monkeypatch.setattr(liveness, "process_start_time", lambda pid: None)  # what reading /proc gives there
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = liveness.process_start_time(live.pid) if proc_fs else None
        assert liveness.gone({"host": host, "pid": live.pid, "start": start}) is None
        assert liveness.gone({"host": host, "pid": dead, "start": None}) == f"process {dead} on {host} is gone"
        assert liveness.gone({"host": "elsewhere", "pid": dead}) is None  # another host's: may be alive
    finally:
        live.kill()
        live.wait()
