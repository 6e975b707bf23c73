"""Quality-versus-compute charts as PNG files, drawn with Pillow alone."""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
)
MARKERS = ("circle", "square", "diamond", "cross", "plus")
PANEL_SIZE = (600, 420)
HEADER = 44  # height of the band above the panels that holds the figure title
BOX = (78, 36, 410, 356)  # plotting area (left, top, right, bottom) within a panel
GRID, INK, BACKGROUND = (225, 225, 225), (0, 0, 0), (255, 255, 255)


@dataclass(frozen=True)
class Series:
    """One curve of ``(x, y)`` points: ``y = inf`` is marked at the panel's top, other non-finite points are skipped."""

    name: str
    points: list[tuple[float, float]]


@dataclass(frozen=True)
class Panel:
    """One chart: its title, axis labels and curves (``lines``: points joined, else markers only)."""

    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    lines: bool = True


def colour_of(name: str, names: list[str]) -> tuple[int, int, int]:
    """The colour of series ``name``, ``names`` being every series name in order of first appearance."""
    return PALETTE[names.index(name) % len(PALETTE)]


def ticks(lo: float, hi: float) -> list[float]:
    """Round values 1, 2 or 5 × 10^k apart, about five intervals from at most ``lo`` to at least ``hi``."""
    if not hi - lo > 1e-9 * max(abs(lo), abs(hi)):
        pad = abs(lo) * 0.5 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / 5
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    digits = max(0, -math.floor(math.log10(step)))
    return [round(k * step, digits) for k in range(math.floor(lo / step), math.ceil(hi / step) + 1)]


def image_size(n_panels: int) -> tuple[int, int]:
    """Pixel size of a figure of ``n_panels`` panels, laid out in rows of at most two."""
    cols, rows = min(2, n_panels), math.ceil(n_panels / 2)
    return cols * PANEL_SIZE[0], HEADER + rows * PANEL_SIZE[1]


def plot_box(index: int, n_panels: int) -> tuple[int, int, int, int]:
    """Pixel rectangle (left, top, right, bottom) of panel ``index``'s plotting area."""
    x, y = (index % 2) * PANEL_SIZE[0], HEADER + (index // 2) * PANEL_SIZE[1]
    return BOX[0] + x, BOX[1] + y, BOX[2] + x, BOX[3] + y


def _label(values: list[float]) -> list[str]:
    digits = max(0, -math.floor(math.log10(values[1] - values[0])))
    return [f"{v:.{digits}f}" for v in values]


def _marker(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, fill: tuple[int, int, int]) -> None:
    r = 4
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], fill=fill)
    elif shape == "cross":
        draw.line((x - r, y - r, x + r, y + r), fill=fill, width=2)
        draw.line((x - r, y + r, x + r, y - r), fill=fill, width=2)
    else:
        draw.line((x - r, y, x + r, y), fill=fill, width=2)
        draw.line((x, y - r, x, y + r), fill=fill, width=2)


def _vertical_text(image: Image.Image, text: str, centre: tuple[int, int], font: ImageFont.FreeTypeFont) -> None:
    x0, y0, x1, y1 = font.getbbox(text)
    mask = Image.new("L", (max(1, x1 - x0), max(1, y1 - y0)))
    ImageDraw.Draw(mask).text((-x0, -y0), text, fill=255, font=font)
    mask = mask.rotate(90, expand=True)
    image.paste(INK, (centre[0] - mask.width // 2, centre[1] - mask.height // 2), mask)


def _panel(image: Image.Image, box: tuple[int, int, int, int], panel: Panel, names: list[str]) -> None:
    draw = ImageDraw.Draw(image)
    small, medium = ImageFont.load_default(size=12), ImageFont.load_default(size=15)
    left, top, right, bottom = box
    points = [(x, y) for s in panel.series for x, y in s.points if math.isfinite(x) and y > -math.inf]
    xs = [x for x, _ in points] or [0.0, 1.0]
    ys = [y for _, y in points if math.isfinite(y)] or [0.0, 1.0]
    xt, yt = ticks(min(xs), max(xs)), ticks(min(ys), max(ys))

    def px(x: float) -> float:
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - yt[0]) / (yt[-1] - yt[0]) * (bottom - top)

    for value, text in zip(xt, _label(xt)):
        draw.line((px(value), top, px(value), bottom), fill=GRID)
        draw.text((px(value), bottom + 6), text, fill=INK, font=small, anchor="mt")
    for value, text in zip(yt, _label(yt)):
        draw.line((left, py(value), right, py(value)), fill=GRID)
        draw.text((left - 6, py(value)), text, fill=INK, font=small, anchor="rm")
    draw.rectangle(box, outline=INK)
    draw.text(((left + right) / 2, top - 10), panel.title, fill=INK, font=medium, anchor="mb")
    draw.text(((left + right) / 2, bottom + 26), panel.xlabel, fill=INK, font=small, anchor="mt")
    _vertical_text(image, panel.ylabel, (left - 62, (top + bottom) // 2), small)

    for row, s in enumerate(panel.series):
        index = names.index(s.name)
        colour, shape = colour_of(s.name, names), MARKERS[index % len(MARKERS)]
        finite = sorted((px(x), py(y)) for x, y in s.points if math.isfinite(x) and math.isfinite(y))
        if panel.lines and len(finite) > 1:
            draw.line(finite, fill=colour, width=2, joint="curve")
        for x, y in finite:
            _marker(draw, shape, x, y, colour)
        for x, y in s.points:
            if math.isfinite(x) and y == math.inf:
                draw.polygon([(px(x), top + 1), (px(x) - 5, top + 10), (px(x) + 5, top + 10)], fill=colour)
        ly = top + 8 + row * 20
        draw.line((right + 14, ly, right + 40, ly), fill=colour, width=2)
        _marker(draw, shape, right + 27, ly, colour)
        draw.text((right + 48, ly), s.name, fill=INK, font=small, anchor="lm")


def save_plot(path: str | os.PathLike[str], panels: list[Panel], *, title: str = "") -> None:
    """Panels in rows of at most two, in one PNG at ``path``, written atomically."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: a plot is saved as .png")
    if not panels:
        raise ValueError(f"{path}: no panels to plot")
    image = Image.new("RGB", image_size(len(panels)), BACKGROUND)
    names = list(dict.fromkeys(s.name for panel in panels for s in panel.series))
    for index, panel in enumerate(panels):
        _panel(image, plot_box(index, len(panels)), panel, names)
    header = ImageDraw.Draw(image)
    header.text((image.width / 2, HEADER / 2), title, fill=INK, font=ImageFont.load_default(size=18), anchor="mm")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
