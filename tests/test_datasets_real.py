"""Real FGVC dataset builders on tiny fixture trees in the official layouts (no downloads)."""
from __future__ import annotations

import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from carrot.config import DataConfig
from carrot.data import DatasetError, ImageSpec, build_dataset, list_datasets
from carrot.data._images import FGVC_CROP_PCT, ImageFileDataset, ImageLoader, resolve_sizes
from carrot.data.fgvc import FLOWER_NAMES

from fixtures_fgvc import (
    AIRCRAFT, BANNER, PALETTE, Fixture, make_aircraft, make_cars, make_cub, make_flowers,
    make_imagefolder, make_nabirds,
)

SIZE = 16
SPEC = ImageSpec(input_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 interpolation="bilinear", crop_pct=0.95)
REAL = ["cub", "aircraft", "aircraft_family", "aircraft_manufacturer", "cars", "flowers", "nabirds", "imagefolder"]


def cfg_for(name: str, root, **kw) -> DataConfig:
    kw.setdefault("image_size", SIZE)
    kw.setdefault("val_fraction", 0.25)
    kw.setdefault("augment", "basic")
    return DataConfig(name=name, root=None if root is None else str(root), **kw)


MAKERS = {
    "cub": make_cub,
    "nabirds": make_nabirds,
    "aircraft": make_aircraft,
    "cars": make_cars,
    "cars_torchvision": lambda tmp: make_cars(tmp, torchvision_layout=True),
    "flowers": make_flowers,
    "flowers_torchvision": lambda tmp: make_flowers(tmp, torchvision_layout=True),
    "imagefolder": lambda tmp: make_imagefolder(tmp, with_val=False),
    "imagefolder_val": lambda tmp: make_imagefolder(tmp, with_val=True),
}
OFFICIAL_VAL = {"aircraft", "flowers", "flowers_torchvision", "imagefolder_val"}


def dataset_name(key: str) -> str:
    return key.split("_")[0]


def colour_index(x: torch.Tensor, spec: ImageSpec = SPEC) -> int:
    """Nearest PALETTE entry to the mean colour of a normalised image tensor."""
    mean = torch.tensor(spec.mean)[:, None, None]
    std = torch.tensor(spec.std)[:, None, None]
    rgb = ((x * std + mean).clamp(0, 1) * 255).mean(dim=(1, 2)).numpy()
    return int(np.argmin([np.abs(rgb - np.array(p)).sum() for p in PALETTE]))


def as_pairs(ds: ImageFileDataset) -> list[tuple[str, int]]:
    return [(p, int(y)) for p, y in zip(ds.paths, ds.labels)]


# --------------------------------------------------------------------------- every dataset


def test_registry_lists_the_real_datasets():
    assert set(REAL) <= set(list_datasets())


@pytest.mark.parametrize("key", list(MAKERS))
def test_splits_match_the_metadata(tmp_path, key):
    fx: Fixture = MAKERS[key](tmp_path)
    splits = build_dataset(cfg_for(dataset_name(key), fx.root), SPEC)
    assert splits.num_classes == len(fx.class_names)
    assert splits.class_names == fx.class_names
    assert as_pairs(splits.test) == fx.splits["test"]  # exact order and labels
    if key in OFFICIAL_VAL:
        assert as_pairs(splits.train) == fx.splits["train"]
        assert as_pairs(splits.val) == fx.splits["val"]
    else:  # val held out of the official train split: together they are exactly that split
        assert set(splits.train.paths).isdisjoint(splits.val.paths)
        assert sorted(as_pairs(splits.train) + as_pairs(splits.val)) == sorted(fx.splits["train"])
        assert len(splits.val) > 0
    for split in ("train", "val", "test"):
        ds = getattr(splits, split)
        assert splits.labels[split].dtype == np.int64
        np.testing.assert_array_equal(splits.labels[split], ds.labels)
        assert len(splits.labels[split]) == len(ds)


@pytest.mark.parametrize("key", ["cub", "nabirds", "aircraft", "cars", "flowers", "imagefolder"])
def test_items_are_the_listed_images_as_tensors(tmp_path, key):
    fx = MAKERS[key](tmp_path)
    splits = build_dataset(cfg_for(dataset_name(key), fx.root), SPEC)
    for split in ("train", "val", "test"):
        ds = getattr(splits, split)
        for i in range(len(ds)):
            x, y = ds[i]
            assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
            assert x.shape == (3, SIZE, SIZE)
            assert isinstance(y, int) and y == splits.labels[split][i]
            assert colour_index(x) == fx.colour[ds.paths[i]], (split, i, ds.paths[i])
    batch_x, batch_y = next(iter(DataLoader(splits.train, batch_size=4, shuffle=True, num_workers=0)))
    assert batch_x.shape == (4, 3, SIZE, SIZE) and batch_x.dtype == torch.float32
    assert batch_y.dtype == torch.int64


def test_image_size_defaults_to_the_backbone_input_size(tmp_path):
    fx = make_cub(tmp_path)
    spec = ImageSpec(input_size=24)
    splits = build_dataset(cfg_for("cub", fx.root, image_size=None), spec)
    assert splits.test[0][0].shape == (3, 24, 24)
    assert splits.train[0][0].shape == (3, 24, 24)
    assert splits.info["resize_size"] == str(round(24 / FGVC_CROP_PCT))


def test_resize_size_follows_the_fgvc_convention():
    assert resolve_sizes(cfg_for("cub", "/x", image_size=448), SPEC) == (448, 512)
    assert resolve_sizes(cfg_for("cub", "/x", image_size=224), SPEC) == (224, 256)
    assert resolve_sizes(cfg_for("cub", "/x", image_size=448, resize_size=600), SPEC) == (448, 600)
    assert resolve_sizes(cfg_for("cub", "/x", image_size=None), ImageSpec(input_size=320)) == (320, 366)
    with pytest.raises(DatasetError, match="resize_size"):
        resolve_sizes(cfg_for("cub", "/x", image_size=448, resize_size=400), SPEC)


# --------------------------------------------------------------------------- val hold-out, limits


def test_holdout_is_stratified_and_deterministic(tmp_path):
    fx = make_cub(tmp_path, train_per_class=(8, 8, 4, 12))
    cfg = cfg_for("cub", fx.root, val_fraction=0.25, split_seed=7)
    a, b = build_dataset(cfg, SPEC), build_dataset(cfg, SPEC)
    assert a.val.paths == b.val.paths and a.train.paths == b.train.paths
    assert Counter(a.labels["val"].tolist()) == {0: 2, 1: 2, 2: 1, 3: 3}  # 25 % of every class
    assert Counter(a.labels["train"].tolist()) == {0: 6, 1: 6, 2: 3, 3: 9}
    others = {tuple(build_dataset(cfg_for("cub", fx.root, val_fraction=0.25, split_seed=s), SPEC).val.paths)
              for s in (0, 1, 2)}
    assert len(others | {tuple(a.val.paths)}) > 1  # the seed changes the partition


def test_limit_per_class_caps_training_images_only(tmp_path):
    fx = make_cars(tmp_path)
    full = build_dataset(cfg_for("cars", fx.root), SPEC)
    capped = build_dataset(cfg_for("cars", fx.root, limit_per_class=2), SPEC)
    assert Counter(capped.labels["train"].tolist()) == {c: 2 for c in range(4)}
    assert set(capped.train.paths) <= set(full.train.paths)
    assert capped.val.paths == full.val.paths and capped.test.paths == full.test.paths


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", REAL)
def test_unset_or_missing_root_is_a_clear_error(tmp_path, name):
    with pytest.raises(DatasetError, match=rf"^{name}: data.root is not set"):
        build_dataset(cfg_for(name, None), SPEC)
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as info:
        build_dataset(cfg_for(name, missing), SPEC)
    assert str(info.value).startswith(f"{name}: ") and str(missing) in str(info.value)
    assert "does not exist" in str(info.value)


# (fixture, dataset, file to delete relative to the fixture base, text the message must hold)
MISSING_METADATA = [
    ("cub", "cub", "train_test_split.txt", "missing train_test_split.txt"),
    ("cub", "cub", "classes.txt", "missing classes.txt"),
    ("cub", "cub", "images", "missing images/"),
    ("nabirds", "nabirds", "image_class_labels.txt", "missing image_class_labels.txt"),
    ("aircraft", "aircraft", "data/images_variant_val.txt", "missing data/images_variant_val.txt"),
    ("aircraft", "aircraft_family", "data/families.txt", "missing data/families.txt"),
    ("aircraft", "aircraft_manufacturer", "data/images_manufacturer_test.txt",
     "missing data/images_manufacturer_test.txt"),
    ("cars", "cars", "devkit/cars_meta.mat", "missing devkit/cars_meta.mat"),
    ("cars", "cars", "cars_test_annos_withlabels.mat", "missing cars_test_annos_withlabels.mat"),
    ("cars", "cars", "cars_test", "missing cars_test/"),
    ("flowers", "flowers", "setid.mat", "missing setid.mat"),
    ("imagefolder", "imagefolder", "test", "missing test/"),
]


@pytest.mark.parametrize("key,name,rel,needle", MISSING_METADATA)
def test_incomplete_root_names_the_missing_metadata(tmp_path, key, name, rel, needle):
    fx = MAKERS[key](tmp_path)
    target = fx.base / rel
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DatasetError) as info:
        build_dataset(cfg_for(name, fx.root), SPEC)
    msg = str(info.value)
    assert msg.startswith(f"{name}: {fx.base} is incomplete"), msg
    assert needle in msg, msg
    assert "expected" in msg


def test_cub_error_lists_every_missing_file_and_the_layout(tmp_path):
    fx = make_cub(tmp_path)
    (fx.base / "images.txt").unlink()
    (fx.base / "train_test_split.txt").unlink()
    with pytest.raises(DatasetError) as info:
        build_dataset(cfg_for("cub", fx.root), SPEC)
    assert str(info.value) == (
        f"cub: {fx.base} is incomplete: missing images.txt, train_test_split.txt (expected the official "
        "CUB_200_2011 layout: images.txt, train_test_split.txt, image_class_labels.txt, classes.txt, images/)"
    )


@pytest.mark.parametrize("key", ["cub", "nabirds", "aircraft", "cars", "flowers"])
def test_a_missing_listed_image_file_is_named(tmp_path, key):
    fx = MAKERS[key](tmp_path)
    gone = fx.paths("test")[1]
    Path(gone).unlink()
    name = dataset_name(key)
    with pytest.raises(DatasetError) as info:
        build_dataset(cfg_for(name, fx.root), SPEC)
    msg = str(info.value)
    assert msg.startswith(f"{name}: {fx.base} is incomplete: 1 of "), msg
    assert "listed image files are missing" in msg and Path(gone).name in msg, msg


def test_missing_image_error_names_only_the_first_few(tmp_path):
    fx = make_cub(tmp_path)
    for p in fx.paths("train")[:7]:
        Path(p).unlink()
    with pytest.raises(DatasetError) as info:
        build_dataset(cfg_for("cub", fx.root), SPEC)
    msg = str(info.value)
    assert "7 of" in msg and "and 2 more" in msg
    named = [Path(p).name for p in fx.paths("train")[:7] if Path(p).name in msg]
    assert len(named) == 5


def test_inconsistent_metadata_is_an_error(tmp_path):
    fx = make_cub(tmp_path)
    lines = (fx.base / "image_class_labels.txt").read_text().splitlines()
    (fx.base / "image_class_labels.txt").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DatasetError, match=r"image_class_labels.txt has no entry for image id\(s\) 1 "):
        build_dataset(cfg_for("cub", fx.root), SPEC)


@pytest.mark.parametrize("key, rel, line", [("cub", "classes.txt", 3), ("aircraft", "data/variants.txt", 2)])
def test_metadata_that_is_not_utf8_names_the_file_and_the_line(tmp_path, key, rel, line, capsys):
    """A Latin-1 class name in a metadata file was a UnicodeDecodeError traceback."""
    from carrot.cli import main

    fx = MAKERS[key](tmp_path)
    path = next(p for p in fx.root.rglob(Path(rel).name) if p.as_posix().endswith(rel))
    rows = path.read_bytes().splitlines(keepends=True)
    rows[line - 1] = rows[line - 1].rstrip(b"\n") + b" Gr\xfcn\n"
    path.write_bytes(b"".join(rows))
    with pytest.raises(DatasetError) as info:
        build_dataset(cfg_for(key, fx.root), SPEC)
    assert str(info.value) == (f"{dataset_name(key)}: {path} line {line}: byte 0xfc is not UTF-8; "
                               "expected the dataset's metadata as UTF-8 text")
    assert main(["train", "--dataset", dataset_name(key), "--data-root", str(fx.root), "--backbone",
                 "test_resnet", "--epochs", "1", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"carrot: error: {info.value}"


def test_an_image_id_listed_twice_is_named(tmp_path):
    """A second row with the same id in images.txt dropped one image and ignored its label
    without a word."""
    fx = make_cub(tmp_path)
    listing = fx.base / "images.txt"
    rows = listing.read_text().splitlines()
    rows[1] = "1 " + rows[1].split(" ", 1)[1]
    listing.write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError) as info:
        build_dataset(cfg_for("cub", fx.root), SPEC)
    assert str(info.value) == f"cub: {listing} lists id 1 twice; expected each id once"


def test_an_image_in_both_the_training_and_the_test_split_is_refused(tmp_path):
    """An aircraft image listed for train and for test trained and tested on the same picture."""
    fx = make_aircraft(tmp_path)
    data = next(fx.root.rglob("images_variant_train.txt")).parent
    train_first = (data / "images_variant_train.txt").read_text().splitlines()[0]
    test = (data / "images_variant_test.txt").read_text().splitlines()
    (data / "images_variant_test.txt").write_text("\n".join([train_first] + test[1:]) + "\n")
    with pytest.raises(DatasetError) as info:
        build_dataset(cfg_for("aircraft", fx.root), SPEC)
    image = data / "images" / f"{train_first.split()[0]}.jpg"
    assert str(info.value).startswith("aircraft: ") and str(info.value).endswith(
        f": 1 image(s) in both the train and the test split, first: {image}; expected disjoint splits "
        "(check the split metadata)")


def test_flowers_labels_that_are_not_whole_numbers_are_named(tmp_path):
    """Labels stored as 1.5, 2.5, ... were cast to 1, 2, ... without a word."""
    from scipy.io import loadmat, savemat

    fx = make_flowers(tmp_path)
    path = next(fx.root.rglob("imagelabels.mat"))
    labels = loadmat(str(path))["labels"].astype(np.float64)
    labels[0, 0] += 0.5
    savemat(str(path), {"labels": labels})
    with pytest.raises(DatasetError) as info:
        build_dataset(cfg_for("flowers", fx.root), SPEC)
    assert str(info.value) == (f"flowers: {path}: labels holds non-integer value(s) {labels[0, 0]}; "
                               "expected whole numbers")


def test_cars_class_ids_that_are_not_whole_numbers_are_named(tmp_path):
    """A class id stored as 1.5 was cast to class 1 without a word (as Flowers' labels were)."""
    from scipy.io import loadmat, savemat

    fx = make_cars(tmp_path)
    path = fx.base / "devkit" / "cars_train_annos.mat"
    anns = loadmat(str(path))["annotations"]
    anns[0, 0]["class"] = np.array([[1.5]])
    savemat(str(path), {"annotations": anns})
    with pytest.raises(DatasetError) as info:
        build_dataset(cfg_for("cars", fx.root), SPEC)
    assert str(info.value) == f"cars: {path}: class holds non-integer value(s) 1.5; expected whole numbers"


# --------------------------------------------------------------------------- per-dataset details


def test_cub_accepts_the_folder_or_its_parent(tmp_path):
    fx = make_cub(tmp_path)
    a = build_dataset(cfg_for("cub", fx.base), SPEC)
    b = build_dataset(cfg_for("cub", tmp_path), SPEC)
    assert a.test.paths == b.test.paths == fx.paths("test")
    assert a.class_names[0] == "Black_footed_Albatross"  # "001." prefix stripped


@pytest.mark.parametrize("name,level", [("aircraft", "variant"), ("aircraft_family", "family"),
                                        ("aircraft_manufacturer", "manufacturer")])
def test_aircraft_levels_map_to_the_right_labels(tmp_path, name, level):
    fx = make_aircraft(tmp_path)
    splits = build_dataset(cfg_for(name, fx.root), SPEC)
    names = fx.extra["names"][level]
    assert splits.class_names == names and splits.num_classes == len(names)
    assert splits.info["level"] == level
    for split in ("train", "val", "test"):
        ds = getattr(splits, split)
        assert ds.paths == fx.paths(split)  # same images at every level, official order
        assert splits.labels[split].tolist() == fx.extra["levels"][level][split]
    # each image's label is the family / manufacturer of its variant (the fixture colour)
    variants = list(AIRCRAFT)
    for p, y in as_pairs(splits.train):
        v = variants[fx.colour[p]]
        expected = {"variant": v, "family": AIRCRAFT[v][0], "manufacturer": AIRCRAFT[v][1]}[level]
        assert names[y] == expected


def test_aircraft_accepts_the_data_folder_and_the_parent(tmp_path):
    fx = make_aircraft(tmp_path)
    for root in (tmp_path, fx.base, fx.base / "data"):
        assert build_dataset(cfg_for("aircraft", root), SPEC).test.paths == fx.paths("test")


def test_aircraft_level_field_when_the_config_has_one(tmp_path):
    fx = make_aircraft(tmp_path)
    cfg = cfg_for("aircraft", fx.root)
    object.__setattr__(cfg, "level", "manufacturer")  # the proposed DataConfig.level
    splits = build_dataset(cfg, SPEC)
    assert splits.class_names == fx.extra["names"]["manufacturer"]
    object.__setattr__(cfg, "level", "model")
    with pytest.raises(DatasetError, match="unknown level 'model'"):
        build_dataset(cfg, SPEC)


def test_aircraft_banner_is_cropped(tmp_path):
    fx = make_aircraft(tmp_path)
    splits = build_dataset(cfg_for("aircraft", fx.root, image_size=20, resize_size=20), SPEC)
    img = splits.test.load(0)  # decoded + resized, before the crop: 40x50 image, 20 px banner -> 40x30
    assert img.size == (27, 20)
    arr = np.asarray(img).astype(int)
    assert np.abs(arr - np.array(BANNER)).sum(axis=-1).min() > 60  # no banner pixel left
    # without the crop the bottom rows would be white
    plain = np.asarray(ImageLoader(20, crop_bottom=0)(fx.paths("test")[0])).astype(int)
    assert np.abs(plain[-1] - np.array(BANNER)).sum(axis=-1).max() < 30


def test_cars_reads_the_mat_files(tmp_path):
    fx = make_cars(tmp_path)
    splits = build_dataset(cfg_for("cars", fx.root), SPEC)
    assert splits.class_names == fx.class_names
    assert Counter(splits.labels["test"].tolist()) == {c: 3 for c in range(4)}
    # test annotations inside devkit/ are accepted too
    (fx.base / "cars_test_annos_withlabels.mat").rename(fx.base / "devkit" / "cars_test_annos_withlabels.mat")
    assert build_dataset(cfg_for("cars", fx.root), SPEC).test.paths == fx.paths("test")


def test_flowers_names_and_layouts(tmp_path):
    assert len(FLOWER_NAMES) == 102 and len(set(FLOWER_NAMES)) == 102
    fx = make_flowers(tmp_path / "a")
    assert build_dataset(cfg_for("flowers", fx.root), SPEC).class_names == ["class_001", "class_002", "class_003"]
    fx2 = make_flowers(tmp_path / "b", torchvision_layout=True)
    splits = build_dataset(cfg_for("flowers", fx2.base), SPEC)  # root at flowers-102/ itself
    assert as_pairs(splits.val) == fx2.splits["val"]


def test_nabirds_sparse_ids_map_contiguously(tmp_path):
    fx = make_nabirds(tmp_path)
    splits = build_dataset(cfg_for("nabirds", fx.root), SPEC)
    assert splits.num_classes == 4  # 0, 22 (hierarchy nodes) and 1001 (no images) are dropped
    assert splits.class_names == ["Oak Titmouse", "Juniper Titmouse", "Bushtit", "Tufted Titmouse"]
    assert fx.extra["contiguous"] == {295: 0, 313: 1, 817: 2, 1000: 3}
    for split in ("train", "test"):
        assert set(splits.labels[split].tolist()) == {0, 1, 2, 3}
    for p, y in as_pairs(splits.test):
        cid = int(Path(p).parent.name)  # images/<zero-padded class id>/<file>
        assert y == fx.extra["contiguous"][cid]


def test_imagefolder_without_val_holds_out_train(tmp_path):
    fx = make_imagefolder(tmp_path, with_val=False)
    splits = build_dataset(cfg_for("imagefolder", fx.root, val_fraction=0.4, split_seed=3), SPEC)
    assert splits.class_names == ["finch", "sparrow", "wren"]
    assert Counter(splits.labels["val"].tolist()) == {0: 2, 1: 2, 2: 2}
    assert Counter(splits.labels["train"].tolist()) == {0: 3, 1: 3, 2: 3}
    assert any(p.endswith(".png") for p in splits.train.paths + splits.val.paths)
    assert not any(p.endswith(".txt") for p in splits.train.paths + splits.val.paths + splits.test.paths)
    assert splits.info["val"].startswith("stratified")


def test_imagefolder_with_val_uses_it(tmp_path):
    fx = make_imagefolder(tmp_path, with_val=True)
    splits = build_dataset(cfg_for("imagefolder", fx.root), SPEC)
    assert as_pairs(splits.val) == fx.splits["val"] and as_pairs(splits.train) == fx.splits["train"]
    assert splits.info["val"] == "official"


def test_imagefolder_test_class_absent_from_train_is_an_error(tmp_path):
    fx = make_imagefolder(tmp_path, with_val=False)
    shutil.copytree(fx.base / "test" / "wren", fx.base / "test" / "robin")
    with pytest.raises(DatasetError, match=r"test has class folder\(s\) robin absent from"):
        build_dataset(cfg_for("imagefolder", fx.root), SPEC)


def test_imagefolder_empty_train_class_is_an_error(tmp_path):
    fx = make_imagefolder(tmp_path, with_val=False)
    (fx.base / "train" / "empty").mkdir()
    with pytest.raises(DatasetError, match="train/empty"):
        build_dataset(cfg_for("imagefolder", fx.root), SPEC)


# --------------------------------------------------------------------------- transforms, cache, workers


def test_training_augmentation_varies_and_eval_is_deterministic(tmp_path):
    fx = make_cub(tmp_path)
    torch.manual_seed(0)
    splits = build_dataset(cfg_for("cub", fx.root, augment="basic"), SPEC)
    draws = [splits.train[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(splits.test[0][0], splits.test[0][0])
    # augment="none": training items are the deterministic centre crop too
    plain = build_dataset(cfg_for("cub", fx.root, augment="none"), SPEC)
    assert torch.equal(plain.train[0][0], plain.train[0][0])


def test_randaugment_adds_timm_rand_augment(tmp_path):
    from timm.data.auto_augment import RandAugment

    fx = make_cub(tmp_path)
    splits = build_dataset(cfg_for("cub", fx.root, augment="randaugment"), SPEC)
    assert any(isinstance(t, RandAugment) for t in splits.train.transform.transforms)
    assert not any(isinstance(t, RandAugment) for t in splits.val.transform.transforms)
    x, _ = splits.train[0]
    assert x.shape == (3, SIZE, SIZE)
    basic = build_dataset(cfg_for("cub", fx.root, augment="basic"), SPEC)
    assert not any(isinstance(t, RandAugment) for t in basic.train.transform.transforms)


def test_cache_holds_resized_uint8_and_gives_the_same_items(tmp_path):
    fx = make_cub(tmp_path)
    plain = build_dataset(cfg_for("cub", fx.root), SPEC)
    cached = build_dataset(cfg_for("cub", fx.root, cache=True), SPEC)
    assert not plain.test.cache and cached.test.cache
    for i in range(len(cached.test)):
        assert torch.equal(cached.test[i][0], plain.test[i][0])
    assert len(cached.test._cache) == len(cached.test)
    arr = cached.test._cache[0]
    assert arr.dtype == np.uint8 and arr.ndim == 3 and min(arr.shape[:2]) == round(SIZE / FGVC_CROP_PCT)
    assert cached.test.cache_bytes() == sum(a.nbytes for a in cached.test._cache.values())
    reference = plain.test[0][0]
    Path(fx.paths("test")[0]).unlink()  # served from memory now
    assert torch.equal(cached.test[0][0], reference)
    assert cached.train.fill_cache(threads=2) > 0 and len(cached.train._cache) == len(cached.train)
    assert plain.train.fill_cache() == 0 and not plain.train._cache


def test_every_randaugment_op_works_at_every_magnitude(tmp_path):
    fx = make_cub(tmp_path)
    splits = build_dataset(cfg_for("cub", fx.root, augment="randaugment"), SPEC)
    (ra,) = [t for t in splits.train.transform.transforms if type(t).__name__ == "RandAugment"]
    img = splits.train.load(0)
    for op in ra.ops:  # timm's PosterizeIncreasing asks for 0 bits at magnitude 10
        for magnitude in np.linspace(0, 10, 11):
            args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
            out = op.aug_fn(img, *args, **op.kwargs)
            assert out.size == img.size, op.name


@pytest.mark.parametrize("augment", ["basic", "randaugment"])
def test_datasets_pickle_for_worker_processes(tmp_path, augment):
    fx = make_aircraft(tmp_path)
    splits = build_dataset(cfg_for("aircraft", fx.root, augment=augment), SPEC)
    for ds in (splits.train, splits.test):
        clone = pickle.loads(pickle.dumps(ds))
        assert clone.paths == ds.paths and np.array_equal(clone.labels, ds.labels)
        assert clone[0][0].shape == (3, SIZE, SIZE)
    assert torch.equal(pickle.loads(pickle.dumps(splits.test))[2][0], splits.test[2][0])


def test_dataloader_with_a_worker_process(tmp_path):
    fx = make_flowers(tmp_path)
    splits = build_dataset(cfg_for("flowers", fx.root), SPEC)
    loader = DataLoader(splits.test, batch_size=len(splits.test), num_workers=1)
    x, y = next(iter(loader))
    assert x.shape == (len(splits.test), 3, SIZE, SIZE)
    assert y.tolist() == splits.labels["test"].tolist()


def test_loader_converts_to_rgb_and_uses_jpeg_draft(tmp_path):
    grey = tmp_path / "grey.jpg"
    Image.fromarray(np.full((400, 600), 128, np.uint8), "L").save(grey)
    img = ImageLoader(32)(str(grey))
    assert img.mode == "RGB" and img.size == (48, 32)
    big = tmp_path / "big.jpg"
    Image.fromarray(np.full((400, 600, 3), (200, 30, 30), np.uint8)).save(big)
    fast = np.asarray(ImageLoader(32)(str(big))).astype(int)
    slow = np.asarray(ImageLoader(32, draft=False)(str(big))).astype(int)
    assert fast.shape == slow.shape == (32, 48, 3) and np.abs(fast - slow).max() <= 6


def test_to_normalized_tensor_matches_torchvision():
    from torchvision import transforms as T

    from carrot.data._images import ToNormalizedTensor

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    ours = ToNormalizedTensor(SPEC.mean, SPEC.std)(img)
    ref = T.Compose([T.ToTensor(), T.Normalize(SPEC.mean, SPEC.std)])(img)
    assert ours.shape == (3, 30, 40) and ours.dtype == torch.float32 and ours.is_contiguous()
    assert torch.allclose(ours, ref, atol=1e-5)


def test_train_eval_is_the_training_items_with_the_eval_transform(tmp_path):
    fx = make_cub(tmp_path)
    splits = build_dataset(cfg_for("cub", fx.root, cache=True), SPEC)
    assert splits.train_eval is not splits.train
    assert splits.train_eval.paths == splits.train.paths
    np.testing.assert_array_equal(splits.train_eval.labels, splits.labels["train"])
    assert splits.train_eval.transform is splits.val.transform
    assert torch.equal(splits.train_eval[0][0], splits.train_eval[0][0])  # no augmentation
    assert splits.train_eval._cache is splits.train._cache  # one decoded copy


def test_an_unreadable_image_names_its_path(tmp_path):
    fx = make_cub(tmp_path)
    splits = build_dataset(cfg_for("cub", fx.root), SPEC)
    Path(splits.test.paths[0]).write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match="cannot read image .*" + Path(splits.test.paths[0]).name):
        splits.test[0]
