"""Checkpoints: a run stopped after an epoch and resumed from its checkpoint ends with the
same metrics, bit for bit on a CPU, as the run that was never stopped."""
from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch

from carrot import checkpoint, interrupt
from conftest import tiny_config


def _no_time(history):
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in history]


@pytest.mark.parametrize("variant, sampler", [("baseline", "random"), ("prototype", "pk")])
def test_resumed_run_equals_the_uninterrupted_run(tmp_path, monkeypatch, variant, sampler):
    import carrot.train as train

    cfg = tiny_config(**{"variant.name": variant, "data.sampler": sampler, "optim.epochs": 3,
                         "eval.probe": "always"})
    whole = train.run(cfg, track=False, log=lambda s: None)

    real = train.train_one_epoch

    def stop_in_second_epoch(parts, epoch):
        if epoch == 1:
            interrupt._received.append(signal.SIGTERM)  # as the handler does on the first signal
        return real(parts, epoch)

    folder = tmp_path / "ckpt"
    monkeypatch.setattr(train, "train_one_epoch", stop_in_second_epoch)
    try:
        with pytest.raises(interrupt.Interrupted, match="SIGTERM"):
            train.run(cfg, track=False, log=lambda s: None, checkpoint_dir=folder)
    finally:
        interrupt._received.clear()
    monkeypatch.setattr(train, "train_one_epoch", real)
    state = checkpoint.load(folder / checkpoint.CHECKPOINT_FILE)
    assert state["epochs_done"] == 1  # the interrupted epoch left no checkpoint

    resumed = train.run(cfg, track=False, log=lambda s: None, resume_from=folder / checkpoint.CHECKPOINT_FILE)
    assert resumed.epochs_done == 3
    got, want = _no_time(resumed.history), _no_time(whole.history)
    assert [sorted(m) for m in got] == [sorted(m) for m in want]
    for g, w in zip(got, want):
        for key in w:
            assert g[key] == w[key] or (math.isnan(g[key]) and math.isnan(w[key])), key


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    from carrot.config import ConfigError
    from carrot.train import run

    folder = tmp_path / "ckpt"
    run(tiny_config(**{"optim.epochs": 1}), track=False, log=lambda s: None, checkpoint_dir=folder,
        keep_checkpoint=True)
    assert (folder / checkpoint.CHECKPOINT_FILE).exists()
    with pytest.raises(ConfigError, match="another configuration"):
        run(tiny_config(**{"optim.epochs": 2}), track=False, log=lambda s: None,
            resume_from=folder / checkpoint.CHECKPOINT_FILE)


def test_finished_runs_remove_their_checkpoints_and_writes_are_atomic(tmp_path, monkeypatch):
    from carrot.train import run

    folder = tmp_path / "ckpt"
    run(tiny_config(**{"optim.epochs": 1}), track=False, log=lambda s: None, checkpoint_dir=folder)
    assert not folder.exists()

    target = tmp_path / "atomic" / checkpoint.CHECKPOINT_FILE
    checkpoint.save(target, {"a": torch.ones(2)})

    def broken(obj, fh):
        fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        checkpoint.save(target, {"a": torch.zeros(2)})
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(target)["a"], torch.ones(2))  # the old file is intact
    assert [p.name for p in target.parent.iterdir()] == [checkpoint.CHECKPOINT_FILE]  # no temp left


def test_an_unreadable_checkpoint_is_said_and_the_run_starts_from_epoch_0(tmp_path):
    """A checkpoint cut short or damaged (a copy between machines interrupted, a failing disk):
    the retry trains from the start instead of failing."""
    from carrot.train import run

    cfg = tiny_config(**{"optim.epochs": 2})
    folder = tmp_path / "ckpt"
    run(cfg, track=False, log=lambda s: None, checkpoint_dir=folder, keep_checkpoint=True)
    path = folder / checkpoint.CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    lines = []
    resumed = run(cfg, track=False, log=lines.append, resume_from=path)
    assert resumed.epochs_done == 2
    said = [line for line in lines if "unreadable" in line]
    assert len(said) == 1 and str(path) in said[0] and "starting from epoch 0" in said[0]
    assert not any(line.startswith("resumed ") for line in lines)
    whole = run(cfg, track=False, log=lambda s: None)  # the same run from the start, to the bit on a CPU
    assert _no_time(resumed.history) == _no_time(whole.history)


def test_a_failed_checkpoint_write_names_the_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    def full_disk(obj, f, *args, **kwargs):
        f.write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2390720 vs 2390612")

    path = tmp_path / "run" / checkpoint.CHECKPOINT_FILE
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.save(path, {"a": 1})
    assert str(info.value).startswith(f"cannot write checkpoint {path} (")
    assert "MiB free on its disk): [enforce fail" in str(info.value)
    assert list(path.parent.iterdir()) == []  # neither the file nor its temporary


def test_a_checkpoint_file_gets_the_permissions_of_a_new_file(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        checkpoint.save(tmp_path / "last.pt", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o640  # readable by the group's other workers


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the umask from /proc")
def test_saving_a_checkpoint_never_changes_the_umask(tmp_path, monkeypatch):
    """The umask is one per process: setting it to read it would, for that moment, give the files
    another thread creates (the MLflow committer's, a DataLoader's) the wrong permissions."""
    import os

    def refuse(mask):
        raise AssertionError(f"os.umask({mask:#o}) called while saving a checkpoint")

    old = os.umask(0o022)
    try:
        monkeypatch.setattr(os, "umask", refuse)
        checkpoint.save(tmp_path / "last.pt", {"a": 1})
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o644
