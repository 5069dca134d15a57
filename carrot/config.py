"""One typed, validated configuration for a run.

The CLI, the study and the Makefile all build a :class:`RunConfig`; the resolved config is
logged with every run. Unknown keys and wrong types are errors that name the key.

>>> cfg = RunConfig.from_dict({"variant": {"name": "baseline"}, "optim": {"epochs": 3}})
>>> cfg.optim.epochs, cfg.data.name
(3, 'digits')
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from carrot import contract

DEVICES = ("auto", "cpu", "cuda")
SPLITS = ("val", "test")
SAMPLERS = ("auto", "pk", "random")
# keys a study searches (besides the variant's hyperparameters): they vary between its trials
SEARCHED_KEYS = contract.SEARCHED_CONFIG_KEYS
# keys that do not change what is computed: the seed is a run's, the rest is display and plumbing
NON_IDENTITY_KEYS = ("seed", "device", "show_progress", "experiment", "data.workers", "eval.probe", "eval.images")
PROBE_MODES = ("final", "last", "always")
OPTIMIZERS = ("adamw", "sgd")


int_argument = contract.int_argument  # an argparse type: an integer, at least ``low`` where given


def parse_value(text: str) -> Any:
    """A value typed on the command line (``--set``, a bench spec) as YAML, with YAML 1.2
    numbers (PyYAML reads ``1e-3`` as a string): ``true`` and ``True`` are booleans."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the value {text!r} is not valid YAML ({getattr(exc, 'problem', None) or exc}); expected "
                          "a number, true/false, a word, or a quoted string") from None
    quoted = text.strip().startswith(("'", '"'))  # a quoted value stays a string
    if isinstance(value, str) and not quoted and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value.strip()):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):  # .inf, .nan, 1e400: no setting takes one
        why = f"is out of range (it reads as {value})" if re.search(r"\d", text) else f"reads as {value}"
        raise ConfigError(f"the value {text!r} {why}; expected a finite number")
    return value


class UserError(Exception):
    """Bad input a command reports in one line (exit status 2): a configuration, a dataset, a
    backbone or a store that cannot be used as given."""


class ConfigError(UserError, ValueError):
    """A configuration value is wrong; the message names the key and what is valid."""


@dataclass
class DataConfig:
    name: str = "digits"  # a name from carrot.data.list_datasets()
    root: str | None = None  # dataset folder on disk (real datasets)
    image_size: int | None = None  # None: the dataset's default (digits 32 px; real: backbone's)
    resize_size: int | None = None  # None: image_size / 0.875 (real datasets; FGVC 448 from 512)
    val_fraction: float = 0.15  # of the training split, stratified, when no official val split
    test_fraction: float = 0.2  # datasets without an official test split (digits, synthetic)
    split_seed: int = 0  # fixes the train/val/test partition independently of the run seed
    batch_size: int = 64
    workers: int = 0  # DataLoader worker processes
    augment: str = "basic"  # none | basic (random crop + flip) | randaugment (real datasets)
    cache: bool = False  # keep decoded images in memory (small real datasets)
    limit_per_class: int | None = None  # cap training images per class (smoke runs)
    sampler: str = "auto"  # pk: P classes x m_per_class per batch; random: shuffled; auto: the variant's preference
    m_per_class: int = 4  # samples per class in a pk batch
    level: str = "variant"  # aircraft label level: variant | family | manufacturer
    # synthetic dataset: groups of sibling classes that differ only in a small detail
    synthetic_groups: int = 5
    synthetic_siblings: int = 2
    synthetic_per_class: int = 80
    synthetic_detail: float = 0.6  # amplitude of the sibling detail relative to the noise

    @property
    def dataset_id(self) -> str:
        """The dataset as tagged and named in studies: ``aircraft`` at another label level is
        ``aircraft_family`` / ``aircraft_manufacturer`` (the registered names of those levels)."""
        if self.name == "aircraft" and self.level != "variant":
            return f"aircraft_{self.level}"
        return self.name

    def validate(self) -> None:
        _check(0.0 < self.val_fraction < 0.9, "data.val_fraction", self.val_fraction, "in (0, 0.9)")
        _check(0.0 < self.test_fraction < 0.9, "data.test_fraction", self.test_fraction, "in (0, 0.9)")
        _check(self.batch_size >= 2, "data.batch_size", self.batch_size, ">= 2")
        _check(self.workers >= 0, "data.workers", self.workers, ">= 0")
        _check(self.image_size is None or self.image_size >= 8, "data.image_size", self.image_size, ">= 8")
        _check(self.augment in ("none", "basic", "randaugment"), "data.augment", self.augment,
               "one of none, basic, randaugment")
        _check(self.level in ("variant", "family", "manufacturer"), "data.level", self.level,
               "one of variant, family, manufacturer")
        _check(self.sampler in SAMPLERS, "data.sampler", self.sampler, f"one of {', '.join(SAMPLERS)}")
        _check(self.m_per_class >= 2, "data.m_per_class", self.m_per_class, ">= 2")
        _check(self.synthetic_groups >= 1 and self.synthetic_siblings >= 2, "data.synthetic_groups/siblings",
               (self.synthetic_groups, self.synthetic_siblings), "groups >= 1 and siblings >= 2")


@dataclass
class ModelConfig:
    backbone: str = "test_resnet"  # any timm model name
    pretrained: bool = False  # timm hub weights (needs internet)
    pretrained_path: str | None = None  # local weights file (state dict), head re-initialised
    probe_layers: list[str] | None = None  # None: the last block of each of the last 4 stages
    drop_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (img_size: 448)
    channels_last: bool = True  # NHWC memory layout for CNNs on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the backbone (CUDA; the first steps compile)

    def validate(self) -> None:
        _check(0 <= self.drop_rate < 1, "model.drop_rate", self.drop_rate, "in [0, 1)")


@dataclass
class OptimConfig:
    optimizer: str = "adamw"
    lr: float = 3e-3  # peak learning rate after warm-up
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    epochs: int = 12
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to 0
    label_smoothing: float = 0.0
    grad_clip: float | None = 5.0  # max global grad norm; None disables
    accumulate: int = 1  # micro-batches per optimiser step (gradient accumulation)

    def validate(self) -> None:
        _check(self.optimizer in OPTIMIZERS, "optim.optimizer", self.optimizer, f"one of {OPTIMIZERS}")
        _check(self.lr > 0, "optim.lr", self.lr, "> 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _check(self.epochs >= 1, "epochs", self.epochs, "a positive integer")
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs, ">= 0")
        _check(0 <= self.label_smoothing < 1, "optim.label_smoothing", self.label_smoothing, "in [0, 1)")
        _check(self.accumulate >= 1, "optim.accumulate", self.accumulate, "a positive integer")
        _check(0 <= self.momentum < 1, "optim.momentum", self.momentum, "in [0, 1)")
        _check(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", self.grad_clip,
               "> 0 (the largest global gradient norm), or null for no clipping")


@dataclass
class EvalConfig:
    top_n: int = 20  # confusable pairs kept per run
    # when the linear probes run: last (after the last epoch of every run that reaches it; a
    # pruned trial has none), final (after the last epoch of final runs only; search trials and
    # `carrot train` runs skip them: the paper configs, where a probe costs more than an epoch),
    # always (every epoch), every:N (every N epochs and after the last)
    probe: str = "last"
    images: bool = True  # confusion, top-pair and trajectory pictures in each run's artifacts
    probe_l2_grid: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    probe_max_train: int = 4000  # training samples used to fit a probe (subsampled, stratified)

    def validate(self) -> None:
        _check(self.top_n >= 1, "eval.top_n", self.top_n, ">= 1")
        _check(self.probe in PROBE_MODES or bool(re.fullmatch(r"every:[1-9][0-9]*", str(self.probe))),
               "eval.probe", self.probe, "one of final, last, always, every:N (N a positive integer)")
        _check(isinstance(self.probe_l2_grid, list) and len(self.probe_l2_grid) >= 1
               and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in self.probe_l2_grid),
               "eval.probe_l2_grid", self.probe_l2_grid, "a non-empty list of positive numbers")
        _check(self.probe_max_train >= 2, "eval.probe_max_train", self.probe_max_train, ">= 2")

    def probes_at(self, epoch: int, epochs: int, split: str) -> bool:
        """Whether the probes run after ``epoch`` (0-based) of a run of ``epochs`` epochs on ``split``."""
        last = epoch == epochs - 1
        if self.probe == "final":
            return last and split == "test"
        if self.probe == "last":
            return last
        if self.probe == "always":
            return True
        return last or (epoch + 1) % int(self.probe.split(":")[1]) == 0


@dataclass
class VariantConfig:
    name: str = "baseline"
    hparams: dict[str, Any] = field(default_factory=dict)  # missing keys take the recommended value


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    variant: VariantConfig = field(default_factory=VariantConfig)
    seed: int = 0
    device: str = "auto"  # auto: CUDA when present, else CPU
    amp: bool = True  # autocast on CUDA (ignored on CPU)
    amp_dtype: str = "bfloat16"  # bfloat16, or float16 (with a gradient scaler)
    split: str = "val"  # val: train on train, evaluate on val; test: train on train+val, test
    experiment: str = "carrot"  # MLflow experiment name
    show_progress: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        cfg = _build(cls, data, "")
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Types and ranges only (no heavy import); names of variants, datasets and backbones
        are checked by :func:`carrot.checks.check_names`."""
        _check(self.device in DEVICES, "device", self.device, f"one of {DEVICES}")
        _check(0 <= self.seed < 2**32, "seed", self.seed, "an integer from 0 to 2**32 - 1 (numpy's range)")
        _check(self.split in SPLITS, "split", self.split, f"one of {SPLITS}")
        _check(self.amp_dtype in ("bfloat16", "float16"), "amp_dtype", self.amp_dtype, "bfloat16 or float16")
        for section in (self.data, self.model, self.optim, self.eval):
            section.validate()

    def resolved(self) -> "RunConfig":
        """A copy with every "use the default" filled in: the variant's recommended
        hyperparameters under the given ones, and its preferred sampler for ``auto``."""
        from carrot.variants import get_variant_class

        variant_cls = get_variant_class(self.variant.name)
        cfg = copy.deepcopy(self)
        cfg.variant.hparams = {**variant_cls.recommended(), **self.variant.hparams}
        if cfg.data.sampler == "auto":
            cfg.data.sampler = variant_cls.default_sampler
        return cfg

    def resolved_hparams(self) -> dict[str, Any]:
        return self.resolved().variant.hparams

    def experiment_dict(self, searched: bool = True) -> dict[str, Any]:
        """What defines one experiment: the resolved configuration without the seed, the
        device, the loader workers and the display. ``searched=False`` also drops what a
        study searches (its trials differ there), leaving what must not change when a study
        is continued."""
        data = self.resolved().to_dict()
        drop = NON_IDENTITY_KEYS + (() if searched else SEARCHED_KEYS + ("variant.hparams",))
        for key in drop:
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node.pop(leaf)
        return json.loads(json.dumps(data, sort_keys=True, default=str))

    def identity_hash(self) -> str:
        """Equal hashes mean runs of the same experiment (they may differ in seed)."""
        return hashlib.sha256(json.dumps(self.experiment_dict(), sort_keys=True).encode()).hexdigest()[:12]


def set_dotted(data: dict, key: str, value: Any) -> None:
    """``set_dotted(d, "variant.hparams.lam", 0.5)`` sets d["variant"]["hparams"]["lam"]."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"invalid override {key}: {part} is not a section")
    node[parts[-1]] = value


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {key}={value!r}: expected {expected}")


def _build(cls: type, data: dict[str, Any], path: str) -> Any:
    if not isinstance(data, dict):
        section = path.rstrip(".") or "<root>"
        raise ConfigError(f"config section {section} must be a mapping of its keys (`carrot config --show` lists "
                          f"them), got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        import difflib

        hints_text = "".join(f" (did you mean {path + close[0]!r}?)" for k in unknown
                             for close in [difflib.get_close_matches(k, sorted(names), n=1, cutoff=0.6)] if close)
        raise ConfigError(f"unknown config key(s) {[path + k for k in unknown]}{hints_text}; "
                          f"valid: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, path + name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"invalid {key}={value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"invalid {key}={value!r}: expected a list")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"invalid {key}={value!r}: expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"invalid {key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"invalid {key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"invalid {key}={value!r}: expected a finite number")
            return float(value)
        raise ConfigError(f"invalid {key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        quote = (f" (a number or true/false reads as one: quote it, --set {key}='\"{value}\"')"
                 if isinstance(value, (int, float, bool)) else "")
        raise ConfigError(f"invalid {key}={value!r}: expected a string{quote}")
    return value
