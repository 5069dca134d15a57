"""Tiny fixture trees in the official layouts of the real FGVC datasets (for tests).

Every ``make_*`` writes a few small JPEGs per class and split under a tmp folder and returns a
:class:`Fixture`: the root to configure, the split lists ``(path, label)`` in the order the
official metadata lists them, the class names, and each image's colour. Every image is a
class-specific colour plus mild noise, so a test can check that a decoded item really is the
image its path names (and so that its label is right).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# well-separated colours; the fixture image of colour j is PALETTE[j] + noise
PALETTE = [
    (220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40),
    (220, 40, 220), (40, 220, 220), (130, 130, 130), (250, 140, 20),
]
BANNER = (255, 255, 255)  # FGVC-Aircraft copyright banner colour in the fixture


@dataclass
class Fixture:
    root: Path  # what data.root is set to
    base: Path  # the dataset folder proper (holds the metadata)
    splits: dict[str, list[tuple[str, int]]]  # split -> [(absolute path, label)] in metadata order
    class_names: list[str]
    colour: dict[str, int] = field(default_factory=dict)  # absolute path -> PALETTE index
    extra: dict = field(default_factory=dict)

    def labels(self, split: str) -> list[int]:
        return [y for _, y in self.splits[split]]

    def paths(self, split: str) -> list[str]:
        return [p for p, _ in self.splits[split]]


def write_image(path: Path, colour: int, rng: np.random.Generator, size: tuple[int, int] = (40, 30),
                banner: int = 0, fmt: str = "JPEG") -> None:
    """A ``size`` (w, h) image of PALETTE[colour] with noise; ``banner`` white rows at the bottom."""
    w, h = size
    base = np.array(PALETTE[colour], dtype=np.int16)
    arr = base + rng.integers(-15, 16, size=(h, w, 3))
    if banner:
        arr[h - banner:] = BANNER
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def _size(rng: np.random.Generator) -> tuple[int, int]:
    return (40, 30) if rng.random() < 0.5 else (30, 40)


# --------------------------------------------------------------------------- CUB

CUB_CLASSES = ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross", "Groove_billed_Ani"]


def make_cub(tmp: Path, train_per_class=(5, 5, 4, 6), test_per_class=3, seed: int = 0) -> Fixture:
    """CUB_200_2011/ under ``tmp``; images.txt lists train and test images interleaved."""
    rng = np.random.default_rng(seed)
    base = tmp / "CUB_200_2011"
    folders = [f"{c + 1:03d}.{n}" for c, n in enumerate(CUB_CLASSES)]
    entries = []  # (rel, class index); shuffled, then each class's first images are its train ones
    for c, folder in enumerate(folders):
        for j in range(train_per_class[c] + test_per_class):
            entries.append((f"{folder}/{folder.split('.')[1]}_{j:04d}_{c}.jpg", c))
    entries = [entries[i] for i in rng.permutation(len(entries))]
    fixed = []
    seen = {c: 0 for c in range(len(folders))}
    for rel, c in entries:
        fixed.append((rel, c, seen[c] < train_per_class[c]))
        seen[c] += 1
    splits = {"train": [], "test": []}
    colour = {}
    lines = {"images": [], "split": [], "labels": []}
    for i, (rel, c, is_train) in enumerate(fixed, 1):
        path = base / "images" / rel
        write_image(path, c, rng, _size(rng))
        lines["images"].append(f"{i} {rel}")
        lines["split"].append(f"{i} {int(is_train)}")
        lines["labels"].append(f"{i} {c + 1}")
        splits["train" if is_train else "test"].append((str(path), c))
        colour[str(path)] = c
    (base / "images.txt").write_text("\n".join(lines["images"]) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(lines["split"]) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(lines["labels"]) + "\n")
    (base / "classes.txt").write_text("".join(f"{c + 1} {f}\n" for c, f in enumerate(folders)))
    return Fixture(root=base, base=base, splits=splits, class_names=list(CUB_CLASSES), colour=colour)


# --------------------------------------------------------------------------- NABirds

# (class id, name); only the ids in NABIRDS_LEAVES have images, the others are hierarchy nodes
NABIRDS_CLASSES = [(0, "Birds"), (22, "Perching Birds"), (295, "Oak Titmouse"), (313, "Juniper Titmouse"),
                   (817, "Bushtit"), (1000, "Tufted Titmouse"), (1001, "Black-crested Titmouse")]
NABIRDS_LEAVES = [817, 295, 1000, 313]  # deliberately not sorted; 1001 has no images


def make_nabirds(tmp: Path, train_per_class: int = 4, test_per_class: int = 3, seed: int = 1) -> Fixture:
    rng = np.random.default_rng(seed)
    base = tmp / "nabirds"
    contiguous = {cid: k for k, cid in enumerate(sorted(NABIRDS_LEAVES))}
    entries = []
    for cid in NABIRDS_LEAVES:
        for j in range(train_per_class + test_per_class):
            entries.append((cid, j < train_per_class))
    entries = [entries[i] for i in rng.permutation(len(entries))]
    splits = {"train": [], "test": []}
    colour = {}
    lines = {"images": [], "split": [], "labels": []}
    for cid, is_train in entries:
        uid = uuid.UUID(int=int(rng.integers(0, 2**62)))
        rel = f"{cid:04d}/{uid.hex}.jpg"
        path = base / "images" / rel
        write_image(path, contiguous[cid], rng, _size(rng))
        lines["images"].append(f"{uid} {rel}")
        lines["split"].append(f"{uid} {int(is_train)}")
        lines["labels"].append(f"{uid} {cid}")
        splits["train" if is_train else "test"].append((str(path), contiguous[cid]))
        colour[str(path)] = contiguous[cid]
    (base / "images.txt").write_text("\n".join(lines["images"]) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(lines["split"]) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(lines["labels"]) + "\n")
    (base / "classes.txt").write_text("".join(f"{cid} {name}\n" for cid, name in NABIRDS_CLASSES))
    (base / "hierarchy.txt").write_text("22 0\n" + "".join(f"{cid} 22\n" for cid in NABIRDS_LEAVES + [1001]))
    names = dict(NABIRDS_CLASSES)
    return Fixture(root=tmp, base=base, splits=splits, colour=colour,
                   class_names=[names[c] for c in sorted(NABIRDS_LEAVES)],
                   extra={"contiguous": contiguous})


# --------------------------------------------------------------------------- FGVC-Aircraft

# variant -> (family, manufacturer); the names files list them in this (official, unsorted) order
AIRCRAFT = {
    "747-400": ("Boeing 747", "Boeing"),
    "A321": ("A320", "Airbus"),
    "707-320": ("Boeing 707", "Boeing"),
    "A320": ("A320", "Airbus"),
}
AIRCRAFT_FAMILIES = ["Boeing 707", "A320", "Boeing 747"]
AIRCRAFT_MANUFACTURERS = ["Airbus", "Boeing"]


def make_aircraft(tmp: Path, per_split=(4, 3, 3), seed: int = 2) -> Fixture:
    """fgvc-aircraft-2013b/ under ``tmp``; images are 40x50 with a 20 px white banner at the bottom.

    ``splits`` hold variant labels; ``extra["levels"][level][split]`` the labels of each level.
    """
    rng = np.random.default_rng(seed)
    base = tmp / "fgvc-aircraft-2013b"
    data = base / "data"
    variants = list(AIRCRAFT)
    names = {"variant": variants, "family": AIRCRAFT_FAMILIES, "manufacturer": AIRCRAFT_MANUFACTURERS}
    files = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
    data.mkdir(parents=True)
    for level, fname in files.items():
        (data / fname).write_text("".join(f"{n}\n" for n in names[level]))
    splits, colour = {}, {}
    levels = {lv: {} for lv in names}
    next_id = 1034000
    for split, n in zip(("train", "val", "test"), per_split):
        rows = [(v, next_id + k) for k, (v, _) in enumerate((v, j) for v in variants for j in range(n))]
        next_id += len(rows)
        rows = [rows[i] for i in rng.permutation(len(rows))]
        splits[split] = []
        for lv in names:
            levels[lv][split] = []
        text = {lv: [] for lv in names}
        for v, image_id in rows:
            path = data / "images" / f"{image_id:07d}.jpg"
            write_image(path, variants.index(v), rng, size=(40, 50), banner=20)
            colour[str(path)] = variants.index(v)
            splits[split].append((str(path), variants.index(v)))
            value = {"variant": v, "family": AIRCRAFT[v][0], "manufacturer": AIRCRAFT[v][1]}
            for lv in names:
                text[lv].append(f"{image_id:07d} {value[lv]}")
                levels[lv][split].append(names[lv].index(value[lv]))
        for lv in names:
            (data / f"images_{lv}_{split}.txt").write_text("\n".join(text[lv]) + "\n")
    return Fixture(root=tmp, base=base, splits=splits, class_names=variants, colour=colour,
                   extra={"levels": levels, "names": names})


# --------------------------------------------------------------------------- Stanford Cars

CARS_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012",
                "Aston Martin V8 Vantage Convertible 2012"]


def _cars_annos(records: list[tuple[str, int]]):
    dtype = [(k, "O") for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    annos = np.zeros((1, len(records)), dtype=dtype)
    for i, (fname, cls) in enumerate(records):
        annos[0, i] = (np.array([[1]], np.uint8), np.array([[2]], np.uint8), np.array([[38]], np.uint8),
                       np.array([[28]], np.uint8), np.array([[cls]], np.uint8), np.array([fname]))
    return annos


def make_cars(tmp: Path, train_per_class=(5, 4, 5, 5), test_per_class: int = 3,
              torchvision_layout: bool = False, seed: int = 3) -> Fixture:
    """The devkit layout (test annotations at the root) under ``tmp`` (or tmp/stanford_cars)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    base = tmp / "stanford_cars" if torchvision_layout else tmp
    (base / "devkit").mkdir(parents=True)
    splits, colour = {}, {}
    for split, counts in (("train", train_per_class), ("test", [test_per_class] * len(CARS_CLASSES))):
        labels = np.concatenate([[c] * n for c, n in enumerate(counts)])
        labels = labels[rng.permutation(len(labels))]
        records, splits[split] = [], []
        for i, c in enumerate(labels, 1):
            fname = f"{i:05d}.jpg"
            path = base / f"cars_{split}" / fname
            write_image(path, int(c), rng, _size(rng))
            records.append((fname, int(c) + 1))
            splits[split].append((str(path), int(c)))
            colour[str(path)] = int(c)
        target = base / "devkit" / "cars_train_annos.mat" if split == "train" else base / "cars_test_annos_withlabels.mat"
        savemat(str(target), {"annotations": _cars_annos(records)})
    names = np.empty((1, len(CARS_CLASSES)), dtype=object)
    names[0, :] = CARS_CLASSES
    savemat(str(base / "devkit" / "cars_meta.mat"), {"class_names": names})
    return Fixture(root=tmp, base=base, splits=splits, class_names=list(CARS_CLASSES), colour=colour)


# --------------------------------------------------------------------------- Flowers-102


def make_flowers(tmp: Path, classes: int = 3, per_split=(3, 2, 4), torchvision_layout: bool = False,
                 seed: int = 4) -> Fixture:
    """jpg/image_XXXXX.jpg, imagelabels.mat (1-based), setid.mat with shuffled image ids."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    base = tmp / "flowers-102" if torchvision_layout else tmp
    n_total = classes * sum(per_split)
    ids = rng.permutation(n_total) + 1  # image ids 1..N in a random order
    labels = np.zeros(n_total, dtype=np.uint8)  # 1-based label of image id i at labels[i - 1]
    splits, colour, setid = {}, {}, {}
    pos = 0
    for split, key, n in zip(("train", "val", "test"), ("trnid", "valid", "tstid"), per_split):
        split_ids = ids[pos:pos + classes * n]
        pos += classes * n
        for k, image_id in enumerate(split_ids):
            labels[image_id - 1] = k % classes + 1
        split_ids = np.sort(split_ids) if split == "test" else split_ids  # any order is allowed
        setid[key] = split_ids.astype(np.uint16)[None, :]
        splits[split] = []
        for image_id in split_ids:
            c = int(labels[image_id - 1]) - 1
            path = base / "jpg" / f"image_{image_id:05d}.jpg"
            write_image(path, c, rng, _size(rng))
            splits[split].append((str(path), c))
            colour[str(path)] = c
    savemat(str(base / "imagelabels.mat"), {"labels": labels[None, :]})
    savemat(str(base / "setid.mat"), setid)
    return Fixture(root=tmp, base=base, splits=splits, colour=colour,
                   class_names=[f"class_{c:03d}" for c in range(1, classes + 1)])


# --------------------------------------------------------------------------- image folders

IMAGEFOLDER_CLASSES = ["wren", "finch", "sparrow"]  # sorted: finch, sparrow, wren


def make_imagefolder(tmp: Path, with_val: bool, per_split=(5, 2, 3), seed: int = 5,
                     classes=IMAGEFOLDER_CLASSES) -> Fixture:
    """train/ val/ test/ of class folders; one PNG per train class and a stray non-image file."""
    rng = np.random.default_rng(seed)
    base = tmp / "folders"
    order = sorted(classes)
    splits, colour = {}, {}
    names = ("train", "val", "test") if with_val else ("train", "test")
    counts = dict(zip(("train", "val", "test"), per_split))
    for split in names:
        splits[split] = []
        for cname in order:  # the builder lists classes in sorted order, files sorted within
            c = order.index(cname)
            files = []
            for j in range(counts[split]):
                ext = "png" if (split == "train" and j == 0) else "jpg"
                files.append(base / split / cname / f"img_{j:02d}.{ext}")
            for path in sorted(files, key=lambda p: p.name):
                write_image(path, c, rng, _size(rng), fmt="PNG" if path.suffix == ".png" else "JPEG")
                splits[split].append((str(path), c))
                colour[str(path)] = c
            (base / split / cname / "notes.txt").write_text("not an image\n")
    return Fixture(root=base, base=base, splits=splits, class_names=order, colour=colour)
