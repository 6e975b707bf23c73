"""bench.plot: round ticks, PNG layout, series colours inside the plot, atomic writes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.plot import Panel, Series, colour_of, image_size, plot_box, save_plot, ticks


def panel(*series: Series, title: str = "dit-digits") -> Panel:
    return Panel(title, "attention FLOPs kept (%)", "PSNR vs raw (dB)", list(series))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def inside(image: np.ndarray, index: int, n_panels: int, colour: tuple[int, int, int]) -> np.ndarray:
    """(row, column) of the pixels of ``colour`` in panel ``index``'s plot box, relative to the box."""
    left, top, right, bottom = plot_box(index, n_panels)
    return np.argwhere((image[top : bottom + 1, left : right + 1] == colour).all(axis=-1))


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(0.0, 47.3), (0.1, 0.7), (-3.2, 0.001), (12.5, 99.0), (1e6, 3.3e6), (5.0, 5.0), (0.0, 0.0), (1e-20, 1e-20)],
)
def test_ticks_are_round_steps_covering_the_range(lo: float, hi: float) -> None:
    values = ticks(lo, hi)
    assert values[0] <= lo and values[-1] >= hi
    assert 3 <= len(values) <= 12
    steps = np.diff(values)
    assert np.allclose(steps, steps[0], rtol=1e-6)
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6


def test_ticks_from_zero() -> None:
    assert ticks(0.0, 47.3) == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]


def test_png_width_grows_with_panel_count(tmp_path: Path) -> None:
    sizes = []
    for n in (1, 2, 3):
        path = tmp_path / f"{n}.png"
        save_plot(path, [panel(Series("ditfastattn", [(50.0, 20.0), (100.0, 30.0)]))] * n, title="quality")
        sizes.append(pixels(path).shape[1::-1])
        assert sizes[-1] == image_size(n)
    assert sizes[1][0] > sizes[0][0]
    assert sizes[2][0] == sizes[1][0] and sizes[2][1] > sizes[1][1]


def test_each_series_colour_is_drawn_inside_the_plot(tmp_path: Path) -> None:
    ours = Series("ditfastattn", [(40.0, 21.3), (80.0, 35.2), (60.0, 28.1)])
    theirs = Series("TaylorSeer", [(50.0, 18.5), (90.0, 30.0)])
    path = tmp_path / "chart.png"
    save_plot(path, [panel(ours, theirs), panel(Series("TaylorSeer", [(1.0, 2.0), (3.0, 4.0)]), ours)])
    names = ["ditfastattn", "TaylorSeer"]
    assert colour_of("ditfastattn", names) != colour_of("TaylorSeer", names)
    image = pixels(path)
    for index in (0, 1):
        for name in names:
            assert len(inside(image, index, 2, colour_of(name, names))) > 20, (index, name)


def test_infinite_y_does_not_stretch_the_axis(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    save_plot(path, [panel(Series("ditfastattn", [(10.0, 20.0), (20.0, 30.0), (30.0, math.inf)]))])
    left, top, right, bottom = plot_box(0, 1)
    found = inside(pixels(path), 0, 1, colour_of("ditfastattn", ["ditfastattn"]))
    rows, columns = found[:, 0], found[:, 1]
    assert rows.min() <= 12 and rows.max() >= bottom - top - 12
    middle = columns[np.abs(rows - (bottom - top) // 2) <= 1]
    assert len(middle) and middle.max() < (right - left) // 2
    assert columns[rows <= 12].max() >= right - left - 8  # the clipped marker at x = 30


def test_single_point_and_empty_series(tmp_path: Path) -> None:
    series = [Series("one", [(3.0, 4.0)]), Series("none", []), Series("inf only", [(7.0, math.inf)])]
    path = tmp_path / "chart.png"
    save_plot(path, [panel(*series), Panel("empty", "x", "y", [])])
    names = [s.name for s in series]
    image = pixels(path)
    assert len(inside(image, 0, 2, colour_of("one", names))) > 10
    assert len(inside(image, 0, 2, colour_of("inf only", names))) > 10
    none = colour_of("none", names)
    assert not len(inside(image, 0, 2, none))
    assert (image == none).all(axis=-1).any()  # its legend entry


def test_non_png_suffix_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chart.jpg"):
        save_plot(tmp_path / "chart.jpg", [panel()])
    assert not list(tmp_path.iterdir())


def test_no_panels_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chart.png"):
        save_plot(tmp_path / "chart.png", [])
    assert not list(tmp_path.iterdir())


def test_missing_parent_directory_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        save_plot(tmp_path / "missing" / "chart.png", [panel()])
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        fp.write(b"\x89PNG half")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_plot(tmp_path / "new.png", [panel()])
    assert not list(tmp_path.iterdir())
    old = tmp_path / "old.png"
    old.write_bytes(b"previous chart")
    with pytest.raises(OSError, match="disk full"):
        save_plot(old, [panel()])
    assert list(tmp_path.iterdir()) == [old] and old.read_bytes() == b"previous chart"


def test_a_panel_without_lines_draws_markers_only(tmp_path):
    points = [(0.0, 0.0), (10.0, 10.0)]
    for lines in (True, False):
        save_plot(tmp_path / f"{lines}.png", [Panel("t", "x", "y", [Series("a", points)], lines=lines)])
    left, top, right, bottom = plot_box(0, 1)
    colour = colour_of("a", ["a"])
    middle = [((left + right) // 2 + dx, (top + bottom) // 2 + dy) for dx in range(-3, 4) for dy in range(-3, 4)]
    with Image.open(tmp_path / "True.png") as joined, Image.open(tmp_path / "False.png") as scattered:
        assert any(joined.convert("RGB").getpixel(p) == colour for p in middle)
        assert not any(scattered.convert("RGB").getpixel(p) == colour for p in middle)
