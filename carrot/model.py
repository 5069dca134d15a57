"""A timm backbone, the variant's neck and a linear head, with feature taps.

One forward pass yields the pooled embedding the head sees, the logits, and (when asked)
the pooled features of the probed intermediate layers: CNN stages are global-average
pooled, transformer blocks give their class token (or the token mean without one).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import timm
from torch import Tensor, nn

from carrot.data import ImageSpec


class ModelError(ValueError):
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
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.ndim == 4:
        if channels is not None and output.shape[1] != channels and output.shape[-1] == channels:
            return output.float().mean(dim=(1, 2))  # (B, H, W, C) stages (Swin, ConvNeXt-V2 NHWC) -> (B, C)
        return output.float().mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
    if output.ndim == 3:  # (B, N, D) tokens -> class token, else mean token
        return (output[:, 0] if has_class_token else output.mean(dim=1)).float()
    return output.float().flatten(1)


class CarrotModel(nn.Module):
    def __init__(self, backbone: nn.Module, neck: nn.Module, num_classes: int,
                 probe_layers: list[str] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.probe_layers = list(probe_layers if probe_layers is not None else default_probe_layers(backbone))
        modules = dict(backbone.named_modules())
        missing = [name for name in self.probe_layers if name not in modules]
        if missing:
            raise ModelError(
                f"probe layer(s) {missing} not in backbone; valid stage names: "
                f"{[e['module'] for e in getattr(backbone, 'feature_info', [])]}"
            )
        self._has_class_token = getattr(backbone, "cls_token", None) is not None
        self._channels = {e["module"]: e.get("num_chs") for e in getattr(backbone, "feature_info", [])}
        self._captured: dict[str, Tensor] = {}
        self._capture = False
        for name in self.probe_layers:
            modules[name].register_forward_hook(self._make_hook(name))

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            if self._capture:
                self._captured[name] = _pool(output, self._has_class_token, self._channels.get(name))

        return hook

    def forward(self, x: Tensor, with_features: bool = False) -> ModelOutput:
        self._capture = with_features
        self._captured = {}
        try:
            pooled = self.backbone(x)  # (B, D): timm with num_classes=0 returns pre-logits
        finally:
            self._capture = False
        embedding = self.neck(pooled)
        logits = self.head(embedding)
        features = {name: self._captured[name] for name in self.probe_layers if name in self._captured}
        self._captured = {}
        return ModelOutput(embedding=embedding, logits=logits, features=features)


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
        return timm.create_model(name, **kwargs)
    except Exception as exc:  # timm raises many kinds: hub errors, missing keys
        raise ModelError(f"cannot create backbone {name!r}: {exc}") from exc


def image_spec(backbone: nn.Module) -> ImageSpec:
    cfg = timm.data.resolve_data_config({}, model=backbone)
    return ImageSpec(
        input_size=int(cfg["input_size"][-1]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bilinear")),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
    )
