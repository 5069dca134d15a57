"""One typed, validated configuration for a run.

The CLI, the study and the Makefile all build a :class:`RunConfig`; the resolved config is
logged with every run. Unknown keys and wrong types are errors that name the key.

>>> cfg = RunConfig.from_dict({"variant": {"name": "baseline"}, "optim": {"epochs": 3}})
>>> cfg.optim.epochs, cfg.data.name
(3, 'digits')
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

DEVICES = ("auto", "cpu", "cuda")
SPLITS = ("val", "test")
OPTIMIZERS = ("adamw", "sgd")


class ConfigError(ValueError):
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

    def validate(self) -> None:
        _check(self.optimizer in OPTIMIZERS, "optim.optimizer", self.optimizer, f"one of {OPTIMIZERS}")
        _check(self.lr > 0, "optim.lr", self.lr, "> 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _check(self.epochs >= 1, "epochs", self.epochs, "a positive integer")
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs, ">= 0")
        _check(0 <= self.label_smoothing < 1, "optim.label_smoothing", self.label_smoothing, "in [0, 1)")


@dataclass
class EvalConfig:
    top_n: int = 20  # confusable pairs kept per run
    probe_every: int = 0  # linear probes every n epochs; 0: only after the last epoch
    probe_l2_grid: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    probe_max_train: int = 4000  # training samples used to fit a probe (subsampled, stratified)

    def validate(self) -> None:
        _check(self.top_n >= 1, "eval.top_n", self.top_n, ">= 1")
        _check(self.probe_every >= 0, "eval.probe_every", self.probe_every, ">= 0")
        _check(len(self.probe_l2_grid) >= 1 and all(v > 0 for v in self.probe_l2_grid),
               "eval.probe_l2_grid", self.probe_l2_grid, "a non-empty list of positive numbers")


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
    amp: bool = True  # bfloat16 autocast on CUDA (ignored on CPU)
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
        from carrot.data import list_datasets
        from carrot.variants import get_variant_class, list_variants

        _check(self.device in DEVICES, "device", self.device, f"one of {DEVICES}")
        _check(self.seed >= 0, "seed", self.seed, "a non-negative integer")
        _check(self.split in SPLITS, "split", self.split, f"one of {SPLITS}")
        if self.variant.name not in list_variants():
            raise ConfigError(f"unknown variant {self.variant.name!r}; valid: {', '.join(list_variants())} "
                              "(or all, for a study)")
        if self.data.name not in list_datasets():
            raise ConfigError(f"unknown dataset {self.data.name!r}; valid: {', '.join(list_datasets())}")
        for section in (self.data, self.optim, self.eval):
            section.validate()
        try:  # hyperparameters are validated by the variant itself
            get_variant_class(self.variant.name)(**self.variant.hparams)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"variant {self.variant.name!r}: {exc}") from None
        import timm

        if not timm.is_model(self.model.backbone):
            close = timm.list_models(f"*{self.model.backbone.split('_')[0]}*")[:8]
            raise ConfigError(
                f"unknown backbone {self.model.backbone!r}; expected a timm model name"
                + (f" (similar: {', '.join(close)})" if close else " (see timm.list_models())")
            )

    def identity_hash(self) -> str:
        """Hash of everything that defines the experiment (not the seed, the device, the
        number of loader workers or the display): equal hashes mean comparable runs."""
        import hashlib
        import json

        data = self.to_dict()
        for key in ("seed", "device", "show_progress", "experiment"):
            data.pop(key)
        data["data"].pop("workers")
        data["variant"]["hparams"] = self.resolved_hparams()
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def resolved_hparams(self) -> dict[str, Any]:
        from carrot.variants import get_variant_class

        variant_cls = get_variant_class(self.variant.name)
        return {**variant_cls.recommended(), **self.variant.hparams}


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
        raise ConfigError(f"config section {path or '<root>'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[path + k for k in unknown]}; valid: {sorted(names)}")
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
            return float(value)
        raise ConfigError(f"invalid {key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"invalid {key}={value!r}: expected a string")
    return value
