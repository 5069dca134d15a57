"""The training run itself: determinism on CPU, train+val for final runs, the P x K sampler."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_config
from carrot.config import ConfigError
from carrot.train import lr_factor, run


def test_same_seed_same_metrics_on_cpu():
    a = run(tiny_config(), track=False, log=lambda s: None)
    b = run(tiny_config(), track=False, log=lambda s: None)
    assert len(a.history) == len(b.history) == 2
    _equal_but_time(a.history, b.history)
    c = run(tiny_config(seed=1), track=False, log=lambda s: None)
    assert c.history[-1]["train/loss"] != a.history[-1]["train/loss"]


def _equal_but_time(h1, h2):
    for r1, r2 in zip(h1, h2):
        for k in r1:
            if not k.startswith("time/"):
                assert r1[k] == r2[k] or (np.isnan(r1[k]) and np.isnan(r2[k])), k


def test_lr_schedule_warmup_then_cosine():
    total, warm = 100, 10
    f = [lr_factor(s, warm, total) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5, abs=1e-9)
    assert all(x >= y for x, y in zip(f[10:], f[11:]))


def test_pk_sampler_batches_hold_m_per_class():
    from carrot.loaders import make_loader

    cfg = tiny_config(**{"data.batch_size": 32, "data.sampler": "pk", "data.m_per_class": 4})
    labels = np.repeat(np.arange(10), 20)
    import torch

    ds = torch.utils.data.TensorDataset(torch.zeros(len(labels), 1), torch.as_tensor(labels))
    loader = make_loader(ds, cfg, train=True, labels=labels)
    for _, y in loader:
        counts = np.bincount(y.numpy(), minlength=10)
        assert set(counts[counts > 0]) == {4} and len(y) == 32
    with pytest.raises(ConfigError, match="fewer than m_per_class"):
        make_loader(ds, tiny_config(**{"data.batch_size": 32, "data.sampler": "pk", "data.m_per_class": 8}),
                    train=True, labels=np.r_[labels[:-17], [9, 9, 9]][: len(labels)])


def test_final_split_trains_on_train_plus_val():
    from carrot.data import ImageSpec, build_dataset
    from carrot.loaders import training_split

    cfg = tiny_config()
    splits = build_dataset(cfg.data, ImageSpec())
    train, labels, evalset, eval_labels, name = training_split(splits, "test")
    assert name == "test" and len(train) == len(splits.train) + len(splits.val) == len(labels)
    assert len(evalset) == len(splits.test)
    assert np.array_equal(np.r_[splits.labels["train"], splits.labels["val"]], labels)
    n_total = sum(len(v) for v in splits.labels.values())
    assert n_total == 1797


def test_pk_batches_do_not_depend_on_global_random_state():
    import torch

    from carrot.loaders import make_loader

    cfg = tiny_config(**{"data.batch_size": 32, "data.sampler": "pk", "data.m_per_class": 4})
    labels = np.repeat(np.arange(10), 20)
    ds = torch.utils.data.TensorDataset(torch.arange(len(labels)), torch.as_tensor(labels))
    draws = []
    for global_seed in (1, 2):
        np.random.seed(global_seed)
        loader = make_loader(ds, cfg, train=True, labels=labels)
        draws.append([x.tolist() for _ in range(2) for x, _ in loader])
    assert draws[0] == draws[1]
    assert draws[0][: len(draws[0]) // 2] != draws[0][len(draws[0]) // 2:]  # epochs differ


def test_undefined_statistics_are_averaged_as_missing():
    cfg = tiny_config(**{"variant.name": "nuisance", "optim.epochs": 2})
    cfg.variant.hparams = {"warmup_epochs": 1.0}
    result = run(cfg, track=False, log=lambda s: None)
    first, second = result.history
    assert first["var/frac_augmented"] == 0.0 and first["var/alpha_mean"] == 0.0
    assert np.isnan(first["var/label_safety"])  # warm-up: no noise drawn, safety undefined
    assert second["var/frac_augmented"] > 0
    assert 0.0 <= second["var/label_safety"] <= 1.0


def test_gradient_accumulation_steps_once_per_k_micro_batches():
    import math

    import torch

    from carrot.train import build_run, train_one_epoch

    one = build_run(tiny_config(**{"optim.epochs": 1}))
    train_one_epoch(one, 0)
    two = build_run(tiny_config(**{"optim.epochs": 1, "optim.accumulate": 2, "optim.warmup_epochs": 0.0}))
    steps = len(two.train_loader)
    calls = []
    real_step = two.optimizer.step
    two.optimizer.step = lambda *a, **k: (calls.append(1), real_step(*a, **k))[1]
    train_one_epoch(two, 0)
    assert len(calls) == math.ceil(steps / 2) and one.scheduler.last_epoch == steps
    assert two.scheduler.last_epoch == math.ceil(steps / 2)
    # the schedule spans the optimiser steps, not the micro-batches: it ends at 0 after the epoch
    assert two.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    assert not any(torch.isnan(p).any() for p in two.model.parameters())
