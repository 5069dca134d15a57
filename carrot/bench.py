"""How much each variant's term costs, as ratios (``make bench`` / ``carrot bench``).

Embedding level (always): at the fine-grained scale (B = 64 as 16 classes x 4, D = 2048,
K = 200) one *step* of a variant is

    leaf embedding z -> variant neck -> nn.Linear head -> variant forward (CE + its terms)
    [+ 3 pooled intermediate features for variants that use them] -> backward,

timed against the CE head alone (z -> Linear -> CE -> backward). ``ratio`` = step time / CE
time, so ``baseline`` is ~1 and the CPU target is ratio <= 3.

ResNet-50 (``--resnet50``, CUDA only): a full training step (timm resnet50 from scratch,
bf16 autocast, SGD) with each variant against the same step with CE only; the target is
< 5 % added time.

Timings are medians over ``repeats`` calls after ``warmup`` calls (stateful variants fill
their state during the warm-up), with CUDA synchronised around every call. At the
embedding level the CE head is timed right before and right after each variant (each in a
warm block; alternating calls would let the variant's larger working set evict the head's
and flatter the ratio). The ResNet-50 steps alternate: there every step is cache-cold anyway.

>>> rows = bench_variants(batch=8, classes_in_batch=4, num_classes=10, dim=16, repeats=1, warmup=1)
>>> rows[0]["variant"], rows[0]["ratio"] > 0
('baseline', True)
"""
from __future__ import annotations

import argparse
import ast
import statistics
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carrot.model import ModelOutput
from carrot.runtime import resolve_device
from carrot.train import forward_step
from carrot.variants import create_variant, list_variants

CPU_TARGET_RATIO = 3.0
GPU_TARGET_PERCENT = 5.0
FEATURE_DIMS = {"layer2": 512, "layer3": 1024, "layer4": 2048}  # resnet50's last three stages
PROGRESS = 1000.0  # epochs elapsed: past every warm-up, so every term is active


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` in milliseconds (synchronised on CUDA)."""
    return paired_median_ms([fn], device, repeats, warmup)[0]


def paired_median_ms(fns: Sequence[Callable[[], object]], device: torch.device, repeats: int,
                     warmup: int) -> list[float]:
    """Median wall time (ms) of each of ``fns``, called in turn so load drift hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, repeats)):
        for fn, acc in zip(fns, times):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            acc.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def parse_variant_spec(spec: str) -> tuple[str, dict[str, object]]:
    """``"prototype:metric=mahalanobis,top_m=10"`` -> ("prototype", {...}); values are
    Python literals where they parse as one (numbers, True/False), strings otherwise."""
    name, _, rest = spec.partition(":")
    hparams: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"expected key=value in {spec!r}, got {item!r}")
        try:
            hparams[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            hparams[key.strip()] = raw.strip()
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


def bench_variants(
    device: str | torch.device = "cpu",
    batch: int = 64,
    classes_in_batch: int = 16,
    num_classes: int = 200,
    dim: int = 2048,
    repeats: int = 20,
    warmup: int = 5,
    variants: Sequence[str] | None = None,
    seed: int = 0,
) -> list[dict[str, object]]:
    """Time every registered variant's step against the CE head (see module doc).

    Each variant runs at its recommended setting; an entry of ``variants`` may override
    hyperparameters as ``"name:key=value,..."`` (see :func:`parse_variant_spec`). Returns one
    row per entry:
    ``variant``, ``ms`` (its step), ``ce_ms`` (the CE head, timed just before and after it),
    ``ratio`` = ms / ce_ms,
    ``within_target`` (ratio <= 3, the CPU target).
    """
    device = torch.device(device)
    names = list(variants) if variants is not None else list_variants()
    y = pk_labels(batch, classes_in_batch, num_classes, device)

    torch.manual_seed(seed)
    z = torch.randn(batch, dim, device=device, requires_grad=True)  # (B, D)
    head = nn.Linear(dim, num_classes).to(device)

    def ce_step() -> None:
        z.grad = None
        head.zero_grad(set_to_none=True)
        F.cross_entropy(head(z), y).backward()

    rows: list[dict[str, object]] = []
    for spec in names:
        name, hparams = parse_variant_spec(spec)
        torch.manual_seed(seed)
        variant = create_variant(name, **hparams).to(device).train()
        neck = variant.build_neck(dim).to(device)
        features = {
            layer: torch.randn(batch, d, device=device, requires_grad=True)
            for layer, d in (FEATURE_DIMS.items() if variant.uses_features else ())
        }
        model = EmbeddingModel(neck, head, features)
        leaves = [z, *features.values()]
        params = [*model.parameters(), *variant.parameters()]

        def step() -> None:
            for t in leaves + params:
                t.grad = None
            forward_step(model, variant, z, y, PROGRESS).loss.backward()

        # Blocks CE, step, CE (each warm in cache); the two CE medians bracket any drift.
        ce_before = median_ms(ce_step, device, repeats, warmup)
        ms = median_ms(step, device, repeats, warmup)
        ce_ms = 0.5 * (ce_before + median_ms(ce_step, device, repeats, warmup))
        ratio = ms / ce_ms
        rows.append({"variant": spec, "ms": ms, "ce_ms": ce_ms, "ratio": ratio,
                     "within_target": ratio <= CPU_TARGET_RATIO})
    return rows


def bench_resnet50(
    batch: int = 32,
    image_size: int = 224,
    num_classes: int = 200,
    classes_in_batch: int = 8,
    repeats: int = 20,
    warmup: int = 5,
    variants: Sequence[str] | None = None,
    device: str | torch.device = "cuda",
) -> list[dict[str, object]]:
    """Full ResNet-50 training steps (bf16 autocast, SGD) with each variant vs CE only.

    Returns rows ``variant``, ``ms``, ``ce_ms`` (the ``baseline`` step), ``added_percent``,
    ``within_target`` (< 5 %). CUDA only.
    """
    from carrot.model import CarrotModel, create_backbone

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("the ResNet-50 benchmark runs on CUDA only")
    names = list(variants) if variants is not None else list_variants()
    if "baseline" in names:
        names.remove("baseline")
    y = pk_labels(batch, classes_in_batch, num_classes, device)
    x = torch.randn(batch, 3, image_size, image_size, device=device)

    def make_step(spec: str) -> Callable[[], None]:
        name, hparams = parse_variant_spec(spec)
        torch.manual_seed(0)
        variant = create_variant(name, **hparams).to(device).train()
        backbone = create_backbone("resnet50", pretrained=False)
        model = CarrotModel(backbone, variant.build_neck(backbone.num_features), num_classes).to(device).train()
        params = [p for m in (model, variant) for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                result = forward_step(model, variant, x, y, PROGRESS)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            optimizer.step()

        return step

    # All models live at once and their steps alternate, so clock and load drift hit all alike.
    steps = [make_step(name) for name in ["baseline", *names]]
    times = paired_median_ms(steps, device, repeats, warmup)
    ce_ms = times[0]
    rows: list[dict[str, object]] = []
    for name, ms in zip(names, times[1:]):
        added = 100.0 * (ms / ce_ms - 1.0)
        rows.append({"variant": name, "ms": ms, "ce_ms": ce_ms, "added_percent": added,
                     "within_target": added < GPU_TARGET_PERCENT})
    return rows


def format_table(rows: list[dict[str, object]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` are (key, header, format)."""
    cells = [[h for _, h, _ in columns]] + [
        [format(r[k], f) if f else str(r[k]) for k, _, f in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="carrot bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes-in-batch", type=int, default=16)
    parser.add_argument("--num-classes", type=int, default=200)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", nargs="*", default=None,
                        help="subset of variants (default: all), each optionally name:key=value,...")
    parser.add_argument("--resnet50", action="store_true", help="also time full ResNet-50 steps (CUDA only)")
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args(argv)

    device = resolve_device(args.device).type
    rows = bench_variants(device, args.batch, args.classes_in_batch, args.num_classes, args.dim,
                          args.repeats, args.warmup, args.variants)
    for row in rows:
        row["target"] = "yes" if row["within_target"] else "NO"
    print(f"variant step vs CE head on {device}: B={args.batch} ({args.classes_in_batch} classes), "
          f"D={args.dim}, K={args.num_classes}, {torch.get_num_threads()} threads")
    print(format_table(rows, [("variant", "variant", ""), ("ms", "ms", ".2f"), ("ce_ms", "CE ms", ".2f"),
                              ("ratio", "ratio", ".2f"),
                              ("target", f"<= {CPU_TARGET_RATIO:g}x", "")]))
    if args.resnet50:
        if torch.device(device).type != "cuda":
            print("\n--resnet50 skipped: CUDA only")
        else:
            res = bench_resnet50(args.resnet_batch, args.image_size, args.num_classes,
                                 variants=args.variants, device=device)
            for row in res:
                row["target"] = "yes" if row["within_target"] else "NO"
            print(f"\nResNet-50 training step, batch {args.resnet_batch} at {args.image_size} px, bf16; "
                  f"CE only {res[0]['ce_ms']:.1f} ms" if res else "")
            print(format_table(res, [("variant", "variant", ""), ("ms", "ms", ".1f"),
                                     ("added_percent", "added %", "+.1f"),
                                     ("target", f"< {GPU_TARGET_PERCENT:g}%", "")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
