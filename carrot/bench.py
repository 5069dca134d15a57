"""``make bench`` / ``carrot bench``: what every part of the harness costs, as ratios measured side by side.

Every figure is a ratio of two things timed in the same run, interleaved: every repeat times
each measured step right after its reference (each timed call right after an untimed one of
the same function, so both run warm), and the ratio is the median over repeats of the
per-repeat ratios, so machine noise hits both sides alike (the variant table also prints their
interquartile range, how far the repeats spread). Torch's own number of CPU threads
unless ``--threads``; the load average at the start and the end is printed with the figures.
Sections:

- **variants**: one step of each variant at the embedding level (the leaf embedding through
  the variant's neck and the head, the variant's CE and terms, three pooled intermediate
  features for the variants that use them, backward) over the CE head's (z -> Linear -> CE ->
  backward), at B = 64 (16 classes x 4), D = 2048, K = 200; and the same ratio at K = 50, 1000
  and D = 512 (**scaling**). Before the timing every variant steps through batches that hold
  all K classes, so a variant with per-class state (``prototype``) is timed as it trains.
  Where a term cannot avoid some matrix products (a second head pass, the K x K Gram;
  :meth:`carrot.variants.base.Variant.floor_products`) or random draws (nuisance's noise;
  :meth:`~carrot.variants.base.Variant.floor_normal_draws`), those are timed after the CE head
  as the term's **floor**.
- **memory**: the step's peak memory over the CE step's (CUDA: ``max_memory_allocated``; CPU:
  the C allocator's bytes in use after every op, glibc's ``mallinfo2``), each above the level
  before the step with its gradients released.
- **train step**: a whole training step of the default study's model (backbone, image size,
  batch and optimiser of the default configuration, one real batch) with the variant over
  the same step with ``baseline``.
- **study**: the default study (``carrot study --variant baseline``; ``--study-trials``
  trials) in a temporary MLflow store and Optuna journal: trials per hour with one worker and
  with ``--study-jobs`` workers, the epochs pruning saved against the ``trials x epochs`` an
  unpruned study of the same size trains, and the shares of a trial's wall time spent
  in MLflow logging (``time/logging_s``), in the Optuna trial's reports and pruning decisions
  (``time/study_s``), in the per-epoch diagnostics (``time/eval_s``) and in the probes
  (``time/probe_s``), read back from the trials' runs.
- **sync routes**: each variant's step run once on the CPU through the routes a CUDA step
  takes (:func:`carrot.geometry.device_routes`), with the operations in it that would make the
  host wait for a GPU (:mod:`carrot.syncs`); ``--sync-debug`` alone on a machine without CUDA.
- on CUDA: the variants and memory again, each variant's share of a ResNet-50 step at 448 px
  (bf16), and whether a variant's step synchronises with the host (``--sync-debug``, or
  always on CUDA): ``torch.cuda.set_sync_debug_mode("error")`` around it.

Then each target is printed as PASS / FAIL (SKIP where it needs CUDA); ``--json FILE``
writes every section.

>>> rows = bench_variants(batch=8, classes_in_batch=4, num_classes=10, dim=16, repeats=1, warmup=1)
>>> rows[0]["variant"], rows[0]["ratio"] > 0
('baseline', True)
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from carrot import contract, interrupt
from carrot.config import int_argument
from carrot.geometry import used_class_slots
from carrot.model import ModelOutput
from carrot.train import forward_step
from carrot.variants import create_variant, list_variants

CPU_TARGET_RATIO = 3.0  # a variant's step over the CE head's, CPU, at the scale above
FLOOR_SLACK = 1.5  # ... or within this factor of its floor where it has one (the floor relaxes 3x, never tightens it)
GPU_TARGET_PERCENT = 5.0  # added to a ResNet-50 step at 448 px
LOGGING_TARGET = 0.02  # share of a trial's wall time spent in MLflow calls
DIAGNOSTICS_TARGET = 0.20  # share spent in the per-epoch diagnostics and the probes
PRUNING_TARGET = 1.0 / 3.0  # share of an unpruned study's epochs that pruning saves
FEATURE_DIMS = {"layer2": 512, "layer3": 1024, "layer4": 2048}  # resnet50's last three stages
PROGRESS = 1000.0  # epochs elapsed: past every warm-up, so every term is active
SCALING = ((50, 2048), (200, 2048), (1000, 2048), (200, 512))  # (K, D) of the scaling table
SECTIONS = ("machine", "variants", "scaling", "memory", "train_step", "sync_routes", "study", "cuda", "targets")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns: Sequence[Callable[[], object]], device: torch.device, repeats: int,
                      warmup: int) -> list[list[float]]:
    """Wall times (s) of each of ``fns`` in every repeat (synchronised on CUDA).

    Within a repeat the functions run in turn, each timed call right after an untimed call of
    the same function, so each is timed warm in cache and load drift hits all of them alike.
    """
    for _ in range(warmup):
        interrupt.check()  # a signal stops the bench between repeats
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, repeats)):
        interrupt.check()
        for fn, acc in zip(fns, times):
            fn()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            acc.append(time.perf_counter() - start)
    return times


def median_ratio(times: list[float], reference: list[float]) -> float:
    """Median over repeats of ``times[r] / reference[r]``."""
    return statistics.median(t / r for t, r in zip(times, reference))


def ratio_quartiles(times: list[float], reference: list[float]) -> list[float]:
    """First and third quartiles over repeats of ``times[r] / reference[r]`` (linear
    interpolation between order statistics, numpy's default): how much the repeats spread."""
    ratios = [t / r for t, r in zip(times, reference)]
    if len(ratios) < 2:
        return ratios * 2
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return [q1, q3]


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` in milliseconds (synchronised on CUDA)."""
    return 1e3 * statistics.median(interleaved_times([fn], device, repeats, warmup)[0])


def parse_variant_spec(spec: str) -> tuple[str, dict[str, object]]:
    """``"prototype:metric=mahalanobis,top_m=10"`` -> ("prototype", {...}); values are read as
    ``--set`` reads them (:func:`carrot.config.parse_value`: numbers, ``true``/``false``, strings)."""
    from carrot.config import parse_value

    name, _, rest = spec.partition(":")
    hparams: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"expected key=value in {spec!r}, got {item!r}")
        hparams[key.strip()] = parse_value(raw.strip())
    return name.strip(), hparams


def pk_labels(batch: int, classes_in_batch: int, num_classes: int, device: torch.device) -> Tensor:
    """``classes_in_batch`` classes spread over [0, K), each repeated ``batch // classes_in_batch`` times."""
    if not 0 < classes_in_batch <= min(batch, num_classes):
        raise ValueError(f"need 0 < classes_in_batch <= min(batch, num_classes), got {classes_in_batch}")
    classes = torch.linspace(0, num_classes - 1, classes_in_batch).round().long()
    y = classes.repeat_interleave(batch // classes_in_batch)
    return torch.cat([y, classes[: batch - len(y)]]).to(device)  # (B,)


class EmbeddingModel(nn.Module):
    """Stands in for the backbone at the embedding level: the leaf embedding goes through the
    variant's neck and the head, with fixed leaf tensors as the probed features."""

    def __init__(self, neck: nn.Module, head: nn.Linear, features: dict[str, Tensor]) -> None:
        super().__init__()
        self.neck, self.head, self.features = neck, head, features

    def forward(self, z: Tensor, with_features: bool = False) -> ModelOutput:
        embedding = self.neck(z)
        return ModelOutput(embedding, self.head(embedding), self.features if with_features else {})


# ----------------------------------------------------------------------------- embedding level
class EmbeddingBench:
    """The CE head's step and every variant's step at one scale, on one device."""

    def __init__(self, device: torch.device, batch: int, classes_in_batch: int, num_classes: int, dim: int,
                 variants: Sequence[str], seed: int = 0) -> None:
        self.device, self.specs = device, list(variants)
        self.batch, self.num_classes, self.dim = batch, num_classes, dim
        self.y = pk_labels(batch, classes_in_batch, num_classes, device)
        torch.manual_seed(seed)
        self.z = torch.randn(batch, dim, device=device, requires_grad=True)  # (B, D)
        self.head = nn.Linear(dim, num_classes).to(device)
        self.variants: list = []
        self.trained: list[list[Tensor]] = []  # per variant: the tensors its step writes gradients to
        self.steps = [self._variant_step(spec, seed) for spec in self.specs]
        self._visit_every_class()

    def _visit_every_class(self) -> None:
        """Run every variant's step on batches that together hold all K classes (the bench
        batch's class multiplicities, its classes moved to ``start, start + 1, ...``), then
        return to the bench batch. A variant with state across steps (``prototype``'s
        prototypes, confusion rows and neighbour pairs over the classes it has seen) is then
        timed as it trains once it has seen every class, not with the bench batch's only."""
        fixed = self.y.clone()
        classes, inv = torch.unique(fixed, sorted=True, return_inverse=True)
        c = classes.shape[0]
        for start in range(0, self.num_classes, c):
            interrupt.check()
            self.y.copy_(((torch.arange(c, device=self.device) + start) % self.num_classes)[inv])
            for step in self.steps:
                step()
        self.y.copy_(fixed)

    def ce_step(self) -> None:
        self.z.grad = None
        self.head.zero_grad(set_to_none=True)
        F.cross_entropy(self.head(self.z), self.y).backward()

    def clear_ce(self) -> None:
        self.z.grad = None
        self.head.zero_grad(set_to_none=True)

    def _variant_step(self, spec: str, seed: int) -> Callable[[], None]:
        name, hparams = parse_variant_spec(spec)
        torch.manual_seed(seed)
        variant = create_variant(name, **hparams).to(self.device).train()
        self.variants.append(variant)
        neck = variant.build_neck(self.dim).to(self.device)
        features = {
            layer: torch.randn(self.batch, d, device=self.device, requires_grad=True)
            for layer, d in (FEATURE_DIMS.items() if variant.uses_features else ())
        }
        model = EmbeddingModel(neck, self.head, features)
        trained = [self.z, *features.values(), *model.parameters(), *variant.parameters()]
        self.trained.append(trained)
        z, y = self.z, self.y

        def step() -> None:
            for t in trained:
                t.grad = None
            forward_step(model, variant, z, y, PROGRESS).loss.backward()

        return step

    def floor_step(self, variant) -> Callable[[], None] | None:
        """The CE head's step followed by the matrix products and the normal draws the variant's
        term cannot avoid."""
        slots = used_class_slots(self.y)[3]  # the class slots a step uses (None: all B)
        products = variant.floor_products(self.batch, self.num_classes, self.dim, slots)
        draws = variant.floor_normal_draws(self.batch, self.dim)
        if not products and not draws:
            return None
        g = torch.Generator(device="cpu").manual_seed(0)
        operands = [(torch.randn(n, k, generator=g).to(self.device), torch.randn(k, m, generator=g).to(self.device))
                    for n, k, m in products]

        def step() -> None:
            self.ce_step()
            for a, b in operands:
                torch.mm(a, b)
            if draws:
                torch.randn(draws, device=self.device)

        return step

    def ratios(self, repeats: int, warmup: int, floors: bool = True) -> list[dict[str, Any]]:
        """One row per variant: ``ms``, ``ce_ms``, ``ratio`` (median of per-repeat ratios),
        ``ratio_iqr`` (their first and third quartiles) and, with a floor, ``floor_ratio`` and
        ``over_floor`` = ratio / floor_ratio. Every repeat times each variant (and its floor)
        right after the CE head."""
        fns: list[Callable[[], object]] = []
        slots = []
        for variant, step in zip(self.variants, self.steps):
            floor = self.floor_step(variant) if floors else None
            slots.append((len(fns), len(fns) + 1, len(fns) + 2 if floor else None))
            fns += [self.ce_step, step] + ([floor] if floor else [])
        times = interleaved_times(fns, self.device, repeats, warmup)
        rows = []
        for spec, (i_ce, i_step, i_floor) in zip(self.specs, slots):
            ce, t = times[i_ce], times[i_step]
            row: dict[str, Any] = {"variant": spec, "ms": 1e3 * statistics.median(t),
                                   "ce_ms": 1e3 * statistics.median(ce), "ratio": median_ratio(t, ce),
                                   "ratio_iqr": ratio_quartiles(t, ce),
                                   "floor_ratio": None, "over_floor": None}
            if i_floor is not None:
                row["floor_ratio"] = median_ratio(times[i_floor], ce)
                row["over_floor"] = row["ratio"] / row["floor_ratio"]
            rows.append(row)
        return rows

    def memory(self) -> list[dict[str, Any]]:
        """Peak memory of each variant's step over the CE step's: the bytes above the level
        before the step, its gradients released (so they count as the step's own)."""
        ce = peak_step_bytes(self.ce_step, self.device, self.clear_ce)
        rows = []
        for spec, step, trained in zip(self.specs, self.steps, self.trained):
            def clear(trained=trained) -> None:
                for t in trained:
                    t.grad = None

            peak = peak_step_bytes(step, self.device, clear)
            rows.append({"variant": spec, "peak_bytes": peak, "ce_peak_bytes": ce,
                         "ratio": peak / ce if ce > 0 else float("nan")})
        return rows


def bench_variants(
    device: str | torch.device = "cpu",
    batch: int = 64,
    classes_in_batch: int = 16,
    num_classes: int = 200,
    dim: int = 2048,
    repeats: int = 50,
    warmup: int = 5,
    variants: Sequence[str] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Every variant's step over the CE head's at one scale (see the module doc).

    Each variant runs at its recommended setting; an entry of ``variants`` may override
    hyperparameters as ``"name:key=value,..."`` (see :func:`parse_variant_spec`). Returns one
    row per entry: ``variant``, ``ms`` (its step), ``ce_ms`` (the CE head's), ``ratio``
    (median of per-repeat ratios), ``floor_ratio`` and ``over_floor`` (None without a floor),
    ``within_target`` (ratio within :func:`cpu_limit`).
    """
    names = list(variants) if variants is not None else list_variants()
    rows = EmbeddingBench(torch.device(device), batch, classes_in_batch, num_classes, dim, names, seed).ratios(
        repeats, warmup)
    for row in rows:
        row["within_target"] = within_cpu_target(row)
    return rows


def cpu_limit(row: dict[str, Any]) -> float:
    """A variant's CPU target as a ratio to the CE head: 3x, or 1.5x the term's floor where
    that is more (a floor above 2x). The floor relaxes the 3x where the unavoidable work
    alone comes close to it and never tightens it, so taking an avoidable product out of a
    step can only bring the step closer to its target."""
    floor = row.get("floor_ratio")
    return CPU_TARGET_RATIO if floor is None else max(CPU_TARGET_RATIO, FLOOR_SLACK * floor)


def within_cpu_target(row: dict[str, Any]) -> bool:
    return row["ratio"] <= cpu_limit(row)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use() -> Callable[[], int] | None:
    """Bytes the C allocator has handed out and not taken back (glibc ``mallinfo2``), or None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return in_use


class _PeakBytes(TorchDispatchMode):
    """The highest ``in_use()`` after any aten op (forward and backward) while active."""

    def __init__(self, in_use: Callable[[], int]) -> None:
        super().__init__()
        self.in_use, self.peak = in_use, in_use()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use())
        return out


def peak_step_bytes(step: Callable[[], None], device: torch.device, clear: Callable[[], None]) -> float:
    """Peak bytes a call of ``step`` holds above the level at its start, after one warm call
    and ``clear()`` (which releases what the step keeps, its gradients).

    CUDA: ``max_memory_allocated``. CPU: the C allocator's bytes in use (glibc's
    ``mallinfo2``) after every op of the call; NaN where that is not available.
    """
    step()
    clear()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - start)
    in_use = _malloc_in_use()
    if in_use is None:
        return float("nan")
    gc.collect()
    start = in_use()
    with _PeakBytes(in_use) as mode:
        step()
    return float(mode.peak - start)


# ----------------------------------------------------------------------------- training step
def default_config(variant: str = "baseline", **overrides: Any):
    """The configuration ``carrot study --variant <variant>`` starts from (its defaults), on ``device``."""
    from carrot.config import RunConfig

    data: dict[str, Any] = {"variant": {"name": variant}, "show_progress": False}
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return RunConfig.from_dict(data)


def bench_train_step(device: torch.device, variants: Sequence[str], repeats: int, warmup: int,
                     **overrides: Any) -> list[dict[str, Any]]:
    """A whole training step of the default configuration's model (forward, variant, backward,
    gradient clipping, optimiser step) with each variant over the same step with ``baseline``.

    Each step is built by :func:`carrot.train.build_run` and all train on the same batch (the
    first of ``baseline``'s loader), at the learning rate of the schedule's first step.
    """
    from carrot.train import build_run

    batch: list[Tensor] = []

    def make_step(spec: str) -> tuple[Callable[[], None], dict[str, Any]]:
        interrupt.check()
        name, hparams = parse_variant_spec(spec)
        cfg = default_config(name, device=device.type, **{f"variant.hparams.{k}": v for k, v in hparams.items()},
                             **overrides)
        parts = build_run(cfg)
        if not batch:
            x, y = next(iter(parts.train_loader))
            x, y = x.to(parts.device), y.to(parts.device)
            if parts.device.type == "cuda" and parts.cfg.model.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            batch.extend((x, y))
        x, y = batch
        clip = parts.cfg.optim.grad_clip

        def step() -> None:
            with parts.autocast():
                loss = parts.step(x, y, PROGRESS, parts.cfg.optim.label_smoothing).loss
            parts.optimizer.zero_grad(set_to_none=True)
            parts.scaler.scale(loss).backward()
            if clip:
                parts.scaler.unscale_(parts.optimizer)
                torch.nn.utils.clip_grad_norm_(parts.params, clip)
            parts.scaler.step(parts.optimizer)
            parts.scaler.update()

        info = {"backbone": parts.cfg.model.backbone, "batch": int(len(y)), "image_size": int(x.shape[-1]),
                "num_classes": parts.splits.num_classes}
        return step, info

    names = [n for n in variants if parse_variant_spec(n)[0] != "baseline"]
    base_step, info = make_step("baseline")
    steps = [make_step(n)[0] for n in names]
    times = interleaved_times([fn for step in steps for fn in (base_step, step)], device, repeats, warmup)
    base_ms = (1e3 * statistics.median(t for base in times[::2] for t in base) if names
               else median_ms(base_step, device, repeats, warmup))
    rows = [{"variant": "baseline", "ms": base_ms, "baseline_ms": base_ms, "ratio": 1.0, "added_percent": 0.0, **info}]
    for name, base, t in zip(names, times[::2], times[1::2]):
        ratio = median_ratio(t, base)
        rows.append({"variant": name, "ms": 1e3 * statistics.median(t), "baseline_ms": 1e3 * statistics.median(base),
                     "ratio": ratio, "added_percent": 100.0 * (ratio - 1.0), **info})
    return rows


def bench_resnet50(
    batch: int = 32,
    image_size: int = 448,
    num_classes: int = 200,
    classes_in_batch: int = 8,
    repeats: int = 20,
    warmup: int = 5,
    variants: Sequence[str] | None = None,
    device: str | torch.device = "cuda",
) -> list[dict[str, Any]]:
    """Full ResNet-50 training steps (bf16 autocast, SGD) with each variant vs CE only.

    Returns rows ``variant``, ``ms``, ``ce_ms`` (the ``baseline`` step, timed right before it in
    every repeat), ``added_percent`` (median of per-repeat ratios), ``within_target`` (<= 5 %).
    CUDA only.
    """
    from carrot.model import CarrotModel, create_backbone

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("the ResNet-50 benchmark runs on CUDA only")
    names = [n for n in (list(variants) if variants is not None else list_variants())
             if parse_variant_spec(n)[0] != "baseline"]
    y = pk_labels(batch, classes_in_batch, num_classes, device)
    x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)

    def make_step(spec: str) -> Callable[[], None]:
        name, hparams = parse_variant_spec(spec)
        torch.manual_seed(0)
        variant = create_variant(name, **hparams).to(device).train()
        backbone = create_backbone("resnet50", pretrained=False)
        model = CarrotModel(backbone, variant.build_neck(backbone.num_features), num_classes).to(device).train()
        model = model.to(memory_format=torch.channels_last)
        params = [p for m in (model, variant) for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                result = forward_step(model, variant, x, y, PROGRESS)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            optimizer.step()

        return step

    base = make_step("baseline")
    steps = [make_step(name) for name in names]
    times = interleaved_times([fn for step in steps for fn in (base, step)], device, repeats, warmup)
    rows: list[dict[str, Any]] = []
    for name, ce, t in zip(names, times[::2], times[1::2]):
        added = 100.0 * (median_ratio(t, ce) - 1.0)
        rows.append({"variant": name, "ms": 1e3 * statistics.median(t), "ce_ms": 1e3 * statistics.median(ce),
                     "added_percent": added, "within_target": added <= GPU_TARGET_PERCENT})
    return rows


def sync_routes_check(batch: int, classes_in_batch: int, num_classes: int, dim: int,
                      variants: Sequence[str]) -> list[dict[str, Any]]:
    """The operations that would make the host wait for a GPU in each variant's CUDA route, its
    step run once on the CPU with :func:`carrot.geometry.device_routes` (:mod:`carrot.syncs`):
    the check a CPU can make; ``torch.cuda.set_sync_debug_mode`` (:func:`sync_check`) is the one
    on the GPU."""
    from carrot.geometry import device_routes
    from carrot.syncs import sync_ops

    rows = []
    for spec in variants:
        interrupt.check()
        with device_routes():
            bench = EmbeddingBench(torch.device("cpu"), batch, classes_in_batch, num_classes, dim, [spec])
            bench.steps[0]()  # first-call paths outside the check
            found = sync_ops(bench.steps[0])
        rows.append({"variant": spec, "sync_free": not found, "sync": ", ".join(dict.fromkeys(found))})
    return rows


def sync_check(bench: EmbeddingBench) -> list[dict[str, Any]]:
    """Whether each variant's step (forward and backward) makes the host wait for the GPU:
    run under ``torch.cuda.set_sync_debug_mode("error")``, which raises at the first sync."""
    rows = []
    for spec, step in zip(bench.specs, bench.steps):
        step()  # lazily allocated state and the first-call paths outside the check
        torch.cuda.synchronize(bench.device)
        error = ""
        try:
            torch.cuda.set_sync_debug_mode("error")
            step()
        except RuntimeError as exc:
            error = str(exc).strip().splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize(bench.device)
        rows.append({"variant": spec, "sync_free": not error, "sync": error})
    return rows


# ----------------------------------------------------------------------------- the default study
@contextlib.contextmanager
def temporary_stores():
    """A temporary folder as the working directory, its MLflow store (``MLFLOW_TRACKING_URI``)
    and the study's journal; all put back (and removed) on the way out."""
    import logging

    import mlflow

    saved_cwd, saved_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    quiet = logging.getLogger("mlflow")
    saved_level = quiet.level
    with tempfile.TemporaryDirectory(prefix="carrot-bench-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
        os.chdir(root)  # worker logs and checkpoints go under ./studies of the working directory
        quiet.setLevel(logging.WARNING)  # not the store's creation notes
        try:
            yield root
        finally:
            quiet.setLevel(saved_level)
            os.chdir(saved_cwd)
            if saved_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved_uri
            mlflow.set_tracking_uri(saved_uri or "")


def _timed_study(cfg, trials: int, jobs: int, root: Path, name: str):
    from carrot.study import run_study

    start = time.perf_counter()
    summary = run_study(cfg, trials, storage=str(root / f"{name}.journal"), name=name, log=lambda s: None,
                        checkpoint_root=root / "checkpoints", jobs=jobs)
    return summary, time.perf_counter() - start


def study_epochs(journal: Path, name: str) -> tuple[int, int]:
    """(epochs trained, trials) of a finished study: an epoch is one reported intermediate value."""
    import optuna

    from carrot.study import open_storage

    study = optuna.load_study(study_name=name, storage=open_storage(str(journal)))
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    return sum(len(t.intermediate_values) for t in done), len(done)


def time_shares(study_name: str, experiment: str) -> dict[str, Any]:
    """Shares of the study's trials' wall time (``time/run_s``) spent in MLflow logging
    (``time/logging_s``), in the Optuna trial's reports and pruning decisions (``time/study_s``,
    ``study``), in the per-epoch diagnostics (``time/eval_s``) and in the probes
    (``time/probe_s``), summed over the trials; read from their MLflow runs. ``pictures``
    (``time/pictures_s``) is the part of the logging spent drawing and logging the runs'
    pictures. ``logging_s_per_run`` and ``pictures_s_per_run`` are their seconds per run,
    mostly a fixed cost of a run, whose share shrinks as trials get longer; ``run_s_per_run``
    is a run's own wall time."""
    from carrot import contract
    from carrot.run_report import PICTURES_METRIC
    from carrot.tracking import client

    mlf = client()
    runs = contract.search_runs(mlf, experiment, f"tags.`{contract.TAG_STUDY}` = '{study_name}' and "
                                                 f"tags.`{contract.TAG_ROLE}` = '{contract.ROLE_TRIAL}'")
    totals = {"run_s": 0.0, "logging_s": 0.0, "study_s": 0.0, "eval_s": 0.0, "probe_s": 0.0, "train_s": 0.0,
              "pictures_s": 0.0}
    counted = 0  # runs with a wall time
    for run in runs:
        metrics = run.data.metrics
        if "time/run_s" not in metrics:
            continue
        counted += 1
        totals["run_s"] += metrics["time/run_s"]
        totals["logging_s"] += metrics.get("time/logging_s", 0.0)
        totals["study_s"] += metrics.get("time/study_s", 0.0)
        totals["pictures_s"] += metrics.get(PICTURES_METRIC, 0.0)
        for key, metric in (("eval_s", "time/eval_s"), ("probe_s", "time/probe_s"), ("train_s", "time/train_epoch_s")):
            totals[key] += sum(m.value for m in mlf.get_metric_history(run.info.run_id, metric))
    run_s = totals["run_s"] or float("nan")
    counted = counted or float("nan")
    return {"runs": len(runs), "seconds": totals,
            "run_s_per_run": totals["run_s"] / counted, "logging_s_per_run": totals["logging_s"] / counted,
            "pictures_s_per_run": totals["pictures_s"] / counted,
            "logging": totals["logging_s"] / run_s, "study": totals["study_s"] / run_s,
            "diagnostics": totals["eval_s"] / run_s,
            "probes": totals["probe_s"] / run_s, "pictures": totals["pictures_s"] / run_s,
            "diagnostics_with_probes": (totals["eval_s"] + totals["probe_s"]) / run_s,
            "training": totals["train_s"] / run_s}


def bench_study(trials: int, jobs: int = 2, device: str = "auto", **overrides: Any) -> dict[str, Any]:
    """The default study of ``baseline`` run twice in temporary stores, with one worker and with
    ``jobs`` workers: trials per hour, epochs saved by pruning, shares of the trials' wall time."""
    cfg = default_config("baseline", device=device, **overrides)
    out: dict[str, Any] = {"trials": trials, "epochs": cfg.optim.epochs, "device": device,
                           "overrides": {k: v for k, v in overrides.items()}}
    with temporary_stores() as root:
        summary, seconds = _timed_study(cfg, trials, 1, root, "bench-jobs1")
        trained, finished = study_epochs(root / "bench-jobs1.journal", "bench-jobs1")
        unpruned = finished * cfg.optim.epochs
        out["jobs1"] = {"jobs": 1, "seconds": seconds, "trials_per_hour": 3600.0 * finished / seconds,
                        "complete": summary.n_complete, "pruned": summary.n_pruned, "failed": summary.n_failed}
        out["pruning"] = {"epochs_trained": trained, "epochs_unpruned": unpruned,
                          "saved_fraction": 1.0 - trained / unpruned if unpruned else float("nan")}
        out["shares"] = time_shares("bench-jobs1", cfg.experiment)
        out["jobs"] = None
        if jobs > 1:
            summary, seconds = _timed_study(cfg, trials, jobs, root, f"bench-jobs{jobs}")
            _, finished = study_epochs(root / f"bench-jobs{jobs}.journal", f"bench-jobs{jobs}")
            out["jobs"] = {"jobs": jobs, "seconds": seconds, "trials_per_hour": 3600.0 * finished / seconds,
                           "complete": summary.n_complete, "pruned": summary.n_pruned, "failed": summary.n_failed}
    return out


# ----------------------------------------------------------------------------- report
def format_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` are (key, header, format); None prints as -."""
    cells = [[h for _, h, _ in columns]] + [
        ["-" if r.get(k) is None else (format(r[k], f) if f else str(r[k])) for k, _, f in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none): other work on the machine."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy() -> bool:
    """Other work keeps at least one CPU (or a quarter of them) busy. Then torch's threads,
    which wait for each other at the end of every parallel op, lose a scheduler slice
    whenever one of them is descheduled: a step's time follows its number of ops and the
    load, not its work, so the bench times on one thread."""
    load, cpus = load_average(), os.cpu_count() or 1
    return load is not None and cpus > 1 and load >= max(1.0, 0.25 * cpus)


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_start": load_average()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["processor"] = line.split(":", 1)[1].strip()
                break
    return info


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with its value, its limit and PASS / FAIL (None: not measured here)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, at_most: bool = True) -> None:
        ok = None if value is None else (value <= limit if at_most else value >= limit)
        out.append({"target": name, "value": value, "limit": limit, "at_most": at_most, "passed": ok})

    cpu_rows = (report.get("variants") or {}).get("rows") or []
    for row in cpu_rows:
        name = f"cpu term {row['variant']} <= {CPU_TARGET_RATIO:g}x CE head"
        if row["floor_ratio"] is not None:
            name += f" or {FLOOR_SLACK:g}x its floor"
        add(name, row["ratio"], cpu_limit(row))
    cuda = report.get("cuda") or {}
    for row in cuda.get("resnet50") or [{"variant": v["variant"], "added_percent": None}
                                        for v in cpu_rows if v["variant"] != "baseline"]:
        add(f"cuda resnet50 448px step +{row['variant']} <= {GPU_TARGET_PERCENT:g}%", row["added_percent"],
            GPU_TARGET_PERCENT)
    routes = report.get("sync_routes") or []
    add("cuda routes of every variant without a host-sync op (checked on cpu)",
        float(sum(not r["sync_free"] for r in routes)) if routes else None, 0.0)
    sync = {r["variant"]: r for r in cuda.get("sync") or []}
    barrier = next((s for s in sync if parse_variant_spec(s)[0] == "barrier"), None)
    add("cuda barrier step without a host sync", None if barrier is None else float(not sync[barrier]["sync_free"]),
        0.0)
    study = report.get("study")
    shares = (study or {}).get("shares") or {}
    add(f"MLflow logging <= {100 * LOGGING_TARGET:g}% of trial time", shares.get("logging"), LOGGING_TARGET)
    add(f"diagnostics with probes <= {100 * DIAGNOSTICS_TARGET:g}% of trial time",
        shares.get("diagnostics_with_probes"), DIAGNOSTICS_TARGET)
    pruning = (study or {}).get("pruning") or {}
    add("pruning saves >= 1/3 of the epochs", pruning.get("saved_fraction"), PRUNING_TARGET, at_most=False)
    return out


def _load(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _verdict(passed: bool | None) -> str:
    return "SKIP" if passed is None else ("PASS" if passed else "FAIL")


def _print_variants(title: str, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        row["target"] = _verdict(within_cpu_target(row)) if "ratio" in row else ""
    print(title)
    shown = [{**row, "iqr": "{:.2f}-{:.2f}".format(*row["ratio_iqr"])} for row in rows]
    print(format_table(shown, [("variant", "variant", ""), ("ms", "ms", ".2f"), ("ce_ms", "CE ms", ".2f"),
                               ("ratio", "ratio", ".2f"), ("iqr", "repeats IQR", ""), ("floor_ratio", "floor", ".2f"),
                               ("over_floor", "ratio/floor", ".2f"), ("target", "target", "")]))


def _print_scaling(title: str, section: dict[str, Any]) -> None:
    print(title)
    keys = [f"K={c['num_classes']},D={c['dim']}" for c in section["configs"]]
    print(format_table(section["rows"], [("variant", "variant", ""), *((k, k, ".2f") for k in keys)]))


def _print_memory(title: str, rows: list[dict[str, Any]]) -> None:
    print(title)
    for row in rows:
        row["peak_mib"], row["ce_peak_mib"] = row["peak_bytes"] / 2**20, row["ce_peak_bytes"] / 2**20
    print(format_table(rows, [("variant", "variant", ""), ("peak_mib", "peak MiB", ".2f"),
                              ("ce_peak_mib", "CE MiB", ".2f"), ("ratio", "ratio", ".2f")]))


def _print_sync_routes(rows: list[dict[str, Any]]) -> None:
    print("\noperations that would make the host wait for a GPU in each variant's CUDA route, its step run "
          "on the cpu (carrot.syncs)")
    print(format_table(rows, [("variant", "variant", ""), ("sync_free", "sync-free", ""), ("sync", "sync", "")]),
          flush=True)


def _print_study(study: dict[str, Any]) -> None:
    j1, pr, sh = study["jobs1"], study["pruning"], study["shares"]
    print(f"\ndefault study (baseline, {study['trials']} trials of {study['epochs']} epochs, device "
          f"{study['device']}, temporary stores)")
    rows = [j1] + ([study["jobs"]] if study.get("jobs") else [])
    print(format_table(rows, [("jobs", "JOBS", ""), ("seconds", "seconds", ".1f"),
                              ("trials_per_hour", "trials/hour", ".0f"), ("complete", "complete", ""),
                              ("pruned", "pruned", ""), ("failed", "failed", "")]))
    print(f"pruning: {pr['epochs_trained']} epochs trained of {pr['epochs_unpruned']} unpruned: "
          f"{100 * pr['saved_fraction']:.1f}% saved")
    print(f"shares of trial wall time ({sh['runs']} runs, {sh['seconds']['run_s']:.1f} s): "
          f"training {100 * sh['training']:.1f}%, MLflow logging {100 * sh['logging']:.2f}%, "
          f"Optuna reports and pruning {100 * sh['study']:.2f}%, "
          f"diagnostics {100 * sh['diagnostics']:.1f}%, probes {100 * sh['probes']:.1f}%, "
          f"diagnostics with probes {100 * sh['diagnostics_with_probes']:.1f}%; within the logging, the runs' "
          f"pictures {100 * sh['pictures']:.1f}%")
    print(f"MLflow logging per run: {sh['logging_s_per_run']:.2f} s, of which pictures "
          f"{sh['pictures_s_per_run']:.2f} s (2% of a trial at {sh['logging_s_per_run'] / LOGGING_TARGET:.0f} s "
          f"a trial; this study's took {sh['run_s_per_run']:.1f} s)")


def _device_sections(device: torch.device, args, names: list[str]) -> dict[str, Any]:
    """Variants, scaling and memory at the embedding level on ``device``."""
    main = EmbeddingBench(device, args.batch, args.classes_in_batch, args.num_classes, args.dim, names)
    rows = main.ratios(args.repeats, args.warmup)
    for row in rows:
        row["within_target"] = within_cpu_target(row)
    scaling = {spec: {"variant": spec} for spec in names}
    for k, d in args.scaling:
        if (k, d) == (args.num_classes, args.dim):
            scale_rows = rows
        else:
            bench = EmbeddingBench(device, args.batch, min(args.classes_in_batch, k), k, d, names)
            scale_rows = bench.ratios(args.repeats, args.warmup, floors=False)
        for row in scale_rows:
            scaling[row["variant"]][f"K={k},D={d}"] = row["ratio"]
    out = {"variants": {"device": device.type, "batch": args.batch, "classes_in_batch": args.classes_in_batch,
                        "num_classes": args.num_classes, "dim": args.dim, "threads": torch.get_num_threads(),
                        "repeats": args.repeats, "rows": rows},
           "scaling": {"device": device.type, "configs": [{"num_classes": k, "dim": d} for k, d in args.scaling],
                       "rows": list(scaling.values())},
           "memory": {"device": device.type, "rows": main.memory()}}
    out["bench"] = main
    return out


def _scaling_arg(text: str) -> tuple[tuple[int, int], ...]:
    """``"50x2048,200x512"`` -> ((50, 2048), (200, 512)): (K, D) pairs, K >= 2 and D >= 1."""
    try:
        pairs = tuple((int(k), int(d)) for k, d in (item.split("x") for item in text.split(",") if item))
    except ValueError:
        pairs = ()
    if not pairs or any(k < 2 or d < 1 for k, d in pairs):
        raise argparse.ArgumentTypeError(
            f"expected KxD pairs such as 50x2048,200x512 (K >= 2, D >= 1), got {text!r}")
    return pairs


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, names: list[str]) -> None:
    """Every choice the bench cannot run with, as one argparse error before any timing: the batch
    and its classes, each variant spec, and the folder of ``--json``."""
    if args.device not in ("all", "cpu", "cuda"):
        parser.error(f"--device must be all, cpu or cuda, got {args.device!r}")
    if not args.classes_in_batch <= min(args.batch, args.num_classes):
        parser.error(f"--classes-in-batch must be at most --batch ({args.batch}) and --num-classes "
                     f"({args.num_classes}), got {args.classes_in_batch}")
    for spec in names:
        try:
            name, hparams = parse_variant_spec(spec)
            create_variant(name, **hparams)
        except (ValueError, TypeError) as exc:
            parser.error(f"--variants {spec}: {exc}")
    if args.json and Path(args.json).is_dir():
        parser.error(f"--json {args.json} is a folder; expected the path of a file to write")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: the folder {Path(args.json).resolve().parent} does not exist")
    if args.json and not os.access(Path(args.json).resolve().parent, os.W_OK):
        parser.error(f"--json {args.json}: the folder {Path(args.json).resolve().parent} is not writable")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; expected --device cpu or all")


def _report_json(report: dict[str, Any]) -> dict[str, Any]:
    return {k: report.get(k) for k in SECTIONS}


def _bench_main(argv: Sequence[str] | None = None) -> int:
    parser = contract.ArgumentParser(prog="carrot bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="all",
                        help="all (CPU, and CUDA when present), cpu or cuda (default %(default)s)")
    parser.add_argument("--batch", type=int_argument(2), default=64,
                        help="B, the batch of the variant-term timings (default %(default)s)")
    parser.add_argument("--classes-in-batch", type=int_argument(1), default=16,
                        help="classes in that batch, B / classes samples each (default %(default)s)")
    parser.add_argument("--num-classes", type=int_argument(2), default=200, help="K (default %(default)s)")
    parser.add_argument("--dim", type=int_argument(1), default=2048,
                        help="D, the embedding width (default %(default)s)")
    parser.add_argument("--scaling", type=_scaling_arg, default=SCALING,
                        help="(K, D) pairs of the scaling table (default 50x2048,200x2048,1000x2048,200x512)")
    parser.add_argument("--threads", type=int_argument(0), default=0,
                        help="torch CPU threads here and in the study's workers (default: torch's own, or 1 "
                             "on a busy machine, where threads that wait for each other time the load, not the step)")
    parser.add_argument("--repeats", type=int_argument(1), default=50,
                        help="interleaved repeats per ratio, whose median is shown (default %(default)s)")
    parser.add_argument("--warmup", type=int_argument(0), default=3,
                        help="untimed steps before each timing (default %(default)s)")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="subset of variants (default: all), each optionally name:key=value,...")
    parser.add_argument("--train-step-repeats", type=int_argument(1), default=10,
                        help="repeats of the whole training step per variant (default %(default)s)")
    parser.add_argument("--study-trials", type=int_argument(0), default=8,
                        help="trials of each bench study (more than the pruner's 4 start-up trials; 0 skips the "
                             "study; default %(default)s)")
    parser.add_argument("--study-epochs", type=int_argument(1), default=None,
                        help="epochs per trial (default: the config's)")
    parser.add_argument("--study-jobs", type=int_argument(1), default=2,
                        help="workers of the second study (1: one study only; default %(default)s)")
    parser.add_argument("--limit-per-class", type=int_argument(1), default=None,
                        help="training images per class in the study and the training step (default: all)")
    parser.add_argument("--resnet50", action="store_true",
                        help="accepted and changes nothing: every run on CUDA times the ResNet-50 step (default: off)")
    parser.add_argument("--resnet-batch", type=int_argument(2), default=32,
                        help="batch of the ResNet-50 step (CUDA; default %(default)s)")
    parser.add_argument("--image-size", type=int_argument(32), default=448,
                        help="ResNet-50 step image size (CUDA; default %(default)s)")
    parser.add_argument("--sync-debug", action="store_true",
                        help="only check which variant steps synchronise with the host (on CUDA; without CUDA, "
                             "the CPU's check of the CUDA routes; default: off)")
    parser.add_argument("--json", metavar="FILE", help="write every section to FILE (default: none)")
    args = parser.parse_args(argv)
    names = list(args.variants) if args.variants is not None else list_variants()
    _check_args(parser, args, names)
    started = time.perf_counter()
    threads = args.threads or (1 if busy() else 0)
    if threads > 0:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the study's worker processes

    cuda = torch.cuda.is_available()
    if args.sync_debug:
        if not cuda:
            rows = sync_routes_check(args.batch, args.classes_in_batch, args.num_classes, args.dim, names)
            _print_sync_routes(rows)
            print("no CUDA device here: torch.cuda.set_sync_debug_mode, the check on the GPU itself, needs CUDA")
            return 0 if all(r["sync_free"] for r in rows) else 1
        bench = EmbeddingBench(torch.device("cuda"), args.batch, args.classes_in_batch, args.num_classes, args.dim,
                               names)
        sync = sync_check(bench)
        print("host syncs in each variant's step on CUDA (torch.cuda.set_sync_debug_mode('error'))")
        print(format_table(sync, [("variant", "variant", ""), ("sync_free", "sync-free", ""), ("sync", "sync", "")]))
        return 0 if all(r["sync_free"] for r in sync) else 1

    report: dict[str, Any] = {"machine": machine()}
    print(f"carrot bench on {report['machine']['processor']} ({report['machine']['cpus']} CPUs, "
          f"{report['machine']['torch_threads']} torch threads, load average {_load(report['machine']['load_average_start'])}"
          + (", busy: one thread unless --threads" if threads and not args.threads else "")
          + f"), torch {torch.__version__}" + (f", {report['machine']['cuda']}" if cuda else ", no CUDA device"),
          flush=True)
    overrides = {} if args.limit_per_class is None else {"data.limit_per_class": args.limit_per_class}
    scale = f"B={args.batch} ({args.classes_in_batch} classes), D={args.dim}, K={args.num_classes}"

    if args.device in ("all", "cpu"):
        cpu = _device_sections(torch.device("cpu"), args, names)
        cpu.pop("bench")
        report.update(cpu)
        _print_variants(f"\nvariant step vs CE head, cpu, {scale}, median of {args.repeats} interleaved ratios",
                        cpu["variants"]["rows"])
        _print_scaling("\nthe same ratio at other K and D, cpu", cpu["scaling"])
        _print_memory("\npeak memory of the step over the CE step's, cpu", cpu["memory"]["rows"])
        report["train_step"] = {"device": "cpu", "rows": bench_train_step(
            torch.device("cpu"), names, args.train_step_repeats, 2, **overrides)}
        first = report["train_step"]["rows"][0]
        print(f"\nwhole training step of the default study's model ({first['backbone']}, {first['image_size']} px, "
              f"batch {first['batch']}, {first['num_classes']} classes) with the variant over baseline's, cpu")
        print(format_table(report["train_step"]["rows"], [("variant", "variant", ""), ("ms", "ms", ".1f"),
                                                          ("ratio", "ratio", ".2f"),
                                                          ("added_percent", "added %", "+.1f")]), flush=True)
        report["sync_routes"] = sync_routes_check(args.batch, args.classes_in_batch, args.num_classes, args.dim, names)
        _print_sync_routes(report["sync_routes"])

    if args.device in ("all", "cuda") and cuda:
        gpu = _device_sections(torch.device("cuda"), args, names)
        bench = gpu.pop("bench")
        gpu["resnet50"] = bench_resnet50(args.resnet_batch, args.image_size, args.num_classes, variants=names,
                                         repeats=args.repeats)
        gpu["sync"] = sync_check(bench)
        gpu["train_step"] = bench_train_step(torch.device("cuda"), names, args.train_step_repeats, 2, **overrides)
        report["cuda"] = gpu
        _print_variants(f"\nvariant step vs CE head, cuda, {scale}", gpu["variants"]["rows"])
        _print_scaling("\nthe same ratio at other K and D, cuda", gpu["scaling"])
        _print_memory("\npeak memory of the step over the CE step's, cuda (max_memory_allocated)",
                      gpu["memory"]["rows"])
        print(f"\nResNet-50 training step, batch {args.resnet_batch} at {args.image_size} px, bf16, "
              f"CE only {gpu['resnet50'][0]['ce_ms']:.1f} ms" if gpu["resnet50"] else "")
        print(format_table(gpu["resnet50"], [("variant", "variant", ""), ("ms", "ms", ".1f"),
                                             ("added_percent", "added %", "+.1f")]))
        print("\nhost syncs in each variant's step (torch.cuda.set_sync_debug_mode('error'))")
        print(format_table(gpu["sync"], [("variant", "variant", ""), ("sync_free", "sync-free", ""),
                                         ("sync", "sync", "")]))
    elif args.device == "all":
        report["cuda"] = None
        print("\nno CUDA device: the CUDA sections (variants on CUDA, ResNet-50 448 px step, host syncs) skipped")

    if args.study_trials > 0:
        epochs = {} if args.study_epochs is None else {"optim.epochs": args.study_epochs}
        print(flush=True)
        report["study"] = bench_study(args.study_trials, args.study_jobs,
                                      "cpu" if args.device == "cpu" else "auto", **epochs, **overrides)
        _print_study(report["study"])
    else:
        report["study"] = None

    report["targets"] = targets(report)
    print("\ntargets")
    for t in report["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        print(f"  {_verdict(t['passed']):4s}  {t['target']}  ({value}; limit {t['limit']:.3g})")
    report["machine"]["bench_seconds"] = time.perf_counter() - started
    report["machine"]["load_average_end"] = load_average()
    print(f"\nbench took {report['machine']['bench_seconds']:.0f} s (load average at the end "
          f"{_load(report['machine']['load_average_end'])})")
    if args.json:  # whole or not at all: written aside, then renamed over FILE
        target = Path(args.json)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            partial.write_text(json.dumps(_report_json(report), indent=1, default=float) + "\n")
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
        print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``carrot bench``: the torch thread count and ``OMP_NUM_THREADS`` it may change for its
    timings are restored afterwards, so a caller in the same process computes as before."""
    import os

    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        return _bench_main(argv)
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


if __name__ == "__main__":
    from carrot.malloc import keep_freed_blocks

    keep_freed_blocks()  # as every `carrot` command, so the steps are timed as they train
    raise SystemExit(main())
