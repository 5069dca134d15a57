"""Multi-process trials (``--nproc``): the per-rank loaders, rank 0's decisions reaching every
rank, and whole DDP runs and studies through torchrun on CPU (gloo)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


# ----------------------------------------------------------------------------- loaders
def _pk_labels() -> np.ndarray:
    return np.repeat(np.arange(12), 10)  # 12 classes x 10 samples


def test_rank_slices_are_whole_classes_and_tile_the_global_batch():
    from carrot.loaders import RankSlice, pk_sampler

    labels, m, batch, world = _pk_labels(), 4, 32, 2
    whole = list(iter(pk_sampler(labels, m, batch, seed=5)))
    slices = [list(iter(RankSlice(pk_sampler(labels, m, batch, seed=5), batch, r, world))) for r in range(world)]
    share = batch // world
    assert all(len(s) == len(whole) // batch * share for s in slices)
    for b in range(len(whole) // batch):
        got = [s[b * share:(b + 1) * share] for s in slices]
        assert sum(got, []) == whole[b * batch:(b + 1) * batch]  # rank 0's rows, then rank 1's
        classes = [set(labels[g]) for g in got]
        assert not classes[0] & classes[1]  # no class split across ranks
        for g in got:
            assert np.all(np.unique(labels[g], return_counts=True)[1] == m)  # m samples of each class


def test_rank_slice_carries_the_pk_sampler_state():
    from carrot import checkpoint
    from carrot.loaders import RankSlice, pk_sampler

    sl = RankSlice(pk_sampler(_pk_labels(), 4, 32, seed=1), 32, 1, 2)
    loader = torch.utils.data.DataLoader(list(range(120)), batch_size=16, sampler=sl)
    first = list(iter(sl))
    state = checkpoint.sampler_state(loader)
    assert state["pk_epoch"] == 1
    second = list(iter(sl))
    assert second != first  # the next epoch draws new batches
    checkpoint.set_sampler_state(loader, state)
    assert list(iter(sl)) == second  # and a resumed run draws the same ones


def test_rank_batch_size_needs_equal_shares_of_whole_classes():
    from carrot.config import ConfigError
    from carrot.loaders import rank_batch_size

    assert rank_batch_size(64, 2) == 32
    assert rank_batch_size(64, 4, 4) == 16
    with pytest.raises(ConfigError, match=r"multiple of 12 \(3 processes x data.m_per_class=4\)"):
        rank_batch_size(64, 3, 4)


def test_gpu_groups_of_ddp_workers():
    from carrot.config import ConfigError
    from carrot.workers import gpu_assignment

    assert gpu_assignment(2, 4, nproc=2) == ["0,1", "2,3"]
    assert gpu_assignment(3, 4, nproc=2) == ["0,1", "2,3", "0,1"]
    assert gpu_assignment(2, 2) == ["0", "1"]
    assert gpu_assignment(2, 0, nproc=2) == [None, None]
    with pytest.raises(ConfigError, match="at most 2"):
        gpu_assignment(1, 2, nproc=4)


def test_workers_share_the_cores(monkeypatch):
    """Concurrent worker processes (JOBS, and DDP ranks) get an equal share of the cores unless
    the user set OMP_NUM_THREADS; a lone worker keeps torch's default."""
    import os

    from carrot.workers import worker_env

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert worker_env({}, None, jobs=2) == {"OMP_NUM_THREADS": "4"}
    assert worker_env({}, "1", jobs=2, nproc=2) == {"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "1"}
    assert worker_env({}, None, jobs=1) == {}
    assert worker_env({"OMP_NUM_THREADS": "3"}, None, jobs=4) == {"OMP_NUM_THREADS": "3"}
    assert worker_env({}, None, jobs=16) == {"OMP_NUM_THREADS": "1"}


def test_relaunch_drops_only_the_nproc_flag():
    from carrot.cli import _is_nproc

    for argv, kept in ((["train", "--nproc", "2", "--epochs", "2"], ["train", "--epochs", "2"]),
                       (["train", "--nproc=2", "--seed", "2"], ["train", "--seed", "2"])):
        assert [a for i, a in enumerate(argv) if not _is_nproc(argv, i)] == kept


# ----------------------------------------------------------------------------- rank 0 decides
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _decide(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from carrot import ddp
    from carrot.train import TrialPruned

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    seen = []
    try:
        seen.append(ddp.on_main(lambda: 7, TrialPruned))
        for error in (TrialPruned("pruned after epoch 2"), ValueError("broken")):
            def fail(error=error):
                raise error
            try:
                ddp.on_main(fail, TrialPruned)
                seen.append("went on")
            except BaseException as exc:  # what each rank leaves the trial with
                seen.append(f"{type(exc).__name__}: {exc}")
        seen.append(ddp.broadcast({"trial": 3} if rank == 0 else "ignored"))
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(repr(seen))


def test_rank_zero_decisions_reach_every_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_decide, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = eval((tmp_path / "rank0.txt").read_text())
    rank1 = eval((tmp_path / "rank1.txt").read_text())
    assert rank0 == [7, "TrialPruned: pruned after epoch 2", "ValueError: broken", {"trial": 3}]
    assert rank1 == [None, "TrialPruned: pruned after epoch 2", "RemoteFailure: rank 0 failed: broken",
                     {"trial": 3}]


# ----------------------------------------------------------------------------- whole runs through torchrun
def _carrot(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}",
           "CARROT_SYSTEM_METRICS": "0"}
    return subprocess.run([sys.executable, "-m", "carrot.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def _runs(cwd: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("carrot")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.slow
@pytest.mark.heavy
def test_a_ddp_run_equals_one_process_on_the_global_batch(tmp_path):
    """Two gloo ranks, each loading half of every P x K batch (whole classes), DDP-averaged
    gradients and expansion's gathered class statistics: the epoch's training loss, its term
    and the validation accuracy equal one process's on the same global batches. test_vit has
    no batch norm (whose per-rank statistics would differ) and augment=none draws nothing."""
    argv = ["train", "--variant", "expansion", "--epochs", "1", "--image-size", "32", "--batch-size", "32",
            "--device", "cpu", "--backbone", "test_vit", "--set", "data.sampler=pk", "--set", "data.augment=none",
            "--set", "eval.probe_max_train=200", "--no-progress"]
    for nproc in ("1", "2"):
        done = _carrot(tmp_path, *argv, "--nproc", nproc)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
    runs = _runs(tmp_path)
    assert len(runs) == 2  # rank 1 logged nothing
    one, two = runs
    assert (one.data.tags["carrot.world_size"], two.data.tags["carrot.world_size"]) == ("1", "2")
    assert one.data.params["data.effective_batch_size"] == two.data.params["data.effective_batch_size"] == "32"
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    for key in ("train/loss", "train/ce", "train/kl"):
        assert two.data.metrics[key] == pytest.approx(one.data.metrics[key], rel=1e-5, abs=1e-7), key
    assert two.data.metrics["train/kl"] > 1e-5  # the gathered term is part of what was compared
    assert two.data.metrics["val/acc"] == one.data.metrics["val/acc"]


@pytest.mark.slow
@pytest.mark.heavy
def test_a_study_of_ddp_trials(tmp_path):
    import optuna

    done = _carrot(tmp_path, "study", "--variant", "barrier", "--trials", "3", "--epochs", "2", "--image-size", "16",
                   "--batch-size", "32", "--device", "cpu", "--nproc", "2", "--no-progress",
                   "--set", "eval.probe_max_train=200")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 worker(s) of 2 DDP processes" in done.stdout
    logs = "".join(p.read_text() for p in (tmp_path / "studies" / "logs").rglob("*.log"))
    assert "Traceback" not in done.stderr + logs
    study = optuna.load_study(study_name="digits-test_resnet-barrier",
                              storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
                                  str(tmp_path / "studies" / "optuna.journal"))))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    runs = _runs(tmp_path)
    trials = [r for r in runs if r.data.tags.get("carrot.role") == "trial"]
    assert len(trials) == 3 and {r.data.tags["carrot.world_size"] for r in trials} == {"2"}
    assert {r.info.run_id for r in trials} == {t.user_attrs["mlflow_run_id"] for t in study.trials}
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []


@pytest.mark.slow
@pytest.mark.heavy
def test_a_ddp_run_reports_a_bad_store_in_one_line(tmp_path):
    env_uri = "http://127.0.0.1:1"  # nothing listens there
    done = subprocess.run([sys.executable, "-m", "carrot.cli", "train", "--epochs", "1", "--device", "cpu",
                           "--nproc", "2", "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": env_uri}, timeout=300)
    assert done.returncode == 2
    lines = [ln for ln in done.stderr.splitlines() if "INFO" not in ln]
    assert lines == [f"carrot: error: MLflow tracking server {env_uri} is unreachable (ConnectionError); "
                     "expected a running `mlflow server` at the tracking URI (MLFLOW_TRACKING_URI)"]


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("to_group", [False, True], ids=["SIGTERM to the command", "SIGINT to its group"])
def test_a_ddp_run_stops_on_a_signal_like_one_process(tmp_path, to_group):
    """A scheduler's SIGTERM to the command alone reaches the ranks (it was announced and then
    ignored: the run trained to its end), and a Ctrl-C to the whole group gives the same two
    lines as one process, not one per rank and torchrun's traceback. The run ends KILLED."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "carrot.cli", "train", "--epochs", "500", "--device", "cpu",
                             "--nproc", "2", "--no-progress", "--image-size", "16"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    deadline = time.time() + 240
    while time.time() < deadline and not _a_run_is_training(tmp_path / "mlflow.db"):
        time.sleep(0.5)
    if to_group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    name = "SIGINT" if to_group else "SIGTERM"
    assert proc.returncode == 128 + getattr(signal, name), err[-3000:]
    lines = [ln for ln in err.splitlines() if not ln.startswith("note:")]
    assert lines == [f"carrot: {name} received: stopping at the next step (send it again, 3 s or more later, "
                     "to exit at once)",
                     f"carrot: interrupted by {name}: the current run ended KILLED"], err[-3000:]
    runs = _runs_at(tmp_path)
    assert [(r.info.status, r.data.tags["carrot.error"]) for r in runs] == [("KILLED", f"interrupted by {name}")]
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(
        runs[0].info.run_id, "val/acc")
    assert 1 <= len(history) < 500  # stopped after its first epochs


def _a_run_is_training(db: Path) -> bool:
    """Whether a run has logged a first epoch (read with sqlite3: no MLflow client that could
    race the command in creating the store's schema)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return bool(con.execute("SELECT 1 FROM metrics WHERE key = 'val/acc' LIMIT 1").fetchall())
    except sqlite3.Error:
        return False


def _runs_at(folder: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("carrot")
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _resume_where_one_rank_cannot_read(rank: int, port: int, out: str, path: str) -> None:
    import datetime

    import torch.distributed as dist

    from carrot import checkpoint
    from carrot.train import run
    from conftest import tiny_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    if rank == 1:  # this rank's copy of the file is unreadable (a node's disk, a stale NFS handle)
        def unreadable(p):
            raise RuntimeError("rank 1 cannot read it")
        checkpoint.load = unreadable
    lines: list[str] = []
    try:
        result = run(tiny_config(**{"optim.epochs": 2}), track=False, log=lines.append, resume_from=Path(path))
        Path(out, f"rank{rank}.txt").write_text(repr((result.epochs_done, lines)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.heavy
def test_the_ranks_of_a_ddp_trial_resume_together_or_start_over_together(tmp_path):
    """Every rank reads the checkpoint; when one cannot, all start from epoch 0 (before, rank 0
    alone decided: it resumed while the rank that could not read failed, and the collectives of
    the two ranks no longer matched)."""
    import torch.multiprocessing as mp

    from carrot import checkpoint
    from carrot.train import run
    from conftest import tiny_config

    folder = tmp_path / "ckpt"
    run(tiny_config(**{"optim.epochs": 2}), track=False, log=lambda s: None, checkpoint_dir=folder,
        keep_checkpoint=True)
    path = folder / checkpoint.CHECKPOINT_FILE
    mp.spawn(_resume_where_one_rank_cannot_read, args=(_free_port(), str(tmp_path), str(path)), nprocs=2, join=True)
    done0, lines0 = eval((tmp_path / "rank0.txt").read_text())
    done1, lines1 = eval((tmp_path / "rank1.txt").read_text())
    assert done0 == done1 == 2
    assert [line for line in lines0 if "unreadable" in line] == [
        f"checkpoint {path} is unreadable (RuntimeError: rank 1 cannot read it); starting from epoch 0"]
    assert not any(line.startswith("resumed ") for line in lines0 + lines1)
