"""One training run, in steps: build it, train an epoch, evaluate, log.

    build_run(cfg)                -> RunParts: model, variant, loaders, optimiser, scheduler
    forward_step(model, variant)  -> VariantOutput: one batch through model and variant
    train_one_epoch(parts, epoch) -> the epoch's training metrics (one host sync)
    Evaluator.evaluate(...)       -> the epoch's diagnostics (carrot.evaluate)
    Run                           -> the MLflow run and the Optuna trial of one training

``run(cfg, trial=None)`` strings them together; ``carrot train``, every study trial and every
final run go through it, and the benchmark times the same ``forward_step``.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from carrot import checkpoint, contract, ddp, interrupt
from carrot.checks import check_names
from carrot.config import ConfigError, RunConfig
from carrot.data import DatasetSplits, build_dataset
from carrot.evaluate import Evaluator
from carrot.loaders import make_loader, training_split
from carrot.model import CarrotModel, create_backbone, image_spec
from carrot.progress import Progress
from carrot.reference import ReferencePairs
from carrot.runtime import resolve_device, seed_everything
from carrot.variants import StepBatch, Variant, VariantOutput, create_variant


class TrialPruned(Exception):
    """Raised when the study's pruner stops a trial, or its loss diverged (re-raised as
    optuna.TrialPruned)."""


@dataclass
class RunResult:
    run_id: str | None
    metrics: dict[str, float]  # the last epoch's metrics
    history: list[dict[str, float]] = field(default_factory=list)
    objective: float = float("nan")  # last-epoch accuracy on the evaluation split
    epochs_done: int = 0
    seconds: float = 0.0


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


# ----------------------------------------------------------------------------- build
@dataclass
class RunParts:
    """Everything one run trains with; ``cfg`` is resolved (hyperparameters, sampler)."""

    cfg: RunConfig
    device: torch.device
    model: CarrotModel
    variant: Variant
    splits: DatasetSplits
    eval_split: str  # "val" for study trials, "test" for final runs
    train_loader: torch.utils.data.DataLoader
    eval_loader: torch.utils.data.DataLoader
    probe_loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[nn.Parameter]  # what gradient clipping sees
    use_amp: bool
    scaler: torch.amp.GradScaler  # float16 autocast only; a pass-through otherwise
    step: nn.Module  # model and variant as one module (DDP-wrapped under torchrun): (x, y, ...) -> VariantOutput
    world_size: int = 1

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def amp_dtype(self) -> torch.dtype:
        return getattr(torch, self.cfg.amp_dtype)

    def autocast(self):
        return torch.autocast("cuda", dtype=self.amp_dtype) if self.use_amp else contextlib.nullcontext()


def build_run(cfg: RunConfig) -> RunParts:
    """Model, variant, data loaders, optimiser and LR schedule of ``cfg``, seeded."""
    check_names(cfg)
    cfg = cfg.resolved()
    device = ddp.local_device(resolve_device(cfg.device))
    seed_everything(cfg.seed)
    variant = create_variant(cfg.variant.name, **cfg.variant.hparams)
    backbone = create_backbone(cfg.model.backbone, cfg.model.pretrained, cfg.model.pretrained_path,
                               cfg.model.drop_rate, cfg.model.kwargs)
    splits = build_dataset(cfg.data, image_spec(backbone))
    train_set, train_labels, eval_set, _, eval_split = training_split(splits, cfg.split)
    model = CarrotModel(backbone, variant.build_neck(backbone.num_features), splits.num_classes,
                        cfg.model.probe_layers).to(device)
    if device.type == "cuda" and cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    world = ddp.world_size()
    if world > 1 and device.type == "cuda":  # per-rank batch-norm statistics would differ from one process's
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.compile:
        model.backbone = torch.compile(model.backbone)
    variant.to(device)
    pin = device.type == "cuda"
    if cfg.data.cache and cfg.data.workers > 0:  # fill once here, not once per worker process
        for ds in (splits.train, splits.val, splits.test, splits.train_eval, splits.val_train):
            if hasattr(ds, "fill_cache"):
                ds.fill_cache()
    train_loader = make_loader(train_set, cfg, train=True, labels=train_labels, pin=pin)
    eval_loader = make_loader(eval_set, cfg, train=False, pin=pin)
    probe_set = splits.train_eval if cfg.split == "val" else torch.utils.data.ConcatDataset(
        [splits.train_eval, splits.val])
    probe_loader = make_loader(probe_set, cfg, train=False, pin=pin)
    if len(train_loader) == 0:
        raise ConfigError(f"invalid data.batch_size={cfg.data.batch_size}: larger than the training split "
                          f"({len(train_set)} samples)")

    params = list(model.parameters()) + [p for p in variant.parameters() if p.requires_grad]
    optimizer = make_optimizer(nn.ModuleList([model, variant]), cfg)
    updates = math.ceil(len(train_loader) / cfg.optim.accumulate)  # optimiser steps per epoch
    total_steps = cfg.optim.epochs * updates
    warmup_steps = int(round(cfg.optim.warmup_epochs * updates))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps))
    step: nn.Module = StepModule(model, variant)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    return RunParts(cfg=cfg, device=device, model=model, variant=variant, splits=splits, eval_split=eval_split,
                    train_loader=train_loader, eval_loader=eval_loader, probe_loader=probe_loader,
                    optimizer=optimizer, scheduler=scheduler, params=params,
                    use_amp=cfg.amp and device.type == "cuda",
                    scaler=torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda"
                                                and cfg.amp_dtype == "float16"),
                    step=step, world_size=world)


# ----------------------------------------------------------------------------- one step, one epoch
def forward_step(model: nn.Module, variant: Variant, x: Tensor, y: Tensor, progress: float,
                 label_smoothing: float = 0.0) -> VariantOutput:
    """One batch through the model (embedding, logits, and the probed features when the
    variant uses them) and the variant (CE and its terms, its statistics)."""
    out = model(x, with_features=variant.uses_features)
    return variant(StepBatch(embedding=out.embedding, logits=out.logits, labels=y, head=model.head,
                             features=out.features, progress=progress, label_smoothing=label_smoothing))


class StepModule(nn.Module):
    """The model and the variant as one module, so that DDP sees every trained parameter
    (backbone, neck, head, and the variant's own) in one forward."""

    def __init__(self, model: nn.Module, variant: Variant) -> None:
        super().__init__()
        self.model, self.variant = model, variant

    def forward(self, x: Tensor, y: Tensor, progress: float, label_smoothing: float = 0.0) -> VariantOutput:
        return forward_step(self.model, self.variant, x, y, progress, label_smoothing)


class MeanAggregator:
    """Running means of 0-dim tensors in float64, kept on their device: adding never syncs with the host,
    :meth:`compute` syncs once. With ``skip_nonfinite`` a NaN/inf value counts as missing.
    Under DDP :meth:`compute` averages over every rank's values (the same keys on every rank)."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}  # key -> (sum, count)

    def add(self, key: str, value: Tensor, skip_nonfinite: bool = False) -> None:
        value = value.detach().double()  # float64: a mean of tiny values (an overlap rho) stays nonzero
        ok = torch.isfinite(value) if skip_nonfinite else torch.ones((), dtype=torch.bool, device=value.device)
        pair = torch.stack([torch.where(ok, value, 0.0), ok.double()])
        self._sums[key] = self._sums[key] + pair if key in self._sums else pair

    def compute(self) -> dict[str, float]:
        """Key -> mean (NaN for a key that never had a finite value)."""
        if not self._sums:
            return {}
        keys = list(self._sums)
        sums = torch.stack([self._sums[k] for k in keys])  # (n, 2)
        if ddp.active():
            import torch.distributed as dist

            dist.all_reduce(sums)
        sums = sums.cpu()
        return {k: float(s[0] / s[1]) if float(s[1]) > 0 else float("nan") for k, s in zip(keys, sums)}


def train_one_epoch(parts: RunParts, epoch: int) -> dict[str, float]:
    """One pass over the training loader; returns the mean loss, each term and statistic, the
    learning rate and the epoch's wall time. A non-finite mean loss raises FloatingPointError."""
    cfg, model, variant = parts.cfg, parts.model, parts.variant
    model.train()
    variant.train()
    means = MeanAggregator()
    start = time.time()
    steps = parts.steps_per_epoch
    accumulate = cfg.optim.accumulate
    channels_last = parts.device.type == "cuda" and cfg.model.channels_last
    if hasattr(parts.train_loader.sampler, "set_epoch"):  # DistributedSampler: a new shuffle each epoch
        parts.train_loader.sampler.set_epoch(epoch)
    for step, (x, y) in enumerate(parts.train_loader):
        interrupt.check()
        x = x.to(parts.device, non_blocking=True)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(parts.device, non_blocking=True)
        update = (step + 1) % accumulate == 0 or step + 1 == steps
        # DDP averages the gradients once per optimiser step, not after every micro-batch
        sync = contextlib.nullcontext() if update or parts.world_size == 1 else parts.step.no_sync()
        with sync:
            with parts.autocast():
                result = parts.step(x, y, epoch + step / steps, cfg.optim.label_smoothing)
                loss = result.loss
            if step % accumulate == 0:
                parts.optimizer.zero_grad(set_to_none=True)
            # each micro-batch's mean loss counts 1/k of the step's, as one batch k times larger would
            parts.scaler.scale(loss / accumulate if accumulate > 1 else loss).backward()
        if update:
            if cfg.optim.grad_clip:
                parts.scaler.unscale_(parts.optimizer)
                torch.nn.utils.clip_grad_norm_(parts.params, cfg.optim.grad_clip)
            parts.scaler.step(parts.optimizer)
            parts.scaler.update()
            parts.scheduler.step()
        means.add(contract.TRAIN_PREFIX + "loss", loss)
        for name, value in result.terms.items():
            means.add(contract.TRAIN_PREFIX + name, value)
        for name, value in result.stats.items():
            # a statistic a step could not define (NaN) counts as missing, not as a value
            means.add(contract.VARIANT_STAT_PREFIX + name, value, skip_nonfinite=True)
    metrics = means.compute()
    metrics["train/lr"] = parts.scheduler.get_last_lr()[0]
    metrics["time/train_epoch_s"] = time.time() - start
    losses = {k: v for k, v in metrics.items() if k.startswith(contract.TRAIN_PREFIX)}
    if not all(math.isfinite(v) for v in losses.values()):
        raise FloatingPointError(f"non-finite training loss at epoch {epoch + 1}: {losses}")
    return metrics


# ----------------------------------------------------------------------------- the tracked run
def run_tags(cfg: RunConfig, study: str | None, trial: int | None) -> dict[str, str]:
    from carrot.tracking import git_commit

    return {
        contract.TAG_VARIANT: cfg.variant.name,
        contract.TAG_STUDY: study or "",
        contract.TAG_TRIAL: "" if trial is None else str(trial),
        contract.TAG_DATASET: cfg.data.dataset_id,
        contract.TAG_CONFIG_HASH: cfg.identity_hash(),
        contract.TAG_BACKBONE: cfg.model.backbone,
        contract.TAG_SEED: str(cfg.seed),
        contract.TAG_SPLIT: cfg.split,
        contract.TAG_GIT_COMMIT: git_commit(),
        contract.TAG_WORLD_SIZE: str(ddp.world_size()),
    }


class Run:
    """The MLflow run (none when not tracking) and the Optuna trial of one training."""

    def __init__(self, parts: RunParts, trial=None, logger=None) -> None:
        self.parts, self.trial, self.logger = parts, trial, logger
        self.status = "FAILED"
        self.started = time.time()
        self.logging_s = 0.0  # wall time spent in MLflow calls (time/logging_s)
        self.study_s = 0.0  # wall time spent in the Optuna trial's reports and pruning decisions (time/study_s)
        self.monitor = None  # MLflow's system metrics (CPU, memory, GPU) of this run

    @classmethod
    def start(cls, parts: RunParts, trial=None, *, track: bool = True, study: str | None = None,
              parent_run_id: str | None = None, run_name: str | None = None,
              extra_tags: dict[str, str] | None = None) -> "Run":
        if not track:
            return cls(parts, trial)
        from carrot.tracking import RunLogger, flatten

        from carrot import run_report
        from carrot.liveness import this_worker

        began = time.time()
        cfg, splits = parts.cfg, parts.splits
        number = None if trial is None else trial.number
        tags = {**run_tags(cfg, study, number), contract.TAG_NUM_CLASSES: str(splits.num_classes),
                contract.TAG_WORKER: json.dumps(this_worker()),  # so a run a kill left RUNNING is found
                **source_tags((extra_tags or {}).get(contract.TAG_ROLE, "")), **(extra_tags or {})}
        tags[contract.MLFLOW_NOTE] = run_report.describe(cfg.variant.name, study, number, "RUNNING", 0,
                                                         cfg.optim.epochs, None, parts.eval_split)
        name = run_name or f"{cfg.variant.name}-s{cfg.seed}" + ("" if trial is None else f"-t{number}")
        logger = RunLogger.start(cfg.experiment, name, tags, parent_run_id)
        self = cls(parts, trial, logger)
        self.study = study
        self.monitor = start_system_metrics(logger)
        try:
            if trial is not None:  # from the start, so a worker that dies leaves a run to close
                from carrot.tracking import run_url

                marked = time.time()
                trial.set_user_attr(contract.TRIAL_RUN_ID_ATTR, logger.run_id)
                trial.set_user_attr(contract.TRIAL_RUN_URL_ATTR,
                                    run_url(logger.client, logger.run_id, logger.experiment_id))
                self.study_s += time.time() - marked
            resolved = cfg.to_dict()
            resolved["data"]["effective_batch_size"] = parts.train_loader.batch_size * parts.world_size
            logger.log_params(run_report.logged_params(flatten("", resolved), parts.device.type))
            logger.client.log_inputs(logger.run_id, datasets=run_report.dataset_inputs(
                cfg.data.dataset_id, cfg.data.root, splits, cfg.split))
            logger.log_files({contract.CONFIG_ARTIFACT: resolved, contract.DATASET_ARTIFACT: {
                "num_classes": splits.num_classes, "class_names": splits.class_names,
                "sizes": {k: int(len(v)) for k, v in splits.labels.items()}, **splits.info}})
        except BaseException:
            self.stop_monitor()
            logger.finish("FAILED")
            raise
        self.logging_s += time.time() - began - self.study_s  # the run's creation, params, inputs and config
        return self

    def stop_monitor(self) -> None:
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception:  # the run's own status matters more than its last CPU sample
                pass
            self.monitor = None

    @property
    def run_id(self) -> str | None:
        return self.logger.run_id if self.logger else None

    def log_epoch(self, epoch: int, metrics: dict[str, float], evaluator: Evaluator,
                  report_only: bool = False) -> None:
        """Log the epoch's metrics, report to the trial, and raise TrialPruned when it says so
        (``report_only``: an epoch replayed from a checkpoint, never pruned)."""
        start = time.time()
        try:
            self._log_epoch_metrics(epoch, metrics, evaluator)
        finally:
            self.logging_s += time.time() - start
        if self.trial is not None:
            start = time.time()
            try:
                self._report(epoch, metrics, report_only)
            finally:
                self.study_s += time.time() - start

    def _log_epoch_metrics(self, epoch: int, metrics: dict[str, float], evaluator: Evaluator) -> None:
        if self.logger:
            if epoch == 0:
                tags = {contract.TAG_REF_PAIRS_SOURCE: evaluator.ref_source}
                if evaluator.ref_problem:
                    tags[contract.TAG_REF_PAIRS_PROBLEM] = evaluator.ref_problem
                self.logger.set_tags(tags)
            self.logger.log_metrics(metrics, step=epoch + 1, background=True)  # committed while training goes on

    def _report(self, epoch: int, metrics: dict[str, float], report_only: bool) -> None:
        key = contract.split_metric(self.parts.eval_split, "acc")
        self.trial.report(metrics[key], epoch + 1)
        last = epoch == self.parts.cfg.optim.epochs - 1
        if not last and not report_only and self.trial.should_prune():  # a fully trained trial is kept
            self.status = "KILLED"
            raise TrialPruned(f"pruned after epoch {epoch + 1} ({key}={metrics[key]:.4f})")

    def close(self, evaluator: Evaluator | None, history: list[dict[str, float]], error: str = "",
              pruned: str = "") -> None:
        """End the run: its artifacts and pictures, its description and status tags, the
        variant's last statistics on the Optuna trial (``pruned``: the pruner's reason)."""
        from carrot import run_report

        epochs_done = len(history)
        last = history[-1] if history else None
        if self.trial is not None and last is not None:
            marked = time.time()
            try:
                for key, value in last.items():
                    if key.startswith(contract.VARIANT_STAT_PREFIX) and math.isfinite(value):
                        self.trial.set_user_attr(key, value)
            except Exception:  # the study's storage went away: the run is still closed below
                pass
            self.study_s += time.time() - marked
        if not self.logger:
            return
        start = time.time()
        picture_problem = ""
        try:
            self.logger.flush()  # the epochs' metrics, before the run's last words
            if evaluator is not None:
                self.logger.log_files(evaluator.artifacts())
                if evaluator.confusions and self.parts.cfg.eval.images:
                    picture_problem = run_report.log_pictures(
                        self.logger, evaluator.confusions[-1], evaluator.class_names, history,
                        self.parts.cfg.eval.top_n, max(1, epochs_done))
            status = "pruned" if self.status == "KILLED" and not error else self.status.lower()
            tags = {contract.TAG_STATUS: status, contract.TAG_EPOCHS_DONE: epochs_done}
            if picture_problem:
                tags[contract.TAG_PICTURES_ERROR] = picture_problem
            if error:
                tags[contract.TAG_ERROR] = error
            cfg = self.parts.cfg
            tags[contract.MLFLOW_NOTE] = run_report.describe(
                cfg.variant.name, self.study, None if self.trial is None else self.trial.number,
                "PRUNED" if status == "pruned" else self.status, epochs_done, cfg.optim.epochs, last,
                self.parts.eval_split, error or pruned)
            self.stop_monitor()
            # where the run's wall time went (the bench reads these): the logging includes all of
            # this close but its last two store writes, these tags and metrics, and the status
            self.logging_s += time.time() - start
            self.logger.set_tags(tags, {"time/logging_s": self.logging_s, "time/study_s": self.study_s,
                                        "time/run_s": time.time() - self.started}, step=max(1, epochs_done))
        finally:
            self.stop_monitor()
            self.logger.finish(self.status)

    def log_weights(self, model: nn.Module) -> None:
        """The trained weights as an artifact (final runs: a test number can be re-checked)."""
        if self.logger:
            import io

            buf = io.BytesIO()
            torch.save(model.state_dict(), buf)
            self.logger.log_bytes(buf.getvalue(), contract.WEIGHTS_ARTIFACT)


def source_tags(role: str) -> dict[str, str]:
    """MLflow's own source tags: the command and the commit the run came from."""
    from carrot.tracking import git_commit

    commit = git_commit()
    tags = {contract.MLFLOW_SOURCE_NAME: f"carrot {role}".strip(), contract.MLFLOW_SOURCE_TYPE: "LOCAL"}
    if commit != "unknown":
        tags[contract.MLFLOW_SOURCE_GIT_COMMIT] = commit.removesuffix("-dirty")
    return tags


def start_system_metrics(logger):
    """MLflow's system-metrics monitor (``system/cpu_utilization_percentage``, memory, and GPU
    utilisation and memory through nvidia-ml-py) on the run; sampled every
    ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (default 10). ``CARROT_SYSTEM_METRICS=0``
    turns it off."""
    import os

    if os.environ.get("CARROT_SYSTEM_METRICS", "1") == "0":
        return None
    try:
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per run
        monitor = SystemMetricsMonitor(logger.run_id, tracking_uri=logger.client.tracking_uri)
        monitor.start()
        return monitor
    except Exception:  # psutil missing, or no permission to read the counters: train without it
        return None


def failure_reason(exc: BaseException) -> str:
    """One line: what stopped a run."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return f"out of memory: {exc}".splitlines()[0]
    return contract.error_line(exc)


def run(cfg: RunConfig, trial=None, *, study: str | None = None, parent_run_id: str | None = None,
        run_name: str | None = None, log: Callable[[str], None] = print, track: bool = True,
        extra_tags: dict[str, str] | None = None, reference: ReferencePairs | None = None,
        checkpoint_dir: Path | None = None, resume_from: Path | None = None,
        keep_checkpoint: bool = False, save_weights: bool = False) -> RunResult:
    """Train one configuration and evaluate it after every epoch.

    ``trial`` (an Optuna trial) receives the per-epoch accuracy for pruning; a pruned run (or
    one whose loss diverged) raises :class:`TrialPruned` after its MLflow run is closed as
    KILLED with the reason. ``reference`` holds the reference pairs resolved by the caller
    (none: the run's own first pairs). With ``checkpoint_dir`` every epoch ends with a
    checkpoint there (removed when the run finishes, unless ``keep_checkpoint``);
    ``resume_from`` continues from a checkpoint. A signal (:mod:`carrot.interrupt`) stops the
    run at the next step: its MLflow run ends KILLED and :class:`~carrot.interrupt.Interrupted`
    propagates. Under DDP (:mod:`carrot.ddp`) every rank calls it; rank 0 alone evaluates,
    tracks, reports and writes the checkpoint, and the other ranks' result holds only the
    training metrics.
    """
    started = time.time()
    parts = build_run(cfg)
    cfg = parts.cfg
    resumed = None
    if resume_from is not None:
        # every rank reads the file, and all of them resume only when all could: the ranks of a
        # DDP trial start from the same epoch, and every one of them reaches this exchange
        try:
            resumed, unreadable = checkpoint.load(resume_from), ""
        except Exception as exc:  # cut short or damaged (or too large for memory): trained again
            resumed, unreadable = None, failure_reason(exc)
        unreadable = next((reason for reason in ddp.all_gather(unreadable) if reason), "")
        if unreadable:
            if ddp.is_main():
                log(f"checkpoint {resume_from} is unreadable ({unreadable}); starting from epoch 0")
            resumed, resume_from = None, None
    tags = dict(extra_tags or {})
    if checkpoint_dir is not None:
        tags[contract.TAG_CHECKPOINT] = str(checkpoint_dir)
    if resume_from is not None:
        tags[contract.TAG_RESUMED_FROM] = str(resume_from)
    main = ddp.is_main()
    tracked = Run.start(parts, trial if main else None, track=track and main, study=study,
                        parent_run_id=parent_run_id, run_name=run_name, extra_tags=tags)
    history: list[dict[str, float]] = []
    evaluator = None
    progress = None
    error = pruned = ""
    try:
        evaluator = Evaluator(cfg, parts.splits, parts.eval_split, parts.model, parts.device, reference)
        # set-up (lazy imports, store calls) may have drawn from the global generators; under DDP
        # each rank draws its own noise (dropout, augmentation, nuisance's perturbations)
        seed_everything(cfg.seed + 1_000_003 * ddp.rank())
        first = 0
        if resumed is not None:
            first, history = restore(parts, evaluator, resumed)
            resumed = None  # the model, optimiser and evaluator hold it now
            if main:
                for epoch, metrics in enumerate(history):  # the new run holds the whole history
                    tracked.log_epoch(epoch, metrics, evaluator, report_only=True)
            log(f"resumed {name_for_progress(cfg, None)} from {resume_from} after epoch {first}")
        number = None if trial is None else trial.number
        progress = Progress(total=cfg.optim.epochs, desc=name_for_progress(cfg, number),
                            enabled=cfg.show_progress and main, log=log)
        for epoch in range(first, cfg.optim.epochs):
            try:
                train_metrics = train_one_epoch(parts, epoch)
            except FloatingPointError as exc:
                if trial is None:
                    raise
                tracked.status = "KILLED"
                raise TrialPruned(str(exc)) from None
            probe = cfg.eval.probes_at(epoch, cfg.optim.epochs, cfg.split)

            def evaluate_and_log() -> None:  # rank 0 only; the other ranks learn how it ended
                eval_metrics = evaluator.evaluate(epoch, parts.eval_loader, parts.probe_loader if probe else None,
                                                  parts.amp_dtype if parts.use_amp else None)
                metrics = {**train_metrics, **eval_metrics}
                history.append(metrics)
                acc = metrics[contract.split_metric(parts.eval_split, "acc")]
                progress.update(epoch + 1, loss=train_metrics["train/loss"], acc=acc)
                tracked.log_epoch(epoch, metrics, evaluator)
                if checkpoint_dir is not None:
                    checkpoint.save(checkpoint_dir / checkpoint.CHECKPOINT_FILE,
                                    snapshot(parts, evaluator, epoch + 1, history))

            ddp.on_main(evaluate_and_log, TrialPruned)
            if not main:
                history.append(train_metrics)
        if save_weights:
            tracked.log_weights(parts.model)
        tracked.status = "FINISHED"
    except TrialPruned as exc:
        error = "" if tracked.status == "KILLED" and str(exc).startswith("pruned") else str(exc)
        pruned = str(exc)
        _drop_checkpoint(checkpoint_dir)  # a pruned trial is finished: nothing will resume it
        raise
    except interrupt.Interrupted as exc:
        tracked.status, error = "KILLED", str(exc)
        raise  # its checkpoint stays: the retry resumes from it
    except BaseException as exc:
        if interrupt.requested():  # e.g. loader workers killed by the same Ctrl-C
            tracked.status, error = "KILLED", str(interrupt.Interrupted(interrupt.requested()))
            raise interrupt.Interrupted(interrupt.requested()) from None
        error = failure_reason(exc)
        _drop_checkpoint(checkpoint_dir)  # a failure is not retried
        raise
    finally:
        if progress:
            progress.close()
        tracked.close(evaluator, history, error, pruned)
    if checkpoint_dir is not None:
        checkpoint.remove(checkpoint_dir, keep_last=keep_checkpoint)
    final = history[-1]
    return RunResult(run_id=tracked.run_id, metrics=final, history=history,
                     objective=final.get(contract.split_metric(parts.eval_split, "acc"), float("nan")),
                     epochs_done=len(history),
                     seconds=time.time() - started)


def _drop_checkpoint(folder: Path | None) -> None:
    if folder is not None:
        checkpoint.remove(folder)


def snapshot(parts: RunParts, evaluator: Evaluator, epochs_done: int,
             history: list[dict[str, float]]) -> dict[str, Any]:
    """Everything the next epoch depends on (see :mod:`carrot.checkpoint`)."""
    return {
        "epochs_done": epochs_done,
        "config_hash": parts.cfg.identity_hash(),
        "model": parts.model.state_dict(),
        "variant": parts.variant.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "sampler": checkpoint.sampler_state(parts.train_loader),
        "rng": checkpoint.rng_state(),
        "history": history,
        "evaluator": evaluator.state_dict(),
    }


def restore(parts: RunParts, evaluator: Evaluator, state: dict[str, Any]) -> tuple[int, list[dict[str, float]]]:
    """Load a :func:`snapshot` into freshly built parts; returns (epochs done, history)."""
    if state["config_hash"] != parts.cfg.identity_hash():
        raise ConfigError("the checkpoint was written by another configuration "
                          f"({state['config_hash']} != {parts.cfg.identity_hash()}); not resuming from it")
    parts.model.load_state_dict(state["model"])
    parts.variant.load_state_dict(state["variant"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.scaler.load_state_dict(state["scaler"])
    checkpoint.set_sampler_state(parts.train_loader, state["sampler"])
    evaluator.load_state_dict(state["evaluator"])
    checkpoint.set_rng_state(state["rng"])
    return int(state["epochs_done"]), list(state["history"])


def name_for_progress(cfg: RunConfig, trial_number: int | None) -> str:
    base = f"{cfg.variant.name} seed {cfg.seed}"
    return base if trial_number is None else f"{base} trial {trial_number}"
