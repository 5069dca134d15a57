"""A timm backbone, the variant's neck and a linear head, with feature taps.

One forward pass yields the pooled embedding the head sees, the logits, and (when asked)
the pooled features of the probed intermediate layers: CNN stages are global-average
pooled, transformer blocks give their class token (or the token mean without one).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from carrot.config import UserError
from carrot.contract import first_line
from carrot.data import ImageSpec


class ModelError(UserError, ValueError):
    """The backbone or its weights cannot be built as asked."""


@dataclass
class ModelOutput:
    embedding: Tensor  # (B, D) after the neck: what the head sees
    logits: Tensor  # (B, K)
    features: dict[str, Tensor] = field(default_factory=dict)  # layer -> (B, D_l) float32


def default_probe_layers(backbone: nn.Module, count: int = 4) -> list[str]:
    """The last block of each of the last ``count`` stages (timm's ``feature_info``)."""
    info = getattr(backbone, "feature_info", None)
    if not info:
        return []
    modules = [entry["module"] for entry in info]
    return modules[-count:]


def _pool(output: Tensor | tuple, has_class_token: bool, channels: int | None = None) -> Tensor:
    """A probed layer's output as (B, D_l) float32: (B, C, H, W) maps are average-pooled,
    (B, N, D) tokens give their class token (else the token mean). A hook's output may be
    (B, H, W, C) (Swin, ConvNeXt-V2): ``channels``, the stage's width, tells them apart."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.ndim == 4:
        if channels is not None and output.shape[1] != channels and output.shape[-1] == channels:
            return output.float().mean(dim=(1, 2))  # (B, H, W, C) -> (B, C)
        return output.float().mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
    if output.ndim == 3:  # (B, N, D) tokens -> class token, else mean token
        return (output[:, 0] if has_class_token else output.mean(dim=1)).float()
    return output.float().flatten(1)


class CarrotModel(nn.Module):
    """Backbone -> neck -> head. The probed layers come from timm's ``forward_intermediates``
    (one pass; NCHW maps whatever the backbone's own layout) when the backbone has it and every
    probed layer is one of its feature stages; otherwise from forward hooks."""

    def __init__(self, backbone: nn.Module, neck: nn.Module, num_classes: int,
                 probe_layers: list[str] | None = None, taps: str = "auto") -> None:
        super().__init__()
        assert taps in ("auto", "hooks"), f"taps must be auto or hooks, got {taps!r}"
        self.backbone = backbone
        self.neck = neck
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.probe_layers = list(probe_layers if probe_layers is not None else default_probe_layers(backbone))
        modules = dict(backbone.named_modules())
        stages = [e["module"] for e in getattr(backbone, "feature_info", [])]
        missing = [name for name in self.probe_layers if name not in modules]
        if missing:
            raise ModelError(f"probe layer(s) {missing} not in backbone; valid stage names: {stages}")
        self._has_class_token = getattr(backbone, "cls_token", None) is not None
        self._tokens = getattr(backbone, "num_prefix_tokens", None) is not None  # ViT-style token output
        self._stage_index: dict[str, int] | None = None
        if taps == "auto" and hasattr(backbone, "forward_intermediates") and \
                all(n in stages for n in self.probe_layers):
            self._stage_index = {name: stages.index(name) for name in self.probe_layers}
        self._captured: dict[str, Tensor] = {}
        self._capture = False
        self._channels = {e["module"]: e.get("num_chs") for e in getattr(backbone, "feature_info", [])}
        if self._stage_index is None:
            for name in self.probe_layers:
                modules[name].register_forward_hook(self._make_hook(name))

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            if self._capture:
                self._captured[name] = _pool(output, self._has_class_token, self._channels.get(name))

        return hook

    def _intermediate_features(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(pooled embedding (B, D), layer -> (B, D_l)) from one ``forward_intermediates`` pass."""
        order = sorted(self._stage_index, key=self._stage_index.get)  # timm returns them by index
        kwargs = {"indices": [self._stage_index[n] for n in order]}
        if self._tokens:
            kwargs.update(output_fmt="NLC", return_prefix_tokens=True)
        final, inter = self.backbone.forward_intermediates(x, **kwargs)
        features = {}
        for name, out in zip(order, inter):
            if self._tokens:  # (spatial (B, L, D), prefix (B, P, D))
                spatial, prefix = out
                out = prefix[:, 0] if self._has_class_token else torch.cat([prefix, spatial], dim=1).mean(dim=1)
            features[name] = _pool(out, self._has_class_token)
        return self.backbone.forward_head(final, pre_logits=True), features

    def forward(self, x: Tensor, with_features: bool = False) -> ModelOutput:
        x = x.to(self.head.weight.dtype)  # a no-op but for a float64 model (numerics checks) on float32 images
        if with_features and self._stage_index is not None and self.probe_layers:
            pooled, captured = self._intermediate_features(x)
        else:
            self._capture = with_features
            self._captured = {}
            try:
                pooled = self.backbone(x)  # (B, D): timm with num_classes=0 returns pre-logits
            finally:
                self._capture = False
            captured, self._captured = self._captured, {}
        embedding = self.neck(pooled)
        logits = self.head(embedding)
        features = {name: captured[name] for name in self.probe_layers if name in captured}
        return ModelOutput(embedding=embedding, logits=logits, features=features)


WEIGHT_CHECK_SEED = 0x5EED  # the seeds of the check that a weights file holds the backbone's weights
_WEIGHTS_CHECKED: set[tuple] = set()  # (model, file, size, mtime, arguments) checked in this process


def create_backbone(name: str, pretrained: bool = False, pretrained_path: str | None = None,
                    drop_rate: float = 0.0, extra: dict | None = None) -> nn.Module:
    if not timm.is_model(name):
        raise ModelError(f"unknown backbone {name!r}; expected a timm model name (see timm.list_models())")
    kwargs = {**(extra or {}), "num_classes": 0, "drop_rate": drop_rate}
    if pretrained_path:
        path = Path(pretrained_path)
        if not path.is_file():
            raise ModelError(f"pretrained weights file not found: {path} (expected a state-dict file)")
        kwargs["pretrained"] = True
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    else:
        kwargs["pretrained"] = pretrained
    try:
        if not pretrained_path:
            return timm.create_model(name, **kwargs)
        # timm loads a local file without a classifier leniently: keys it does not know are
        # dropped with a warning, so a file of another model would leave every weight random.
        # Loaded twice from two seeds: a tensor that differs between the two was not loaded; one
        # that loading did not change from the initialisation may not have been.
        def built(seed: int, **options) -> nn.Module:
            torch.manual_seed(seed)
            return timm.create_model(name, **options)

        stat = path.stat()
        checked = (name, str(path.resolve()), stat.st_size, stat.st_mtime_ns, repr(sorted(kwargs.items())))
        unloaded = {**{k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}, "pretrained": False}
        with torch.random.fork_rng(devices=[]):
            model = built(WEIGHT_CHECK_SEED, **kwargs)
            if checked in _WEIGHTS_CHECKED:  # this process checked the same file for the same model
                return model
            other, blank = built(WEIGHT_CHECK_SEED + 1, **kwargs), built(WEIGHT_CHECK_SEED, **unloaded)
    except Exception as exc:  # timm raises many kinds: hub errors, missing keys, unpickling errors
        if pretrained_path:
            raise ModelError(f"cannot load the pretrained weights {pretrained_path} into backbone {name!r}: "
                             f"{first_line(exc)}; expected a state-dict file of that model") from exc
        raise ModelError(f"cannot create backbone {name!r}: {exc}") from exc
    if all(torch.equal(a, b) for a, b in zip(model.parameters(), blank.parameters())):
        raise ModelError(f"none of the weights of backbone {name!r} are in {pretrained_path}: every one kept its "
                         "initialisation; expected a state-dict file of that model")
    random = [k for (k, a), b in zip(model.named_parameters(), other.parameters()) if not torch.equal(a, b)]
    if random:
        print(f"note: {len(random)} of {sum(1 for _ in model.parameters())} weight tensors of backbone {name!r} "
              f"are not in {pretrained_path} and keep their random initialisation (first: {random[0]})",
              file=sys.stderr)
    _WEIGHTS_CHECKED.add(checked)
    return model


def image_spec(backbone: nn.Module) -> ImageSpec:
    cfg = timm.data.resolve_data_config({}, model=backbone)
    return ImageSpec(
        input_size=int(cfg["input_size"][-1]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bilinear")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
    )
