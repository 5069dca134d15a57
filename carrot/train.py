"""One training run: ``run(config, trial=None)`` is used by ``carrot train`` and by every trial.

Data flows one way: dataset -> model (backbone, the variant's neck, head, feature taps)
-> variant (loss terms and statistics) -> optimiser; after every epoch the evaluation split
goes through :mod:`carrot.evaluate` and every number is logged to MLflow.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from carrot.config import RunConfig
from carrot.data import build_dataset
from carrot.evaluate import Evaluator
from carrot.loaders import make_loader, training_split
from carrot.model import CarrotModel, create_backbone, image_spec
from carrot.progress import Progress
from carrot.variants import StepBatch, create_variant


class TrialPruned(Exception):
    """Raised when the study's pruner stops a trial (re-raised as optuna.TrialPruned)."""


@dataclass
class RunResult:
    run_id: str | None
    metrics: dict[str, float]  # the last epoch's metrics
    history: list[dict[str, float]] = field(default_factory=list)
    objective: float = float("nan")  # last-epoch accuracy on the evaluation split
    epochs_done: int = 0
    seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from carrot.config import ConfigError

        raise ConfigError("invalid device='cuda': no CUDA device is available here; use cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation parameters (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.optim.weight_decay)
    if cfg.optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from ~0 to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def run_tags(cfg: RunConfig, seed: int, study: str | None, trial: int | None) -> dict[str, str]:
    from carrot.tracking import git_commit

    return {
        "carrot.variant": cfg.variant.name,
        "carrot.study": study or "",
        "carrot.trial": "" if trial is None else str(trial),
        "carrot.dataset": cfg.data.dataset_id,
        "carrot.config_hash": cfg.identity_hash(),
        "carrot.backbone": cfg.model.backbone,
        "carrot.seed": str(seed),
        "carrot.split": cfg.split,
        "carrot.git_commit": git_commit(),
    }


def run(cfg: RunConfig, trial=None, *, study: str | None = None, parent_run_id: str | None = None,
        run_name: str | None = None, log: Callable[[str], None] = print, track: bool = True,
        extra_tags: dict[str, str] | None = None) -> RunResult:
    """Train one configuration and evaluate it after every epoch.

    ``trial`` (an Optuna trial) receives the per-epoch accuracy for pruning; a pruned run
    raises :class:`optuna.TrialPruned` after its MLflow run is closed as KILLED.
    """
    started = time.time()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    hparams = cfg.resolved_hparams()
    variant = create_variant(cfg.variant.name, **hparams)

    backbone = create_backbone(cfg.model.backbone, cfg.model.pretrained, cfg.model.pretrained_path,
                               cfg.model.drop_rate, cfg.model.kwargs)
    splits = build_dataset(cfg.data, image_spec(backbone))
    train_set, train_labels, eval_set, _, eval_split = training_split(splits, cfg.split)
    model = CarrotModel(backbone, variant.build_neck(backbone.num_features), splits.num_classes,
                        cfg.model.probe_layers).to(device)
    variant.to(device)
    pin = device.type == "cuda"
    if cfg.data.cache and cfg.data.workers > 0:  # fill once here, not once per worker process
        for ds in (splits.train, splits.val, splits.test, splits.train_eval, splits.val_train):
            if hasattr(ds, "fill_cache"):
                ds.fill_cache()
    train_loader = make_loader(train_set, cfg, train=True, labels=train_labels, sampler_name=variant.hp.sampler,
                               m_per_class=variant.hp.m_per_class, pin=pin)
    eval_loader = make_loader(eval_set, cfg, train=False, pin=pin)
    probe_set = splits.train_eval if cfg.split == "val" else torch.utils.data.ConcatDataset(
        [splits.train_eval, splits.val])
    probe_loader = make_loader(probe_set, cfg, train=False, pin=pin)

    params = list(model.parameters()) + [p for p in variant.parameters() if p.requires_grad]
    optimizer = make_optimizer(nn.ModuleList([model, variant]), cfg)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        from carrot.config import ConfigError

        raise ConfigError(f"invalid data.batch_size={cfg.data.batch_size}: larger than the training split "
                          f"({len(train_set)} samples)")
    total_steps = cfg.optim.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps))
    use_amp = cfg.amp and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext

    trial_number = None if trial is None else trial.number
    logger = None
    if track:
        from carrot.tracking import RunLogger, flatten

        tags = {**run_tags(cfg, cfg.seed, study, trial_number), "carrot.num_classes": str(splits.num_classes),
                **(extra_tags or {})}
        name = run_name or f"{cfg.variant.name}-s{cfg.seed}" + ("" if trial is None else f"-t{trial_number}")
        logger = RunLogger.start(cfg.experiment, name, tags, parent_run_id)
    history: list[dict[str, float]] = []
    progress = None
    evaluator = None
    status = "FAILED"
    try:
        if logger:
            resolved = cfg.to_dict()
            resolved["variant"]["hparams"] = hparams
            resolved["data"]["effective_batch_size"] = train_loader.batch_size
            logger.log_params(flatten("", resolved))
            logger.log_dict(resolved, "config.json")
            logger.log_dict({"num_classes": splits.num_classes, "class_names": splits.class_names,
                             "sizes": {k: int(len(v)) for k, v in splits.labels.items()}, **splits.info},
                            "dataset.json")
        evaluator = Evaluator(cfg, splits, eval_split, model, device, logger, log)
        # set-up (lazy imports, store look-ups) may have drawn from the global generators
        seed_everything(cfg.seed)
        progress = Progress(total=cfg.optim.epochs, desc=name_for_progress(cfg, trial_number),
                            enabled=cfg.show_progress, log=log)
        for epoch in range(cfg.optim.epochs):
            model.train()
            variant.train()
            sums: dict[str, torch.Tensor] = {}  # key -> (sum, count) on the device
            epoch_start = time.time()
            for step, (x, y) in enumerate(train_loader):
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                with autocast():
                    out = model(x, with_features=variant.uses_features)
                    batch = StepBatch(embedding=out.embedding, logits=out.logits, labels=y, head=model.head,
                                      features=out.features, progress=epoch + step / steps_per_epoch,
                                      label_smoothing=cfg.optim.label_smoothing)
                    result = variant(batch)
                    loss = result.loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                optimizer.step()
                scheduler.step()
                for key, value in [("train/loss", loss)] + [(f"train/{k}", v) for k, v in result.terms.items()] \
                        + [(f"var/{k}", v) for k, v in result.stats.items()]:
                    value = value.detach().float()
                    # a statistic a step could not define (NaN) counts as missing, not as a value
                    ok = torch.isfinite(value) if key.startswith("var/") else torch.ones((), dtype=torch.bool, device=value.device)
                    pair = torch.stack([torch.where(ok, value, 0.0), ok.float()])
                    sums[key] = sums[key] + pair if key in sums else pair
            # one host sync per epoch for all training statistics
            train_metrics = {k: float(v[0] / v[1]) if float(v[1]) > 0 else float("nan") for k, v in
                             ((k, v.cpu()) for k, v in sums.items())}
            train_metrics["train/lr"] = scheduler.get_last_lr()[0]
            train_metrics["time/train_epoch_s"] = time.time() - epoch_start
            if not all(math.isfinite(v) for k, v in train_metrics.items() if k.startswith("train/")):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch + 1}: "
                                         f"{ {k: v for k, v in train_metrics.items() if k.startswith('train/')} }")

            last = epoch == cfg.optim.epochs - 1
            probe = last or (cfg.eval.probe_every > 0 and (epoch + 1) % cfg.eval.probe_every == 0)
            eval_metrics = evaluator.evaluate(epoch, eval_loader, probe_loader if probe else None, use_amp)
            metrics = {**train_metrics, **eval_metrics}
            history.append(metrics)
            if logger:
                logger.log_metrics(metrics, step=epoch + 1)
            acc = metrics[f"{eval_split}/acc"]
            progress.update(epoch + 1, loss=train_metrics["train/loss"], acc=acc)
            if trial is not None:
                trial.report(acc, epoch + 1)
                if not last and trial.should_prune():  # a fully trained trial is kept
                    status = "KILLED"
                    raise TrialPruned(f"pruned after epoch {epoch + 1} ({eval_split}/acc={acc:.4f})")
        status = "FINISHED"
    finally:
        if progress:
            progress.close()
        if logger:
            try:
                if evaluator:
                    evaluator.save_artifacts()
                logger.set_tags({"carrot.status": status.lower() if status != "KILLED" else "pruned",
                                 "carrot.epochs_done": len(history)})
            finally:
                logger.finish(status)
    final = history[-1]
    return RunResult(run_id=logger.run_id if logger else None, metrics=final, history=history,
                     objective=final[f"{eval_split}/acc"], epochs_done=len(history),
                     seconds=time.time() - started)


def name_for_progress(cfg: RunConfig, trial_number: int | None) -> str:
    base = f"{cfg.variant.name} seed {cfg.seed}"
    return base if trial_number is None else f"{base} trial {trial_number}"
