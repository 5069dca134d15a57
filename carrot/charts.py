"""A run's pictures as SVG written directly: the confusion matrix of its last epoch, its top
confusable pairs, and its prototype-cosine and D_B trajectories.

The MLflow UI shows ``.svg`` artifacts as images, and the browser lays out and antialiases
the text, so a picture is a few hundred elements of text, lines and one embedded PNG (the
heatmap, a block of whole pixels a cell, scaled without smoothing) written in a few milliseconds, where
matplotlib's layout and rasteriser took about 150 ms a picture: a fixed cost of every run,
a tenth of a short trial. Margins come from an upper estimate of the labels' widths
(``CHAR_EM`` of the font size a character). The paper's plots (``analysis/plots.py``) stay
matplotlib figures.

Every mark sits at a position :class:`Scale` computes from the numbers, so a test reads the
numbers back from the picture: the heatmap's pixels, the bars' lengths and the lines' points.
"""
from __future__ import annotations

import base64
import math
import re
import struct
import zlib
from typing import Sequence
from xml.sax.saxutils import escape, quoteattr

import numpy as np

FONT = "DejaVu Sans, Verdana, Arial, sans-serif"
CHAR_EM = 0.62  # an upper estimate of a character's width in font sizes (DejaVu Sans averages 0.55)
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")  # matplotlib's tab10, the colours of the paper's plots
GRID = "#e3e3e3"
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")
NAME_LIMIT = 40  # characters of a class name on a picture


def xml_chars(text: str) -> str:
    """``text`` with the control characters XML does not allow (all below U+0020 but tab,
    newline and carriage return) replaced by U+FFFD, so that a class name holding one still
    gives a picture."""
    return _NOT_XML.sub("\ufffd", text)


def shorten(text: str, limit: int) -> str:
    """``text``, cut to ``limit`` characters with an ellipsis if longer (a label, not a record:
    the run's artifacts keep the names whole)."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def text_width(text: str, size: float) -> float:
    """An upper estimate of ``text``'s width in pixels at font size ``size``."""
    return CHAR_EM * size * len(text)


def fmt(value: float) -> str:
    """A coordinate or number with at most 2 decimals and no trailing zeros."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def nice_ticks(lo: float, hi: float, most: int = 6, integer: bool = False) -> list[float]:
    """Ticks at a 1-2-2.5-5 multiple of a power of ten, at most ``most`` + 1 of them in
    ``[lo, hi]`` (integers only with ``integer``)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        return []
    if hi == lo:
        return [lo]
    raw = (hi - lo) / max(1, most)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, math.ceil(step))
    first = math.ceil(lo / step - 1e-9)
    ticks = [round((first + k) * step, 10) for k in range(int((hi - first * step) / step + 1e-9) + 1)]
    return [t for t in ticks if lo - 1e-9 * step <= t <= hi + 1e-9 * step]


def tick_label(value: float, ticks: Sequence[float]) -> str:
    """``value`` with as many decimals as the tick step needs (0.25 -> 2, 20 -> 0)."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    decimals = 0
    while decimals < 6 and abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:
        decimals += 1
    return f"{value:.{decimals}f}"


class Scale:
    """A linear map from data ``[lo, hi]`` to pixels ``[start, stop]`` (``stop < start`` for
    a y axis, whose pixels grow downwards)."""

    def __init__(self, lo: float, hi: float, start: float, stop: float) -> None:
        self.lo, self.hi, self.start, self.stop = lo, hi, start, stop

    def __call__(self, value: float) -> float:
        span = self.hi - self.lo
        return self.start + (self.stop - self.start) * ((value - self.lo) / span if span else 0.5)


class Svg:
    """An SVG document assembled element by element."""

    def __init__(self, width: float, height: float) -> None:
        self.width, self.height = width, height
        self.parts: list[str] = []

    def element(self, tag: str, content: str | None = None, **attrs) -> None:
        """``content`` is markup already escaped; attribute values are escaped here."""
        items = " ".join(f"{k.rstrip('_').replace('_', '-')}="
                         + quoteattr(xml_chars(v) if isinstance(v, str) else fmt(v))
                         for k, v in attrs.items() if v is not None)
        self.parts.append(f"<{tag} {items}/>" if content is None else f"<{tag} {items}>{content}</{tag}>")

    def text(self, x: float, y: float, content: str, size: float = 11, anchor: str = "start",
             rotate: float | None = None, bold: bool = False, color: str | None = None) -> None:
        """``content`` with its vertical middle at ``y``."""
        transform = f"rotate({fmt(rotate)} {fmt(x)} {fmt(y)})" if rotate else None
        self.element("text", escape(xml_chars(content)), x=x, y=y + 0.35 * size, font_size=size, text_anchor=anchor,
                     transform=transform, font_weight="bold" if bold else None, fill=color)

    def line(self, x1: float, y1: float, x2: float, y2: float, color: str = "#000", width: float = 1.0) -> None:
        self.element("line", x1=x1, y1=y1, x2=x2, y2=y2, stroke=color, stroke_width=width)

    def rect(self, x: float, y: float, w: float, h: float, fill: str, stroke: str | None = None, **attrs) -> None:
        self.element("rect", x=x, y=y, width=w, height=h, fill=fill, stroke=stroke, **attrs)

    def polyline(self, points: Sequence[tuple[float, float]], color: str, width: float = 1.5) -> None:
        self.element("polyline", points=" ".join(f"{fmt(x)},{fmt(y)}" for x, y in points), fill="none",
                     stroke=color, stroke_width=width)

    def circle(self, x: float, y: float, r: float, color: str) -> None:
        self.element("circle", cx=x, cy=y, r=r, fill=color)

    def image(self, x: float, y: float, w: float, h: float, rgb: np.ndarray, **attrs) -> None:
        """An (H, W, 3) uint8 array as an embedded PNG, each cell a block of whole pixels about
        as large as it is drawn (so that a viewer that smooths images still shows sharp cells)."""
        rows, cols = rgb.shape[:2]
        fy, fx = max(1, round(h / rows)), max(1, round(w / cols))
        block = np.repeat(np.repeat(np.asarray(rgb, dtype=np.uint8), fy, axis=0), fx, axis=1)
        href = "data:image/png;base64," + base64.b64encode(png(block)).decode("ascii")
        self.element("image", x=x, y=y, width=w, height=h, href=href, preserveAspectRatio="none",
                     style="image-rendering:pixelated;image-rendering:crisp-edges", **attrs)

    def render(self) -> str:
        w, h = fmt(self.width), fmt(self.height)
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
                f'font-family={quoteattr(FONT)}><rect width="100%" height="100%" fill="#fff"/>'
                + "".join(self.parts) + "</svg>")


# matplotlib's viridis, its 256 colours as RGB bytes (``colormaps["viridis"](np.arange(256) / 255,
# bytes=True)``; a test checks them): no matplotlib import in a run for one colour map
_VIRIDIS = np.frombuffer(bytes.fromhex(
    "44015444025544035745055845065a45085b46095c460b5e460c5f460e61470f62471163471265471466471567471669"
    "47186a48196b481a6c481c6e481d6f481e70482071482172482273482374472575472676472777472878472a79472b7a"
    "472c7b462d7c462f7c46307d46317e45327f45347f453580453681443781443982433a83433b83433c84423d84423e85"
    "4240854141864142864043874044873f45873f47883e48883e49893d4a893d4b893d4c893c4d8a3c4e8a3b508a3b518a"
    "3a528b3a538b39548b39558b38568b38578c37588c37598c365a8c365b8c355c8c355d8c345e8d345f8d33608d33618d"
    "32628d32638d31648d31658d31668d30678d30688d2f698d2f6a8d2e6b8e2e6c8e2e6d8e2d6e8e2d6f8e2c708e2c718e"
    "2c728e2b738e2b748e2a758e2a768e2a778e29788e29798e287a8e287a8e287b8e277c8e277d8e277e8e267f8e26808e"
    "26818e25828e25838d24848d24858d24868d23878d23888d23898d22898d228a8d228b8d218c8d218d8c218e8c208f8c"
    "20908c20918c1f928c1f938b1f948b1f958b1f968b1e978a1e988a1e998a1e998a1e9a891e9b891e9c891e9d881e9e88"
    "1e9f881ea0871fa1871fa2861fa38620a48520a58521a68521a78422a78423a88323a98224aa8225ab8126ac8127ad80"
    "28ae7f29af7f2ab07e2bb17d2cb17d2eb27c2fb37b30b47a32b57a33b67935b77836b87738b97639b9763bba753dbb74"
    "3ebc7340bd7242be7144be7045bf6f47c06e49c16d4bc26c4dc26b4fc36951c46853c56755c66657c66559c7645bc862"
    "5ec96160c96062ca5f64cb5d67cc5c69cc5b6bcd596dce5870ce5672cf5574d05477d05279d1517cd24f7ed24e81d34c"
    "83d34b86d44988d5478bd5468dd64490d64392d74195d73f97d83e9ad83c9dd93a9fd938a2da37a5da35a7db33aadb32"
    "addc30afdc2eb2dd2cb5dd2bb7dd29bade27bdde26bfdf24c2df22c5df21c7e01fcae01ecde01dcfe11cd2e11bd4e11a"
    "d7e219dae218dce218dfe318e1e318e4e318e7e419e9e419ece41aeee51bf1e51cf3e51ef6e61ff8e621fae622fde724"
), dtype=np.uint8).reshape(256, 3)


def viridis(values: np.ndarray) -> np.ndarray:
    """Viridis of ``values`` in [0, 1] as uint8 RGB, the colour matplotlib's colour map gives
    (entry ``floor(256 v)``, clipped); NaN is white."""
    values = np.asarray(values, dtype=np.float64)
    index = np.clip(np.floor(np.nan_to_num(values, nan=0.0) * 256), 0, 255).astype(np.intp)
    rgb = _VIRIDIS[index]
    rgb[np.isnan(values)] = 255
    return rgb


def png(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as a PNG file (8-bit RGB, no filter, zlib level 6)."""
    h, w = rgb.shape[:2]
    rows = np.concatenate([np.zeros((h, 1), dtype=np.uint8), np.asarray(rgb, dtype=np.uint8).reshape(h, 3 * w)], 1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


def _x_axis(svg: Svg, scale: Scale, ticks: Sequence[float], y: float, labels: Sequence[str], size: float = 10,
            rotate: bool = False) -> float:
    """Tick marks and labels below ``y``; returns the height the labels take."""
    tallest = 0.0
    for value, label in zip(ticks, labels):
        x = scale(value)
        svg.line(x, y, x, y + 4)
        if rotate:
            svg.text(x, y + 7, label, size, anchor="end", rotate=-90)
            tallest = max(tallest, text_width(label, size))
        else:
            svg.text(x, y + 7 + size / 2, label, size, anchor="middle")
            tallest = size
    return 7 + tallest


def _y_axis(svg: Svg, scale: Scale, ticks: Sequence[float], x: float, labels: Sequence[str],
            size: float = 10) -> None:
    for value, label in zip(ticks, labels):
        y = scale(value)
        svg.line(x - 4, y, x, y)
        svg.text(x - 6, y, label, size, anchor="end")


def pooled(values: np.ndarray, most: int) -> np.ndarray:
    """A square (K, K) array as at most ``most`` x ``most`` cells: each the mean of a block of
    ``ceil(K / most)`` x ``ceil(K / most)`` entries (the last blocks of what is there). As is
    when K <= ``most``: a picture never needs more cells than pixels."""
    k = values.shape[0]
    f = -(-k // most)
    if f == 1:
        return values
    m = -(-k // f)
    padded = np.full((m * f, m * f), np.nan)
    padded[:k, :k] = values
    with np.errstate(invalid="ignore"):
        return np.nanmean(padded.reshape(m, f, m, f), axis=(1, 3))


def confusion_matrix(confusion: np.ndarray, class_names: Sequence[str], named_up_to: int) -> str:
    """The row-normalised confusion matrix (share of the true class) as a heatmap with a
    colour bar; every class named up to ``named_up_to`` classes, tick numbers beyond. Beyond
    as many classes as the matrix has pixels, a cell is the mean of a block of classes
    (:func:`pooled`), so the picture stays the same size however many classes there are."""
    k = confusion.shape[0]
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    named = bool(class_names) and k <= named_up_to
    labels = [shorten(str(n), NAME_LIMIT) for n in class_names] if named else []
    side = float(min(560, max(240, 24 * k)))  # the matrix, square
    cell = side / k
    size = 9 if named else 10
    ticks = list(range(k)) if named else [int(t) for t in nice_ticks(0, k - 1, 6, integer=True)]
    tick_text = labels if named else [str(t) for t in ticks]
    widest = max((text_width(t, size) for t in tick_text), default=0.0)
    left, top = 26 + 8 + widest, 34
    title = f"Confusion matrix, last epoch ({k} classes)"
    width = max(left + side + 100, text_width(title, 13) + 20)
    height = top + side + 7 + widest + 34
    svg = Svg(width, height)
    svg.text(left + side / 2, 16, title, 13, anchor="middle", bold=True)
    svg.image(left, top, side, side, viridis(pooled(rates, int(side))), id="heatmap")
    svg.rect(left, top, side, side, "none", stroke="#000")
    x_scale, y_scale = Scale(0, k - 1, left + cell / 2, left + side - cell / 2), \
        Scale(0, k - 1, top + cell / 2, top + side - cell / 2)
    drop = _x_axis(svg, x_scale, ticks, top + side, tick_text, size, rotate=named)
    _y_axis(svg, y_scale, ticks, left, tick_text, size)
    svg.text(left + side / 2, top + side + drop + 18, "predicted class", 11, anchor="middle")
    svg.text(12, top + side / 2, "true class", 11, anchor="middle", rotate=-90)
    bar_x = left + side + 16  # the colour bar: 1.0 at the top
    svg.image(bar_x, top, 14, side, viridis(np.linspace(1.0, 0.0, 256))[:, None, :], id="colorbar")
    svg.rect(bar_x, top, 14, side, "none", stroke="#000")
    bar_ticks = nice_ticks(0.0, 1.0, 5)
    for value, label in zip(bar_ticks, [tick_label(t, bar_ticks) for t in bar_ticks]):
        y = Scale(0.0, 1.0, top + side, top)(value)
        svg.line(bar_x + 14, y, bar_x + 18, y)
        svg.text(bar_x + 20, y, label, 10)
    svg.text(bar_x + 62, top + side / 2, "share of the true class", 11, anchor="middle", rotate=90)
    return svg.render()


def pair_bars(labels: Sequence[str], errors: np.ndarray) -> str:
    """One horizontal bar a pair, its length the pair error in percent, the worst on top."""
    n = len(labels)
    row, size = 20.0, 10
    plot_w = 420.0
    left = 10 + max((text_width(t, size) for t in labels), default=0.0) + 8
    top = 34
    title = f"Top {n} confusable pairs, last epoch"
    xlabel = "pair error (%): share of the pair's samples predicted as the other class"
    width = max(left + plot_w + 60, left + text_width(xlabel, 11), text_width(title, 13) + 20)
    height = top + n * row + 52
    svg = Svg(width, height)
    svg.text(left + plot_w / 2, 16, title, 13, anchor="middle", bold=True)
    percent = 100 * np.asarray(errors, dtype=np.float64)
    finite = percent[np.isfinite(percent)]
    hi = max(1.0, float(finite.max()) * 1.1) if finite.size else 1.0
    x = Scale(0.0, hi, left, left + plot_w)
    ticks = nice_ticks(0.0, hi, 6)
    for t in ticks:
        svg.line(x(t), top, x(t), top + n * row, color=GRID)
    for r, (label, value) in enumerate(zip(labels, percent)):
        y = top + r * row
        svg.text(left - 6, y + row / 2, label, size, anchor="end")
        if math.isfinite(value):
            svg.rect(left, y + 4, x(value) - left, row - 8, "#d62728", class_="bar")
            svg.text(x(value) + 4, y + row / 2, f"{value:.1f}", 9, color="#444")
        else:
            svg.text(left + 4, y + row / 2, "no samples", 9, color="#444")
    svg.line(left, top, left, top + n * row)
    svg.line(left, top + n * row, left + plot_w, top + n * row)
    _x_axis(svg, x, ticks, top + n * row, [tick_label(t, ticks) for t in ticks])
    svg.text(left + plot_w / 2, top + n * row + 36, xlabel, 11, anchor="middle")
    return svg.render()


def _segments(xs: Sequence[float], ys: Sequence[float]) -> list[list[tuple[float, float]]]:
    """The runs of consecutive finite points (a NaN breaks the line)."""
    out: list[list[tuple[float, float]]] = [[]]
    for x, y in zip(xs, ys):
        if math.isfinite(y):
            out[-1].append((x, y))
        elif out[-1]:
            out.append([])
    return [s for s in out if s]


def line_panels(panels: Sequence[dict], epochs: int) -> str:
    """Panels side by side, each ``{"title", "ylabel", "series": [(label, values)], "from_zero",
    "legend_title", "empty"}``: one line with markers a series over epochs 1..``epochs`` (a
    NaN breaks it), its legend below the panel."""
    plot_w, plot_h, left, top = 330.0, 210.0, 64.0, 34.0
    panel_w = left + plot_w + 24
    rows = max((math.ceil(len(p["series"]) / 3) for p in panels), default=0)
    height = top + plot_h + 52 + 18 * rows
    svg = Svg(panel_w * len(panels), height)
    xs = list(range(1, epochs + 1))
    x_ticks = nice_ticks(1, max(1, epochs), 8, integer=True)
    for k, panel in enumerate(panels):
        x0 = k * panel_w + left
        svg.text(x0 + plot_w / 2, 16, panel["title"], 12, anchor="middle", bold=True)
        values = np.array([v for _, vs in panel["series"] for v in vs], dtype=np.float64)
        finite = values[np.isfinite(values)]
        lo = 0.0 if panel.get("from_zero") else (float(finite.min()) if finite.size else 0.0)
        hi = float(finite.max()) if finite.size else 1.0
        pad = 0.05 * (hi - lo) if hi > lo else (abs(hi) * 0.1 or 1.0)
        lo, hi = (lo if panel.get("from_zero") else lo - pad), hi + pad
        y_ticks = nice_ticks(lo, hi, 5)
        x = Scale(1, max(1, epochs), x0 + 10, x0 + plot_w - 10) if epochs > 1 else Scale(0, 2, x0, x0 + plot_w)
        y = Scale(lo, hi, top + plot_h, top)
        for t in y_ticks:
            svg.line(x0, y(t), x0 + plot_w, y(t), color=GRID)
        svg.rect(x0, top, plot_w, plot_h, "none", stroke="#000")
        _y_axis(svg, y, y_ticks, x0, [tick_label(t, y_ticks) for t in y_ticks])
        _x_axis(svg, x, x_ticks, top + plot_h, [str(int(t)) for t in x_ticks])
        svg.text(x0 + plot_w / 2, top + plot_h + 30, "epoch", 11, anchor="middle")
        svg.text(x0 - 50, top + plot_h / 2, panel["ylabel"], 11, anchor="middle", rotate=-90)
        if not panel["series"]:
            svg.text(x0 + plot_w / 2, top + plot_h / 2, panel.get("empty", "nothing logged"), 11, anchor="middle",
                     color="#777")
        legend_y = top + plot_h + 50
        if panel["series"] and panel.get("legend_title"):
            svg.text(x0, legend_y, panel["legend_title"] + ":", 10)
        lx = x0 + (text_width(panel.get("legend_title") or "", 10) + 12 if panel.get("legend_title") else 0)
        for s, (label, series) in enumerate(panel["series"]):
            color = COLORS[s % len(COLORS)]
            for segment in _segments(xs, series):
                points = [(x(a), y(b)) for a, b in segment]
                if len(points) > 1:
                    svg.polyline(points, color)
                for px, py in points:
                    svg.circle(px, py, 3, color)
            if s and s % 3 == 0:
                legend_y += 18
                lx = x0
            svg.line(lx, legend_y, lx + 18, legend_y, color=color, width=2)
            svg.circle(lx + 9, legend_y, 3, color)
            svg.text(lx + 22, legend_y, label, 10)
            lx += 30 + text_width(label, 10)
    return svg.render()
