"""The run pictures (SVG, carrot.charts) read back: the heatmap's cells, the bars' lengths and the
lines' points are the numbers, recomputed here by slow loops from the confusion matrix and the
history."""
from __future__ import annotations

import base64
import io
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from carrot import charts, contract, run_report

NS = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def texts(root: ET.Element) -> list[ET.Element]:
    return list(root.iter(f"{NS}text"))


def heatmap_cells(root: ET.Element, k: int) -> np.ndarray:
    """The (k, k, 3) colours of the heatmap's cells, from the centre of each cell's pixel block."""
    from PIL import Image

    (image,) = [e for e in root.iter(f"{NS}image") if e.get("id") == "heatmap"]
    png = base64.b64decode(image.get("href").split(",", 1)[1])
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    h, w = pixels.shape[:2]
    assert h % k == 0 and w % k == 0  # whole pixel blocks per cell
    centres_y, centres_x = (np.arange(k) * (h // k) + h // k // 2), (np.arange(k) * (w // k) + w // k // 2)
    return pixels[centres_y][:, centres_x]


def axis_map(labels: list[ET.Element], coord: str) -> tuple[float, float]:
    """(offset, pixels per unit) of an axis, fitted through its numeric tick labels' positions."""
    values = np.array([float(t.text) for t in labels])
    positions = np.array([float(t.get(coord)) for t in labels])
    if coord == "y":  # a label's y is its middle plus 0.35 of its font size
        positions = positions - 0.35 * np.array([float(t.get("font-size")) for t in labels])
    slope, offset = np.polyfit(values, positions, 1)
    assert np.allclose(offset + slope * values, positions, atol=1e-2)  # the ticks are on one line (to 0.01 px)
    return offset, slope


def slow_rates(cm: np.ndarray) -> np.ndarray:
    out = np.zeros(cm.shape)
    for i in range(cm.shape[0]):
        n = sum(cm[i])
        for j in range(cm.shape[1]):
            out[i, j] = cm[i, j] / n if n else 0.0
    return out


def confusion_fixture(k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cm = rng.integers(0, 12, (k, k)) + np.diag(rng.integers(20, 60, k))
    cm[1, k - 2] = 40  # an asymmetric confusion, so a transposed heatmap shows
    cm[k - 1] = 0  # a class without samples: its row is 0, not NaN
    return cm


@pytest.mark.parametrize("k, named", [(6, True), (50, False)])
def test_heatmap_cells_are_the_row_normalised_confusion_in_viridis(k, named):
    from matplotlib import colormaps

    cm = confusion_fixture(k)
    names = [f"c{i}" for i in range(k)] if named else []
    root = parse(charts.confusion_matrix(cm, names, run_report.MAX_NAMED_CLASSES))
    expected = colormaps["viridis"](slow_rates(cm), bytes=True)[..., :3]
    assert np.array_equal(heatmap_cells(root, k), expected)
    labels = [t.text for t in texts(root)]
    assert labels.count("c2") == (2 if named else 0)  # both axes name every class up to the limit
    if not named:  # numbers at cell centres: tick "0" and tick "k" ... one cell apart per unit
        offset, per_class = axis_map([t for t in texts(root) if t.get("text-anchor") == "middle"
                                      and t.text.isdigit()], "x")
        (image,) = [e for e in root.iter(f"{NS}image") if e.get("id") == "heatmap"]
        cell = float(image.get("width")) / k
        assert per_class == pytest.approx(cell, rel=1e-3)
        assert offset == pytest.approx(float(image.get("x")) + cell / 2, abs=1e-2)


def test_class_names_with_markup_or_control_characters_stay_text():
    names = ["a<b", "R&D", 'say "x"', "bell\x07\x1b"]
    cm = confusion_fixture(4)
    svg = charts.confusion_matrix(cm, names, 40)
    found = [t.text for t in texts(parse(svg))]
    for name in names[:3] + ["bell\ufffd\ufffd"]:
        assert found.count(name) == 2


def test_pair_bars_are_the_pair_errors_in_percent():
    k = 12
    cm = confusion_fixture(k, seed=3)
    names = [f"n{i}" for i in range(k)]
    svg = run_report.pictures(cm, names, [], top_n=8)[run_report.PAIRS_IMAGE]
    root = parse(svg)
    bars = [e for e in root.iter(f"{NS}rect") if e.get("class") == "bar"]
    assert len(bars) == 8
    ticks = [t for t in texts(root) if t.get("text-anchor") == "middle" and t.text.replace(".", "").isdigit()]
    offset, per_percent = axis_map(ticks, "x")
    rows = sorted(((float(t.get("y")), t.text) for t in texts(root) if "↔" in (t.text or "")))
    bars = sorted(bars, key=lambda e: float(e.get("y")))
    n = cm.sum(axis=1)
    shown = []
    for (_, label), bar in zip(rows, bars):
        i, j = (names.index(part.strip()) for part in label.split("↔"))
        slow = 100 * (cm[i, j] + cm[j, i]) / (n[i] + n[j])
        assert float(bar.get("x")) == pytest.approx(offset, abs=1e-2)
        assert float(bar.get("width")) / per_percent == pytest.approx(slow, abs=0.01)
        shown.append((i, j))
    # the top pairs by S = C_ij + C_ji (share of each true class), worst on top
    share = cm / np.maximum(n[:, None], 1)
    score = {(i, j): share[i, j] + share[j, i] for i in range(k) for j in range(i + 1, k)}
    assert shown == sorted(score, key=lambda p: -score[p])[:8]


def test_trajectory_lines_are_the_history_and_a_nan_breaks_them():
    epochs = 7
    history = [{contract.PROTO_COS_REF: 0.2 + 0.05 * e, contract.PROTO_COS_TOP: 0.9 - 0.1 * e,
                contract.db_metric("layer4", "ref"): 3.0 + e * e} for e in range(epochs)]
    history[3][contract.PROTO_COS_TOP] = math.nan
    svg = run_report.pictures(confusion_fixture(5), [], history)[run_report.TRAJECTORY_IMAGE]
    root = parse(svg)
    lines = list(root.iter(f"{NS}polyline"))
    # reference pairs (one line), top pairs (two lines around the NaN), D_B of layer4 (one line)
    assert [len(p.get("points").split()) for p in lines] == [7, 3, 3, 7]
    labels = texts(root)
    panel_width = float(root.get("width")) / 2
    for panel, picks in ((0, (lines[0], lines[1], lines[2])), (1, (lines[3],))):
        in_panel = [t for t in labels if panel * panel_width <= float(t.get("x")) < (panel + 1) * panel_width]
        y_ticks = [t for t in in_panel if t.get("text-anchor") == "end" and _number(t.text)]
        x_ticks = [t for t in in_panel if t.get("text-anchor") == "middle" and (t.text or "").isdigit()]
        y0, per_y = axis_map(y_ticks, "y")
        x0, per_x = axis_map(x_ticks, "x")
        values = []
        for line in picks:
            for point in line.get("points").split():
                px, py = (float(v) for v in point.split(","))
                values.append((round((px - x0) / per_x), (py - y0) / per_y))
        if panel == 0:
            expected = [(e + 1, 0.2 + 0.05 * e) for e in range(epochs)] + \
                [(e + 1, 0.9 - 0.1 * e) for e in range(epochs) if e != 3]
        else:
            expected = [(e + 1, 3.0 + e * e) for e in range(epochs)]
            assert min(float(t.text) for t in y_ticks) == 0.0  # D_B from 0
        assert [v[0] for v in values] == [e for e, _ in expected]
        assert np.allclose([v[1] for v in values], [v for _, v in expected], atol=2e-3)
    assert {"reference pairs", "top pairs", "layer4"} <= {t.text for t in labels}
    assert "all pairs (mean)" not in {t.text for t in labels}  # a series never logged gets no legend


def _number(text: str | None) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def test_no_trajectory_picture_without_either_series_and_no_pairs_picture_without_confusion():
    history = [{"val/acc": 0.5}]
    diagonal = np.diag([5, 6, 7])
    pictures = run_report.pictures(diagonal, [], history)
    assert set(pictures) == {run_report.CONFUSION_IMAGE}


@pytest.mark.parametrize("lo, hi, integer", [(0, 1, False), (0, 4.2, False), (0.13, 0.61, False), (-3.5, 120, False),
                                             (1, 12, True), (1, 2, True), (0, 199, True), (2.0, 2.0009, False)])
def test_nice_ticks_are_evenly_spaced_round_steps_inside_the_range(lo, hi, integer):
    ticks = charts.nice_ticks(lo, hi, 6, integer=integer)
    assert 2 <= len(ticks) <= 7
    assert all(lo - 1e-12 <= t <= hi + 1e-12 for t in ticks)
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5))
    if integer:
        assert all(float(t).is_integer() for t in ticks)
    labels = [charts.tick_label(t, ticks) for t in ticks]
    assert len(set(labels)) == len(labels)  # enough decimals to tell the ticks apart
    assert np.allclose([float(s) for s in labels], ticks)


def test_viridis_is_matplotlibs_colour_for_every_value():
    from matplotlib import colormaps

    values = np.concatenate([np.linspace(0, 1, 4097), [0.0, 1.0, -0.5, 1.5, 255.5 / 256, 1 / 256 - 1e-12]])
    expected = colormaps["viridis"](values, bytes=True)[..., :3]
    assert np.array_equal(charts.viridis(values), expected)
    assert charts.viridis(np.array([np.nan])).tolist() == [[255, 255, 255]]  # no value: white


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 3)])
def test_png_decodes_to_the_pixels(shape):
    from PIL import Image

    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    decoded = Image.open(io.BytesIO(charts.png(rgb)))
    assert decoded.mode == "RGB" and decoded.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(decoded), rgb)


def test_long_class_names_are_shortened_on_the_pictures_only():
    names = ["a" * 100, "b" * 100, "c"]
    cm = np.array([[10, 3, 0], [2, 10, 0], [0, 0, 10]])
    pictures = run_report.pictures(cm, names, [], top_n=5)
    heat, bars = parse(pictures[run_report.CONFUSION_IMAGE]), parse(pictures[run_report.PAIRS_IMAGE])
    shown = [t.text for t in texts(heat)]
    assert shown.count("a" * 39 + "…") == 2 and "c" in shown
    assert [t.text for t in texts(bars) if "↔" in (t.text or "")] == ["a" * 39 + "… ↔ " + "b" * 39 + "…"]
    assert float(heat.get("width")) < 1200 and float(bars.get("width")) < 1200


def test_beyond_as_many_classes_as_pixels_a_cell_is_the_mean_of_a_block_of_classes():
    from matplotlib import colormaps

    k = 1200  # the matrix is drawn 560 px wide: blocks of 3 x 3 classes, 400 x 400 cells
    rng = np.random.default_rng(5)
    cm = rng.integers(0, 5, (k, k)) + np.diag(rng.integers(50, 100, k))
    svg = charts.confusion_matrix(cm, [], 40)
    assert len(svg) < 2_000_000  # one pixel a class would have been a 1200 x 1200 image
    rates = cm / cm.sum(axis=1, keepdims=True)
    means = rates.reshape(400, 3, 400, 3).mean(axis=(1, 3))
    assert np.array_equal(heatmap_cells(parse(svg), 400), colormaps["viridis"](means, bytes=True)[..., :3])
    uneven = charts.pooled(np.arange(25.0).reshape(5, 5), 2)  # blocks of 3: the last ones hold what is there
    assert uneven.tolist() == [[6.0, 8.5], [18.5, 21.0]]
