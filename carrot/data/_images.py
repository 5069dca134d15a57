"""Image-file datasets shared by the real FGVC builders: decoding, transforms, caching, splits.

Pipeline of one item (all picklable, so DataLoader workers > 0 work):

1. :class:`ImageLoader` (deterministic, cacheable): open with PIL, convert to RGB, crop a
   bottom banner (FGVC-Aircraft), resize the shorter side to ``resize_size``.
2. The split's transform: training ``RandomCrop(image_size)`` + horizontal flip (+ timm's
   RandAugment ``rand-m9-mstd0.5-inc1`` for ``augment="randaugment"``; no augmentation at all
   for ``augment="none"``, which is a centre crop); evaluation ``CenterCrop(image_size)``;
   then :class:`ToNormalizedTensor` (= ``ToTensor`` + ``Normalize(spec.mean, spec.std)``).

Sizes follow the FGVC convention: ``image_size = cfg.image_size or spec.input_size`` and
``resize_size = cfg.resize_size or round(image_size / 0.875)`` (448 from 512, 224 from 256),
whatever the backbone's own ``crop_pct`` (timm's ResNet-50 says 0.95, which would give 472);
the interpolation and normalisation come from the backbone's timm data config (``ImageSpec``).
``DatasetSplits.train_eval`` holds the training items with the evaluation transform.

Decoded-image cache (``cfg.cache``): the output of step 1 is kept in memory as a uint8
``(H, W, 3)`` array keyed by item index, so every later epoch skips JPEG decoding and
resizing; augmentation still runs every time. Memory cost is about
``3 * resize_size**2 * aspect`` bytes per image, e.g. 1.05 MB at 512 px for a 4:3 photo, so
roughly (all three splits cached) CUB-200 (11,788 images) 12 GB, FGVC-Aircraft (10,000)
11 GB, Stanford Cars (16,185) 18 GB, Flowers-102 (8,189) 9 GB, NABirds (48,562) 50 GB; a
quarter of that at 256 px. Only the splits actually iterated fill up. The cache lives
in the process that decodes: with ``workers > 0`` each worker process fills its own copy
(up to ``workers`` times the memory, lost when non-persistent workers exit). Call
:meth:`ImageFileDataset.fill_cache` in the main process before creating the DataLoader so
forked workers share the decoded arrays copy-on-write instead.
"""
from __future__ import annotations

import copy
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from carrot.data import DatasetError, DatasetSplits, ImageSpec, limit_per_class, stratified_split

FGVC_CROP_PCT = 0.875  # resize = image_size / 0.875: 448 crop from 512, 224 from 256
RANDAUGMENT = "rand-m9-mstd0.5-inc1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MISSING_SHOWN = 5  # how many missing files an error names


# --------------------------------------------------------------------------- loading


class ImageLoader:
    """Path -> RGB PIL image, bottom ``crop_bottom`` px removed, shorter side ``resize_size``.

    JPEGs are decoded with PIL's draft mode (DCT-domain down-scaling by 1/2, 1/4 or 1/8)
    when the image is at least twice the target size: much faster for large photos, and the
    result is still at least the target size before the final (antialiased) resize.
    """

    def __init__(self, resize_size: int, interpolation: str = "bilinear", crop_bottom: int = 0,
                 draft: bool = True) -> None:
        self.resize_size = int(resize_size)
        self.interpolation = interpolation
        self.crop_bottom = int(crop_bottom)
        self.draft = draft
        from timm.data.transforms import str_to_pil_interp

        self._resample = str_to_pil_interp(interpolation)

    def __call__(self, path: str) -> Image.Image:
        try:
            with Image.open(path) as img:
                w0, h0 = img.size
                crop = self.crop_bottom if h0 - self.crop_bottom >= 1 else 0
                scale = self.resize_size / max(1, min(w0, h0 - crop))
                if self.draft and img.format == "JPEG" and scale < 0.5:
                    img.draft("RGB", (math.ceil(w0 * scale), math.ceil(h0 * scale)))
                img = img.convert("RGB")  # forces decoding; also palette/grey/CMYK -> RGB
        except OSError as exc:  # missing, unreadable, truncated: name the file
            raise OSError(f"cannot read image {path}: {exc}") from exc
        if crop:
            w, h = img.size
            img = img.crop((0, 0, w, h - max(1, round(crop * h / h0))))
        w, h = img.size
        short = min(w, h)
        if short != self.resize_size:
            if w <= h:
                size = (self.resize_size, max(1, round(h * self.resize_size / w)))
            else:
                size = (max(1, round(w * self.resize_size / h)), self.resize_size)
            img = img.resize(size, resample=self._resample)
        return img


class ImageFileDataset(Dataset):
    """``(image tensor (3, S, S) float32, int label)`` from image files on disk."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, loader: ImageLoader, transform,
                 cache: bool = False) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        self.loader = loader
        self.transform = transform
        self.cache = cache
        self._cache: dict[int, np.ndarray] = {}

    @property
    def targets(self) -> list[int]:  # torchvision convention
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        """The decoded, resized, un-augmented image of item ``i`` (from the cache if held)."""
        if self.cache:
            arr = self._cache.get(i)
            if arr is None:
                arr = np.asarray(self.loader(self.paths[i]), dtype=np.uint8)
                self._cache[i] = arr
            return Image.fromarray(arr)
        return self.loader(self.paths[i])

    def __getitem__(self, i: int):
        i = int(i)
        if i < 0:
            i += len(self)
        return self.transform(self.load(i)), int(self.labels[i])

    def with_transform(self, transform) -> "ImageFileDataset":
        """The same items with another transform, sharing this dataset's cache (in-process).

        E.g. ``splits.train_eval`` (training items, evaluation transform), or the validation
        items with the training transform for a final train+val run:
        ``splits.val.with_transform(splits.train.transform)``.
        """
        twin = copy.copy(self)
        twin.transform = transform
        return twin

    def fill_cache(self, threads: int = 4) -> int:
        """Decode every image into the cache now (no-op unless ``cache``); returns bytes held.

        PIL releases the GIL while decoding, so threads help. Done in the main process before
        the DataLoader forks its workers, the decoded arrays are shared copy-on-write.
        """
        if self.cache:
            todo = [i for i in range(len(self)) if i not in self._cache]

            def one(i: int) -> None:
                self._cache[i] = np.asarray(self.loader(self.paths[i]), dtype=np.uint8)

            with ThreadPoolExecutor(max(1, threads)) as pool:
                list(pool.map(one, todo))
        return self.cache_bytes()

    def cache_bytes(self) -> int:
        return int(sum(a.nbytes for a in self._cache.values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, classes={len(np.unique(self.labels))}, cache={self.cache})"


# --------------------------------------------------------------------------- transforms


def resolve_sizes(cfg, spec: ImageSpec) -> tuple[int, int]:
    """``(image_size, resize_size)`` from the config, defaulting to the backbone's input size."""
    image_size = int(cfg.image_size or spec.input_size)
    resize_size = int(getattr(cfg, "resize_size", None) or round(image_size / FGVC_CROP_PCT))
    if resize_size < image_size:
        raise DatasetError(
            f"{cfg.name}: data.resize_size={resize_size} is smaller than the crop "
            f"image_size={image_size}; expected resize_size >= image_size"
        )
    return image_size, resize_size


class ToNormalizedTensor:
    """PIL RGB image -> ``(3, H, W)`` float32 ``(x / 255 - mean) / std``.

    Same values as ``ToTensor()`` + ``Normalize(mean, std)``, in about half the time
    (one uint8 -> float conversion, in-place arithmetic).
    """

    def __init__(self, mean, std) -> None:
        import torch

        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._shift = torch.tensor(self.mean).view(3, 1, 1) * 255.0
        self._scale = 1.0 / (torch.tensor(self.std).view(3, 1, 1) * 255.0)

    def __call__(self, img: Image.Image):
        import torch

        arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
        x = torch.from_numpy(arr.copy() if not arr.flags.writeable else arr).permute(2, 0, 1).contiguous()
        return x.float().sub_(self._shift).mul_(self._scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def _posterize_at_least_one_bit(img, bits_to_keep, **_):
    """timm's posterize, keeping at least 1 bit.

    timm's ``PosterizeIncreasing`` asks for 0 bits at magnitude 10 (reached by
    ``m9-mstd0.5`` about 2 % of the times the op is drawn), which recent Pillow (13 here) rejects
    with "bits must be between or equal to 1 and 8" (older Pillow returned a black image): an
    occasional crash mid-epoch without this.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, max(1, int(bits_to_keep)))


def _patch_posterize(rand_augment):
    from timm.data import auto_augment

    for op in getattr(rand_augment, "ops", []):
        if getattr(op, "aug_fn", None) is auto_augment.posterize:
            op.aug_fn = _posterize_at_least_one_bit
    return rand_augment


def build_transform(image_size: int, spec: ImageSpec, train: bool, augment: str = "basic"):
    """The post-resize transform (PIL in, normalised float tensor out)."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp
    from torchvision import transforms as T

    if augment not in ("none", "basic", "randaugment"):
        raise DatasetError(f"unknown augment {augment!r}; expected none, basic or randaugment")
    steps = []
    if train and augment != "none":
        steps += [T.RandomCrop(image_size, pad_if_needed=True, padding_mode="reflect"),
                  T.RandomHorizontalFlip()]
        if augment == "randaugment":
            hparams = {
                "translate_const": int(image_size * 0.45),
                "img_mean": tuple(min(255, round(255 * m)) for m in spec.mean),
                "interpolation": str_to_pil_interp(spec.interpolation),
            }
            steps.append(_patch_posterize(rand_augment_transform(RANDAUGMENT, hparams)))
    else:
        steps.append(T.CenterCrop(image_size))
    steps.append(ToNormalizedTensor(spec.mean, spec.std))
    return T.Compose(steps)


# --------------------------------------------------------------------------- checks


def require(dataset: str, root: Path, expected: Sequence[str], layout: str) -> None:
    """Raise a DatasetError naming every entry of ``expected`` missing under ``root``.

    Entries ending in "/" must be folders, the others files.
    """
    missing = []
    for rel in expected:
        p = root / rel.rstrip("/")
        ok = p.is_dir() if rel.endswith("/") else p.is_file()
        if not ok:
            missing.append(rel)
    if missing:
        raise DatasetError(
            f"{dataset}: {root} is incomplete: missing {', '.join(missing)} "
            f"(expected {layout}: {', '.join(expected)})"
        )


def check_root(dataset: str, root: str | None, layout: str) -> Path:
    """The configured root as a Path; DatasetError when unset or not an existing folder."""
    if root is None or str(root).strip() == "":
        raise DatasetError(
            f"{dataset}: data.root is not set; expected a folder with {layout}"
        )
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"{dataset}: root {path} does not exist (expected a folder with {layout})")
    if not path.is_dir():
        raise DatasetError(f"{dataset}: root {path} is not a folder (expected a folder with {layout})")
    return path


def pick_root(path: Path, marker: str, subfolders: Sequence[str]) -> Path:
    """``path`` if it holds ``marker``, else the first of ``path/subfolder`` that does, else ``path``."""
    if (path / marker).exists():
        return path
    for sub in subfolders:
        if (path / sub / marker).exists():
            return path / sub
    for sub in subfolders:  # incomplete copy inside the expected sub-folder: report that one
        if (path / sub).is_dir():
            return path / sub
    return path


def check_files(dataset: str, root: Path, paths: Sequence[str]) -> None:
    """DatasetError naming the first few listed image files that do not exist."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(os.path.relpath(p, root) for p in missing[:MISSING_SHOWN])
        more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
        raise DatasetError(
            f"{dataset}: {root} is incomplete: {len(missing)} of {len(paths)} listed image files "
            f"are missing: {shown}{more}"
        )


def image_problem(path: str, full: bool = False) -> str | None:
    """Why ``path`` is not a usable image, or None when it is.

    Cheap (``full=False``): PIL's lazy ``Image.open`` reads the header only (format, size),
    enough for a missing, empty, unreadable or non-image file, not for a file cut short after
    its header. Full: also ``verify()`` (PNG chunk checksums) and a complete decode (``load()``),
    which catches truncated and corrupt pixel data. The file is only read.
    """
    try:
        if full:
            with Image.open(path) as img:
                img.verify()
        with Image.open(path) as img:
            if img.format is None:
                return "unknown image format"
            w, h = img.size
            if w < 1 or h < 1:
                return f"empty image ({w}x{h} px)"
            if full:
                img.load()
    except UnidentifiedImageError:
        return "cannot identify image file"
    except OSError as exc:
        return (exc.strerror or str(exc)) if isinstance(exc.errno, int) else str(exc)
    except Exception as exc:  # PIL raises SyntaxError, ValueError, ... on some malformed files
        return f"{type(exc).__name__}: {exc}"
    return None


def check_images(dataset: str, paths: Sequence[str], full: bool = False, threads: int = 8) -> None:
    """DatasetError naming the first unusable image file of ``paths`` and how many there are.

    Every file is checked (none is skipped), in a small thread pool; see :func:`image_problem`.
    """
    paths = list(dict.fromkeys(str(p) for p in paths))  # each file once, first-seen order
    if not paths:
        return
    workers = max(1, min(threads, len(paths) // 64 + 1))
    if workers == 1:
        problems = [image_problem(p, full) for p in paths]
    else:
        with ThreadPoolExecutor(workers) as pool:
            problems = list(pool.map(lambda p: image_problem(p, full), paths))
    bad = [(p, why) for p, why in zip(paths, problems) if why is not None]
    if bad:
        first, why = bad[0]
        n = len(bad)
        check = "full decode" if full else "header check"
        raise DatasetError(
            f"{dataset}: {n} unreadable image{'s' if n > 1 else ''} of {len(paths)} ({check}), "
            f"first: {first} ({why}); expected readable image files (JPEG, PNG, ...) "
            f"that PIL can decode; fix or remove them"
        )


def read_lines(dataset: str, path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of a metadata file, stripped, with their line numbers; a file that
    cannot be read or is not UTF-8 is a DatasetError naming it (and the line)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DatasetError(f"{dataset}: cannot read {path}: {exc.strerror or exc}") from None
    lines = []
    for lineno, data in enumerate(raw.splitlines(), 1):
        try:
            line = data.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{dataset}: {path} line {lineno}: byte {data[exc.start]:#04x} is not UTF-8; "
                               "expected the dataset's metadata as UTF-8 text") from None
        if line:
            lines.append((lineno, line))
    return lines


def read_rows(dataset: str, path: Path, fields: int) -> list[list[str]]:
    """Whitespace-separated rows of a metadata file; the last field keeps its inner spaces."""
    rows = []
    for lineno, line in read_lines(dataset, path):
        parts = line.split(maxsplit=fields - 1)
        if len(parts) != fields:
            raise DatasetError(
                f"{dataset}: {path} line {lineno}: expected {fields} fields, got {line!r}"
            )
        rows.append(parts)
    return rows


# --------------------------------------------------------------------------- splits


def make_splits(dataset: str, cfg, spec: ImageSpec, root: Path, class_names: list[str],
                train: tuple[list[str], np.ndarray], test: tuple[list[str], np.ndarray],
                val: tuple[list[str], np.ndarray] | None = None, crop_bottom: int = 0,
                info: dict[str, str] | None = None) -> DatasetSplits:
    """DatasetSplits of image files: holds out a stratified val when there is no official one.

    ``train``/``val``/``test`` are ``(paths, labels)`` with labels in ``0..len(class_names)-1``.
    Without ``val``, ``cfg.val_fraction`` of every training class (``cfg.split_seed``) becomes
    validation; ``cfg.limit_per_class`` then caps the remaining training images per class.
    """
    image_size, resize_size = resolve_sizes(cfg, spec)
    parts = {"train": train, "test": test}
    if val is None:
        tr_paths, tr_labels = train[0], np.asarray(train[1], dtype=np.int64)
        keep, held = stratified_split(tr_labels, cfg.val_fraction, cfg.split_seed)
        parts["train"] = ([tr_paths[i] for i in keep], tr_labels[keep])
        parts["val"] = ([tr_paths[i] for i in held], tr_labels[held])
        val_source = f"stratified {cfg.val_fraction:g} of train (split_seed={cfg.split_seed})"
    else:
        parts["val"] = val
        val_source = "official"
    tr_paths, tr_labels = parts["train"][0], np.asarray(parts["train"][1], dtype=np.int64)
    keep = limit_per_class(tr_labels, cfg.limit_per_class)
    parts["train"] = ([tr_paths[i] for i in keep], tr_labels[keep])

    k = len(class_names)
    for split, (paths, labels) in parts.items():
        labels = np.asarray(labels, dtype=np.int64)
        if len(paths) == 0:
            raise DatasetError(f"{dataset}: {root}: the {split} split has no images")
        if labels.min() < 0 or labels.max() >= k:
            raise DatasetError(f"{dataset}: {root}: {split} labels outside 0..{k - 1}")
    for a, b in (("train", "test"), ("val", "test"), ("train", "val")):  # a leak would inflate the accuracy
        shared = sorted(set(parts[a][0]) & set(parts[b][0]))
        if shared:
            raise DatasetError(f"{dataset}: {root}: {len(shared)} image(s) in both the {a} and the {b} split, "
                               f"first: {shared[0]}; expected disjoint splits (check the split metadata)")
    check_files(dataset, root, [p for paths, _ in parts.values() for p in paths])

    loader = ImageLoader(resize_size, spec.interpolation, crop_bottom=crop_bottom)
    augment = getattr(cfg, "augment", "basic")
    cache = bool(getattr(cfg, "cache", False))
    datasets = {
        split: ImageFileDataset(paths, labels, loader,
                                build_transform(image_size, spec, split == "train", augment), cache)
        for split, (paths, labels) in parts.items()
    }
    full_info = {
        "source": dataset, "root": str(root), "image_size": str(image_size),
        "resize_size": str(resize_size), "interpolation": spec.interpolation,
        "augment": augment, "val": val_source,
        **{f"n_{s}": str(len(d)) for s, d in datasets.items()},
        **(info or {}),
    }
    return DatasetSplits(
        train=datasets["train"], val=datasets["val"], test=datasets["test"],
        train_eval=datasets["train"].with_transform(datasets["val"].transform),
        val_train=datasets["val"].with_transform(datasets["train"].transform),
        num_classes=k, class_names=list(class_names),
        labels={s: d.labels.copy() for s, d in datasets.items()},
        info=full_info,
    )
