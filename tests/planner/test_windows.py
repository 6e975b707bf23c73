"""``--window``: its forms, ``auto``'s candidates and choice, forced tilings, and what is shown."""

from __future__ import annotations

import math

import pytest
from rich.console import Console

from planner.build import build_plan, settle_window
from planner.profile import profile_model
from planner.report import build_summary, render_plan
from planner.windows import WindowOption, candidates, parse_window
from schemas import Tiles1d, Tiles2d, decode_plan, encode_plan, window_name, window_pairs
from tests.planner.pipelines import request
from tests.planner.test_cli import build_args, invoke, only_error_line


@pytest.mark.parametrize(
    ("text", "option"),
    [
        ("auto", WindowOption("auto")),
        ("32", WindowOption("band", width=32)),
        (32, WindowOption("band", width=32)),
        ("band:512", WindowOption("band", width=512)),
        ("tiles1d:64:0", WindowOption("tiles1d", tile=(64,), k=0)),
        ("tiles2d:8x8:1", WindowOption("tiles2d", tile=(8, 8), k=1)),
        ("TILES3D:2x8x4:2", WindowOption("tiles3d", tile=(2, 8, 4), k=2)),
    ],
)
def test_each_window_form_parses_and_prints_back(text, option):
    assert parse_window(text) == option
    assert parse_window(str(option)) == option


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "window: the band half-width must be in 1"),
        ("band:-3", "window: the band half-width must be a whole number"),
        ("tiles2d:8:1", "window: tiles2d takes 2 tile sizes: tiles2d:THxTW:K"),
        ("tiles1d:0:1", "window: a tile size must be in 1"),
        ("tiles2d:4x4", "window: expected auto, W, band:W"),
        ("stripes:4:1", "window: expected auto, W, band:W"),
        ("tiles2d:3x3:1", "window: tiles of 3x3 do not divide the 8x8 grid"),
        ("tiles3d:1x2x2:0", "window: tiles3d does not fit layers that attend over height x width"),
        ("tiles1d:7:0", "window: tiles of 7 do not divide the 64 grid"),
    ],
)
def test_bad_windows_are_refused_in_one_line_naming_window(folders, tmp_path, value, message):
    output = tmp_path / "plan.json"
    result = invoke(*build_args(folders["dit"], output, "--window", value, "--quiet"))
    assert result.exit_code == 2, result.output
    assert message in only_error_line(result)
    assert not output.exists()


def test_window_frac_goes_with_auto_but_not_with_a_given_window(folders, tmp_path):
    output = tmp_path / "p.json"
    result = invoke(*build_args(folders["dit"], output, "--window", "tiles1d:16:0", "--window-frac", "0.2"))
    assert result.exit_code == 2
    assert "window: give --window or --window-frac, not both" in only_error_line(result)


def test_auto_candidates_have_about_the_bands_pairs():
    for n, grid, band in [(64, (8, 8), 8), (256, (16, 16), 32), (4096, (64, 64), 512)]:
        shapes = candidates(n, grid, band)
        assert shapes[0] == band and len(shapes) > 1
        target = window_pairs(n, band)
        for shape in shapes[1:]:
            assert 0.8 <= window_pairs(n, shape) / target <= 1.25
            tile = (shape.tile,) if isinstance(shape, Tiles1d) else shape.tile
            assert math.prod(tile) >= 16
    assert [window_name(s) for s in candidates(256, (16, 16), 32)] == ["band:32", "tiles1d:64:0", "tiles2d:8x8:0"]


@pytest.fixture(scope="module")
def auto_plan(pixart):
    return build_plan(pixart, request(pixart, window="auto", delta=0.9)).plan


def test_auto_keeps_the_candidate_of_least_residual_error(auto_plan):
    errors = auto_plan.calibration.window_errors
    assert set(errors) == {window_name(s) for s in candidates(64, (8, 8), 8)}
    assert window_name(auto_plan.window) == min(errors, key=errors.get)
    assert decode_plan(encode_plan(auto_plan)) == auto_plan


def test_auto_measures_the_profiles_wars_distance(pixart):
    """The band's error under auto is the mean of the profile's lag-1 ``wars`` distances:
    both come from one all-full generation, measured by the runtime's recorder."""
    errors = settle_window(pixart, request(pixart, window="auto")).calibration.window_errors
    profile = profile_model(pixart, request(pixart, window="band:8")).profile
    cells = [row[0] for grid in profile.measurements.wars[1:] for row in grid]
    assert errors["band:8"] == pytest.approx(sum(cells) / len(cells), rel=1e-6)


def test_a_given_tiling_is_completed_by_the_patch_grid(dit):
    plan = settle_window(dit, request(dit, window="tiles2d:4x2:1"))
    assert plan.window == Tiles2d((8, 8), (4, 2), 1)
    assert plan.calibration.window_errors is None
    assert settle_window(dit, request(dit, window="tiles1d:16:1")).window == Tiles1d(16, 1)


def test_a_build_with_tiles_writes_them_in_the_plan(dit):
    plan = build_plan(dit, request(dit, window="tiles2d:4x4:0", delta=0.8)).plan
    assert plan.window == Tiles2d((8, 8), (4, 4), 0) and plan.schema_version >= 2
    assert decode_plan(encode_plan(plan)) == plan


def test_show_and_the_build_summary_print_the_window(auto_plan):
    console = Console(width=200, record=True)
    console.print(render_plan(auto_plan))
    console.print(build_summary(auto_plan, "plan.json", 1.0, None))
    text = console.export_text()
    assert "chosen by auto, residual error" in text
    for name in auto_plan.calibration.window_errors:
        assert name in text
    assert text.count(window_name(auto_plan.window)) >= 2
