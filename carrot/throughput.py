"""``carrot bench throughput``: training images per second of the harness against a plain timm loop.

Both read the same generated ImageFolder fixture through the same DataLoader settings; the
plain loop is ``timm.create_model`` + AdamW + cross-entropy, nothing else. The harness
figure comes from its own logged ``time/train_epoch_s`` (evaluation excluded), first
epoch dropped as warm-up. Every variant is then measured the same way, as a ratio to the
harness with CARROT off (``baseline``).

    carrot bench throughput --backbone resnet50 --image-size 448 --batch-size 32
"""
from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from carrot import interrupt


def make_imagefolder(root: Path, classes: int, per_class: int, size: int, seed: int = 0,
                     test_per_class: int = 2) -> Path:
    """Generated JPEGs in the ImageFolder layout (train/ and test/ of class folders)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
            for i in range(n):
                noise = rng.integers(0, 40, size=(8, 8, 3), dtype=np.uint8)
                img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).resize((size, size))
                img.save(folder / f"{i:04d}.jpg", quality=90)
    return root


def plain_timm_throughput(loader, backbone: str, num_classes: int, device: torch.device, amp: bool,
                          epochs: int) -> float:
    """Images/s of the plainest timm training loop over ``loader`` (first epoch dropped)."""
    import timm

    model = timm.create_model(backbone, pretrained=False, num_classes=num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    rates = []
    for _ in range(epochs):
        seen, start = 0, time.time()
        for x, y in loader:
            interrupt.check()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with ctx():
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.time() - start))
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main(argv: list[str] | None = None) -> int:
    from carrot.checks import check_names
    from carrot.config import ConfigError, RunConfig
    from carrot.data import build_dataset
    from carrot.loaders import make_loader
    from carrot.model import create_backbone, image_spec
    from carrot.runtime import resolve_device
    from carrot.train import run
    from carrot.variants import list_variants

    from carrot import contract
    from carrot.config import int_argument

    p = contract.ArgumentParser(prog="carrot bench throughput", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50", help="timm model (default %(default)s)")
    p.add_argument("--image-size", type=int_argument(16), default=448, help="input size (default %(default)s)")
    p.add_argument("--batch-size", type=int_argument(2), default=32, help="training batch (default %(default)s)")
    p.add_argument("--classes", type=int_argument(2), default=16,
                   help="classes of the generated ImageFolder fixture (default %(default)s)")
    p.add_argument("--per-class", type=int_argument(2), default=48, help="images per class (default %(default)s)")
    p.add_argument("--epochs", type=int_argument(1), default=3, help="epochs per timed run (default %(default)s)")
    p.add_argument("--workers", type=int_argument(0), default=8,
                   help="DataLoader worker processes (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default %(default)s)")
    p.add_argument("--variants", default="all", help="comma-separated, or all (default %(default)s)")
    args = p.parse_args(argv)
    variants = list_variants() if args.variants == "all" else [v.strip() for v in args.variants.split(",")]
    base = {
        "data": {"name": "imagefolder", "image_size": args.image_size,
                 "batch_size": args.batch_size, "workers": args.workers, "cache": True, "val_fraction": 0.1},
        "model": {"backbone": args.backbone},
        "optim": {"epochs": args.epochs, "warmup_epochs": 0.0},
        "eval": {"probe_max_train": 64, "probe_l2_grid": [1e-2]},
        "device": args.device, "show_progress": False,
    }
    for name in variants:  # every configuration checked before the first image is made
        check_names(RunConfig.from_dict({**base, "variant": {"name": name}}))
    if args.classes < 2 or args.per_class < 2:
        raise ConfigError(f"need --classes >= 2 and --per-class >= 2, got {args.classes} and {args.per_class}")
    device = resolve_device(args.device)
    base["device"] = device.type

    with tempfile.TemporaryDirectory() as tmp:
        root = make_imagefolder(Path(tmp) / "fixture", args.classes, args.per_class,
                                int(round(args.image_size / 0.875)))
        base["data"]["root"] = str(root)
        cfg = RunConfig.from_dict(base).resolved()
        splits = build_dataset(cfg.data, image_spec(create_backbone(args.backbone)))
        loader = make_loader(splits.train, cfg, train=True, pin=device.type == "cuda")
        amp = device.type == "cuda"
        plain = plain_timm_throughput(loader, args.backbone, splits.num_classes, device, amp, args.epochs)
        print(f"{args.backbone} at {args.image_size} px, batch {args.batch_size}, {len(splits.train)} training "
              f"images, {device.type}{' bf16' if amp else ''}")
        width = max(len("plain timm"), *(len("harness " + name) for name in variants)) + 2
        print(f"{'loop':<{width}}{'img/s':>10}{'ratio':>10}")
        print(f"{'plain timm':<{width}}{plain:>10.1f}{1.0:>10.3f}")
        reference = None
        for name in variants:
            data = {**base, "variant": {"name": name}}
            result = run(RunConfig.from_dict(data), track=False, log=lambda s: None)
            times = [h["time/train_epoch_s"] for h in result.history][1:] or \
                [h["time/train_epoch_s"] for h in result.history]
            images = (len(splits.train) // args.batch_size) * args.batch_size  # drop_last batches
            rate = images / statistics.median(times)
            reference = reference or (rate if name == "baseline" else None)
            vs = f"{rate / reference:.3f} of baseline" if reference and name != "baseline" else ""
            print(f"{'harness ' + name:<{width}}{rate:>10.1f}{rate / plain:>10.3f}  {vs}".rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
