"""Checkpoints: a run stopped after an epoch and resumed from its checkpoint ends with the
same metrics, bit for bit on a CPU, as the run that was never stopped."""
from __future__ import annotations

import math
import signal

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
