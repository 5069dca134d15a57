"""carrot.data.preflight: the dataset checks run before any training run exists."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carrot.config import DataConfig
from carrot.data import DatasetError, DatasetSplits, ImageSpec, build_dataset, preflight
from carrot.data._images import image_problem

from fixtures_fgvc import make_aircraft, make_imagefolder, write_image


def cfg_for(name: str, root=None, **kw) -> DataConfig:
    kw.setdefault("image_size", 16)
    kw.setdefault("val_fraction", 0.25)
    return DataConfig(name=name, root=None if root is None else str(root), **kw)


def folder(tmp_path: Path, **kw):
    fx = make_imagefolder(tmp_path, with_val=True, **kw)
    return fx, cfg_for("imagefolder", fx.root)


def truncate(path: str, fraction: float = 0.5) -> None:
    """Cut the file to ``fraction`` of its bytes (in a tiny JPEG that may cut into the header)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])


def cut_pixel_data(path: str) -> None:
    """Cut the file in the middle of its compressed pixel data: the whole header survives.

    JPEG: half-way into the entropy-coded data after the start-of-scan segment; PNG: half-way
    into the first IDAT chunk.
    """
    data = Path(path).read_bytes()
    if data[:2] == b"\xff\xd8":
        sos = data.index(b"\xff\xda")
        start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    else:
        start = data.index(b"IDAT") + 4
    assert len(data) - start > 100
    Path(path).write_bytes(data[: start + (len(data) - start) // 2])


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- classes


def test_one_class_imagefolder_is_an_error(tmp_path):
    fx, cfg = folder(tmp_path, classes=["wren"])
    splits = build_dataset(cfg, ImageSpec(input_size=16))  # builds (and would train at 100 %)
    assert splits.num_classes == 1
    with pytest.raises(DatasetError, match=r"training split has 1 class \(wren\).*at least 2 classes"):
        preflight(cfg)


def test_one_class_embedded_dataset_is_an_error():
    cfg = cfg_for("synthetic", synthetic_groups=1, synthetic_siblings=1, synthetic_per_class=20)
    with pytest.raises(DatasetError, match="at least 2 classes"):
        preflight(cfg)


def test_evaluated_class_without_training_images_is_an_error(tmp_path):
    fx = make_aircraft(tmp_path)
    listing = fx.base / "data" / "images_variant_train.txt"
    listing.write_text("".join(line + "\n" for line in listing.read_text().splitlines()
                               if not line.endswith(" A321")))
    cfg = cfg_for("aircraft", fx.root)
    splits = build_dataset(cfg, ImageSpec(input_size=16))
    assert fx.class_names.index("A321") not in splits.labels["train"]
    with pytest.raises(DatasetError, match=r"class\(es\) of the val split have no training images: A321"):
        preflight(cfg)


# --------------------------------------------------------------------------- image files


def test_good_fixture_passes_and_returns_the_splits(tmp_path):
    fx, cfg = folder(tmp_path)
    for verify in (False, True):
        splits = preflight(cfg, verify_images=verify)
        assert isinstance(splits, DatasetSplits)
        assert splits.num_classes == 3
        assert splits.train.paths == fx.paths("train")
        assert splits.test.paths == fx.paths("test")


def test_embedded_dataset_passes():
    splits = preflight(cfg_for("digits"), verify_images=True)
    assert splits.num_classes == 10


def test_garbage_file_named_jpg_is_named(tmp_path):
    fx, cfg = folder(tmp_path)
    bad = fx.paths("val")[1]
    Path(bad).write_bytes(b"this is not a JPEG" * 20)
    for verify in (False, True):
        with pytest.raises(DatasetError) as err:
            preflight(cfg, verify_images=verify)
        msg = str(err.value)
        assert f"1 unreadable image of {sum(len(v) for v in fx.splits.values())}" in msg
        assert f"first: {bad} (cannot identify image file)" in msg
        assert "expected readable image files" in msg


def test_empty_file_is_named(tmp_path):
    fx, cfg = folder(tmp_path)
    bad = fx.paths("test")[0]
    Path(bad).write_bytes(b"")
    with pytest.raises(DatasetError, match=f"first: {bad} "):
        preflight(cfg)


def test_jpeg_cut_in_half_is_named(tmp_path):
    fx, cfg = folder(tmp_path)
    bad = fx.paths("test")[1]
    truncate(bad)
    with pytest.raises(DatasetError) as err:
        preflight(cfg, verify_images=True)
    assert f"1 unreadable image of 30 (full decode), first: {bad} (" in str(err.value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_passes_the_header_check_and_fails_the_full_decode(tmp_path, fmt):
    """PIL's Image.open reads the header only: a file cut short after it still opens."""
    fx, cfg = folder(tmp_path)
    bad = next(p for p in fx.paths("train") if p.endswith(".png" if fmt == "PNG" else ".jpg"))
    cut_pixel_data(bad)
    with Image.open(bad) as img:  # the premise: the header is intact
        assert img.format == fmt and img.size in ((40, 30), (30, 40))
    assert image_problem(bad) is None
    preflight(cfg)  # the cheap check cannot see it
    with pytest.raises(DatasetError) as err:
        preflight(cfg, verify_images=True)
    msg = str(err.value)
    assert f"first: {bad} (" in msg and "truncated" in msg.lower()
    assert "full decode" in msg


def test_counts_every_bad_file_and_names_the_first(tmp_path):
    fx, cfg = folder(tmp_path)
    garbage = [fx.paths("train")[3], fx.paths("test")[2]]
    for p in garbage:
        Path(p).write_bytes(b"\x00" * 100)
    cut_pixel_data(fx.paths("val")[0])
    with pytest.raises(DatasetError, match=rf"2 unreadable images of \d+ \(header check\), first: {garbage[0]} "):
        preflight(cfg)
    with pytest.raises(DatasetError, match=rf"3 unreadable images of \d+ \(full decode\), first: {garbage[0]} "):
        preflight(cfg, verify_images=True)


def test_checks_are_read_only(tmp_path):
    fx, cfg = folder(tmp_path)
    cut_pixel_data(fx.paths("train")[1])
    truncate(fx.paths("val")[1])
    Path(fx.paths("test")[1]).write_bytes(b"garbage")
    before = snapshot(fx.root)
    for verify in (False, True):
        with pytest.raises(DatasetError):
            preflight(cfg, verify_images=verify)
    assert snapshot(fx.root) == before


def test_image_problem_on_a_fresh_image(tmp_path):
    path = tmp_path / "a.jpg"
    write_image(path, 0, np.random.default_rng(0))
    assert image_problem(str(path)) is None
    assert image_problem(str(path), full=True) is None
    assert image_problem(str(tmp_path / "missing.jpg")) == "No such file or directory"
