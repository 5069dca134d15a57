"""Real fine-grained datasets read from a local folder (``data.root``); nothing is downloaded.

=========================  ==================================================================
name                       layout under ``data.root``
=========================  ==================================================================
``cub``                    CUB_200_2011/ (or its parent): images.txt, train_test_split.txt,
                           image_class_labels.txt, classes.txt, images/<class>/<file>.jpg
``aircraft``               fgvc-aircraft-2013b/ (or its parent, or its data/ folder):
``aircraft_family``        data/images/<id>.jpg, data/images_<level>_{train,val,test}.txt,
``aircraft_manufacturer``  data/{variants,families,manufacturers}.txt; level variant
                           (``aircraft``; or ``data.level`` when the config has that field),
                           family or manufacturer. The 20 px copyright banner at the bottom
                           of every image is cropped off.
``cars``                   Stanford Cars devkit layout (or torchvision's stanford_cars/):
                           cars_train/, cars_test/, devkit/cars_meta.mat,
                           devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat
                           (also accepted inside devkit/)
``flowers``                Flowers-102 (or torchvision's flowers-102/): jpg/image_NNNNN.jpg,
                           imagelabels.mat, setid.mat (trnid / valid / tstid)
``nabirds``                nabirds/ (or its parent): images.txt, train_test_split.txt,
                           image_class_labels.txt, classes.txt, images/<dir>/<file>.jpg;
                           the sparse class ids with images map to 0..K-1 in id order
``imagefolder``            train/<class>/<image>, test/<class>/<image>, optional val/<class>/
=========================  ==================================================================

Official validation splits are used where they exist (aircraft, flowers, imagefolder with
val/); otherwise a stratified ``data.val_fraction`` of the training split is held out with
``data.split_seed``. ``data.limit_per_class`` caps the training images per class.
Decoding, transforms and the optional in-memory cache are in :mod:`carrot.data._images`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from carrot.data import DatasetError, DatasetSplits, ImageSpec, register_dataset
from carrot.data._images import (
    IMAGE_EXTENSIONS, check_root, make_splits, pick_root, read_lines, read_rows, require,
)

SHOWN = 5  # ids named in a metadata-consistency error


def _few(items) -> str:
    items = list(items)
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(str(x) for x in items[:SHOWN]) + more


# --------------------------------------------------------------------------- CUB, NABirds

CUB_FILES = ("images.txt", "train_test_split.txt", "image_class_labels.txt", "classes.txt", "images/")
CUB_LAYOUT = "the official CUB_200_2011 layout"
NABIRDS_LAYOUT = "the official NABirds layout"


def _unique_rows(dataset: str, path: Path) -> dict[str, str]:
    """``id value`` rows as a mapping; an id listed twice is a DatasetError (a mapping would keep
    the last row and drop the other image or class without a word)."""
    rows: dict[str, str] = {}
    for i, value in read_rows(dataset, path, 2):
        if i in rows:
            raise DatasetError(f"{dataset}: {path} lists id {i} twice; expected each id once")
        rows[i] = value
    return rows


def _read_listing(dataset: str, root: Path, strip_prefix: bool, info: dict[str, str]):
    """CUB-style metadata (images / split / labels / classes) -> paths and contiguous labels."""
    images = _unique_rows(dataset, root / "images.txt")
    split = _unique_rows(dataset, root / "train_test_split.txt")
    labels = _unique_rows(dataset, root / "image_class_labels.txt")
    names = _unique_rows(dataset, root / "classes.txt")
    if not images:
        raise DatasetError(f"{dataset}: {root / 'images.txt'} lists no images")
    for fname, table in (("train_test_split.txt", split), ("image_class_labels.txt", labels)):
        absent = [i for i in images if i not in table]
        if absent:
            raise DatasetError(f"{dataset}: {root / fname} has no entry for image id(s) {_few(absent)} "
                               f"of images.txt")
    unknown = sorted({labels[i] for i in images} - set(names))
    if unknown:
        raise DatasetError(f"{dataset}: {root / 'image_class_labels.txt'} uses class id(s) {_few(unknown)} "
                           f"missing from classes.txt")
    bad = sorted({split[i] for i in images} - {"0", "1"})
    if bad:
        raise DatasetError(f"{dataset}: {root / 'train_test_split.txt'}: expected 1 (train) or 0 (test), "
                           f"got {_few(bad)}")

    def key(c: str):
        return (0, int(c), c) if c.lstrip("-").isdigit() else (1, 0, c)

    used = sorted({labels[i] for i in images}, key=key)  # classes with images, in id order
    index = {c: k for k, c in enumerate(used)}
    class_names = [re.sub(r"^\d+\.", "", names[c]) if strip_prefix else names[c] for c in used]
    parts: dict[str, tuple[list[str], list[int]]] = {"1": ([], []), "0": ([], [])}
    for i, rel in images.items():
        paths, ys = parts[split[i]]
        paths.append(str(root / "images" / rel))
        ys.append(index[labels[i]])
    train = (parts["1"][0], np.asarray(parts["1"][1], dtype=np.int64))
    test = (parts["0"][0], np.asarray(parts["0"][1], dtype=np.int64))
    info = {**info, "class_ids": ",".join(used) if len(used) <= 50 else f"{len(used)} ids"}
    return class_names, train, test, info


@register_dataset("cub")
def build_cub(cfg, spec: ImageSpec) -> DatasetSplits:
    layout = f"{CUB_LAYOUT}: {', '.join(CUB_FILES)}"
    root = pick_root(check_root("cub", cfg.root, layout), "images.txt", ["CUB_200_2011"])
    require("cub", root, CUB_FILES, CUB_LAYOUT)
    class_names, train, test, info = _read_listing("cub", root, strip_prefix=True, info={})
    return make_splits("cub", cfg, spec, root, class_names, train, test, info=info)


@register_dataset("nabirds")
def build_nabirds(cfg, spec: ImageSpec) -> DatasetSplits:
    layout = f"{NABIRDS_LAYOUT}: {', '.join(CUB_FILES)} (hierarchy.txt optional)"
    root = pick_root(check_root("nabirds", cfg.root, layout), "images.txt", ["nabirds"])
    require("nabirds", root, CUB_FILES, NABIRDS_LAYOUT)
    class_names, train, test, info = _read_listing("nabirds", root, strip_prefix=False, info={})
    return make_splits("nabirds", cfg, spec, root, class_names, train, test, info=info)


# --------------------------------------------------------------------------- FGVC-Aircraft

AIRCRAFT_LEVELS = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
AIRCRAFT_BANNER = 20  # px of copyright banner at the bottom of every image


def _aircraft_files(level: str) -> tuple[str, ...]:
    return ("data/images/", *(f"data/images_{level}_{s}.txt" for s in ("train", "val", "test")),
            f"data/{AIRCRAFT_LEVELS[level]}")


def _build_aircraft(cfg, spec: ImageSpec, name: str, level: str) -> DatasetSplits:
    if level not in AIRCRAFT_LEVELS:
        raise DatasetError(f"{name}: unknown level {level!r}; expected one of {', '.join(AIRCRAFT_LEVELS)}")
    files = _aircraft_files(level)
    layout = f"the fgvc-aircraft-2013b layout: {', '.join(files)}"
    path = check_root(name, cfg.root, layout)
    if (path / "images").is_dir() and (path / AIRCRAFT_LEVELS[level]).is_file():
        path = path.parent  # root points at fgvc-aircraft-2013b/data
    root = pick_root(path, "data", ["fgvc-aircraft-2013b"])
    require(name, root, files, "the fgvc-aircraft-2013b layout")
    data = root / "data"
    class_names = [line for _, line in read_lines(name, data / AIRCRAFT_LEVELS[level])]
    index = {c: k for k, c in enumerate(class_names)}
    parts = {}
    for split in ("train", "val", "test"):
        listing = data / f"images_{level}_{split}.txt"
        rows = read_rows(name, listing, 2)
        unknown = sorted({c for _, c in rows} - set(index))
        if unknown:
            raise DatasetError(f"{name}: {listing} uses class name(s) {_few(unknown)} missing from "
                               f"{data / AIRCRAFT_LEVELS[level]}")
        parts[split] = ([str(data / "images" / f"{i}.jpg") for i, _ in rows],
                        np.asarray([index[c] for _, c in rows], dtype=np.int64))
    return make_splits(name, cfg, spec, root, class_names, parts["train"], parts["test"], val=parts["val"],
                       crop_bottom=AIRCRAFT_BANNER, info={"level": level})


@register_dataset("aircraft")
def build_aircraft(cfg, spec: ImageSpec) -> DatasetSplits:
    return _build_aircraft(cfg, spec, "aircraft", getattr(cfg, "level", None) or "variant")


@register_dataset("aircraft_family")
def build_aircraft_family(cfg, spec: ImageSpec) -> DatasetSplits:
    return _build_aircraft(cfg, spec, "aircraft_family", "family")


@register_dataset("aircraft_manufacturer")
def build_aircraft_manufacturer(cfg, spec: ImageSpec) -> DatasetSplits:
    return _build_aircraft(cfg, spec, "aircraft_manufacturer", "manufacturer")


# --------------------------------------------------------------------------- Stanford Cars

CARS_FILES = ("cars_train/", "cars_test/", "devkit/cars_meta.mat", "devkit/cars_train_annos.mat",
              "cars_test_annos_withlabels.mat")
CARS_LAYOUT = "the Stanford Cars devkit layout"


def _loadmat(name: str, path: Path) -> dict:
    from scipy.io import loadmat

    try:
        return loadmat(str(path), squeeze_me=True)
    except Exception as exc:  # scipy raises several kinds on a corrupt or non-.mat file
        raise DatasetError(f"{name}: cannot read {path}: {exc}") from exc


def _mat_field(name: str, path: Path, mat: dict, key: str) -> np.ndarray:
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetError(f"{name}: {path} has no variable {key!r} (found {found})")
    return np.atleast_1d(mat[key])


def _cars_annotations(path: Path, images: Path, k: int) -> tuple[list[str], np.ndarray]:
    anns = _mat_field("cars", path, _loadmat("cars", path), "annotations")
    if anns.dtype.names is None or not {"fname", "class"} <= set(anns.dtype.names):
        raise DatasetError(f"cars: {path}: 'annotations' must be a struct array with fields fname and class")
    paths = [str(images / str(a["fname"]).strip()) for a in anns]
    labels = _integers("cars", path, "class", np.asarray([np.asarray(a["class"]).item() for a in anns])) - 1
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise DatasetError(f"cars: {path}: class ids outside 1..{k} (cars_meta.mat has {k} class names)")
    return paths, labels


@register_dataset("cars")
def build_cars(cfg, spec: ImageSpec) -> DatasetSplits:
    layout = f"{CARS_LAYOUT}: {', '.join(CARS_FILES)}"
    root = pick_root(check_root("cars", cfg.root, layout), "devkit", ["stanford_cars"])
    test_annos = root / "devkit" / "cars_test_annos_withlabels.mat"
    files = CARS_FILES if not test_annos.is_file() else CARS_FILES[:-1]
    require("cars", root, files, CARS_LAYOUT)
    if not test_annos.is_file():
        test_annos = root / "cars_test_annos_withlabels.mat"
    meta_path = root / "devkit" / "cars_meta.mat"
    class_names = [str(c).strip() for c in _mat_field("cars", meta_path, _loadmat("cars", meta_path),
                                                         "class_names")]
    k = len(class_names)
    train = _cars_annotations(root / "devkit" / "cars_train_annos.mat", root / "cars_train", k)
    test = _cars_annotations(test_annos, root / "cars_test", k)
    return make_splits("cars", cfg, spec, root, class_names, train, test)


# --------------------------------------------------------------------------- Flowers-102

FLOWERS_FILES = ("jpg/", "imagelabels.mat", "setid.mat")
# Flowers-102 ships no class names; these are the names in common use for labels 1..102
# (e.g. github.com/jimgoo/caffe-oxford102), used only when there are exactly 102 classes.
FLOWER_NAMES = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon",
    "colt's foot", "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower",
    "peruvian lily", "balloon flower", "giant white arum lily", "fire lily", "pincushion flower",
    "fritillary", "red ginger", "grape hyacinth", "corn poppy", "prince of wales feathers",
    "stemless gentian", "artichoke", "sweet william", "carnation", "garden phlox", "love in the mist",
    "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort",
    "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura",
    "geranium", "orange dahlia", "pink-yellow dahlia", "cautleya spicata", "japanese anemone",
    "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani",
    "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen",
    "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper",
    "blackberry lily",
]


def _integers(dataset: str, path: Path, field: str, values: np.ndarray) -> np.ndarray:
    """A .mat field of whole numbers as int64; a fractional one is a DatasetError (a cast would
    truncate 1.5 to class 1 without a word)."""
    values = np.asarray(values)
    if values.dtype.kind == "f" and not np.array_equal(values, np.floor(values)):
        bad = values[values != np.floor(values)]
        raise DatasetError(f"{dataset}: {path}: {field} holds non-integer value(s) {_few(bad.tolist())}; "
                           "expected whole numbers")
    return values.astype(np.int64)


@register_dataset("flowers")
def build_flowers(cfg, spec: ImageSpec) -> DatasetSplits:
    layout = f"the Flowers-102 layout: {', '.join(FLOWERS_FILES)}"
    root = pick_root(check_root("flowers", cfg.root, layout), "imagelabels.mat", ["flowers-102", "flowers102"])
    require("flowers", root, FLOWERS_FILES, "the Flowers-102 layout")
    labels_path, setid_path = root / "imagelabels.mat", root / "setid.mat"
    labels = _integers("flowers", labels_path, "labels",
                       _mat_field("flowers", labels_path, _loadmat("flowers", labels_path), "labels"))
    setid = _loadmat("flowers", setid_path)
    if labels.min() < 1:
        raise DatasetError(f"flowers: {labels_path}: labels must be 1-based, found {labels.min()}")
    k = int(labels.max())
    class_names = FLOWER_NAMES if k == len(FLOWER_NAMES) else [f"class_{c:03d}" for c in range(1, k + 1)]
    parts = {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        ids = _integers("flowers", setid_path, key, _mat_field("flowers", setid_path, setid, key))
        bad = ids[(ids < 1) | (ids > len(labels))]
        if len(bad):
            raise DatasetError(f"flowers: {setid_path}: {key} has image id(s) {_few(bad.tolist())} outside "
                               f"1..{len(labels)} (imagelabels.mat)")
        parts[split] = ([str(root / "jpg" / f"image_{i:05d}.jpg") for i in ids], labels[ids - 1] - 1)
    return make_splits("flowers", cfg, spec, root, class_names, parts["train"], parts["test"], val=parts["val"])


# --------------------------------------------------------------------------- image folders

IMAGEFOLDER_LAYOUT = "train/<class>/<image>, test/<class>/<image>, optional val/<class>/<image>"


def _scan(folder: Path) -> dict[str, list[str]]:
    """Class folder name -> sorted image paths (searched recursively) under ``folder``."""
    out = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            files = []
            for dirpath, dirnames, filenames in os.walk(entry.path):
                dirnames.sort()
                files += [os.path.join(dirpath, f) for f in sorted(filenames)
                          if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
            out[entry.name] = files
    return out


@register_dataset("imagefolder")
def build_imagefolder(cfg, spec: ImageSpec) -> DatasetSplits:
    root = check_root("imagefolder", cfg.root, IMAGEFOLDER_LAYOUT)
    require("imagefolder", root, ("train/", "test/"), f"the image-folder layout ({IMAGEFOLDER_LAYOUT})")
    train_dirs = _scan(root / "train")
    if not train_dirs:
        raise DatasetError(f"imagefolder: {root / 'train'} has no class folders (expected {IMAGEFOLDER_LAYOUT})")
    empty = [c for c, files in train_dirs.items() if not files]
    if empty:
        raise DatasetError(f"imagefolder: class folder(s) {_few('train/' + c for c in empty)} under {root} "
                           f"hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    class_names = sorted(train_dirs)
    index = {c: k for k, c in enumerate(class_names)}

    def split(name: str) -> tuple[list[str], np.ndarray]:
        dirs = train_dirs if name == "train" else _scan(root / name)
        unknown = sorted(set(dirs) - set(index))
        if unknown:
            raise DatasetError(f"imagefolder: {root / name} has class folder(s) {_few(unknown)} absent from "
                               f"{root / 'train'} (the classes are the train/ folders)")
        paths = [p for c in class_names for p in dirs.get(c, [])]
        labels = np.asarray([index[c] for c in class_names for _ in dirs.get(c, [])], dtype=np.int64)
        return paths, labels

    val = split("val") if (root / "val").is_dir() else None
    return make_splits("imagefolder", cfg, spec, root, class_names, split("train"), split("test"), val=val)
