"""Tiled windows in plans and profiles: version 2, fit rules naming the field, exact FLOPs."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

import schemas
from schemas import PlanError, ProfileError, Tiles1d, Tiles2d, Tiles3d, decode_plan, encode_plan, summarize
from tests.schemas.test_plan import as_doc, decode_doc, make_plan, video_plan
from tests.schemas.test_profile import make_profile
from tests.messages import naming

TILES = Tiles2d((4, 4), (2, 2), 0)  # tokens=16 at 32x32 pixels: a 4 x 4 patch grid


def tiled_plan(window=TILES, tokens=16, **changes) -> schemas.Plan:
    plan = make_plan(window=window, tokens=tokens, schema_version=2)
    return msgspec.structs.replace(plan, **changes)


def test_tiled_plan_round_trips():
    plan = tiled_plan()
    raw = encode_plan(plan)
    assert decode_plan(raw) == plan
    assert json.loads(raw)["window"] == {"kind": "tiles2d", "grid": [4, 4], "tile": [2, 2], "k": 0}


def test_shipped_version_1_plans_still_decode_as_bands():
    plans = Path(__file__).parents[2] / "plans"
    for path in sorted(p for model in ("dit", "pixart", "latte") for p in plans.glob(f"{model}-digits/d*.json")):
        plan = decode_plan(path.read_bytes())
        assert plan.schema_version == 1 and isinstance(plan.window, int), path


def test_version_1_refuses_a_tiled_window():
    doc = as_doc(tiled_plan())
    doc["schema_version"] = 1
    with pytest.raises(PlanError, match=r"\$\.window: tiled windows need schema_version 2 \(got 1\)"):
        decode_doc(doc)


@pytest.mark.parametrize(
    ("window", "message"),
    [
        (Tiles2d((4, 4), (3, 2), 0), r"\$\.window\.tile: tiles of 3x2 do not divide the 4x4 grid"),
        (Tiles2d((2, 8), (2, 2), 0), r"\$\.window\.grid: 2x8 patches do not have the proportions of 32x32 pixels"),
        (Tiles2d((8, 8), (2, 2), 0), r"\$\.window\.grid: 8x8 = 64 tokens, the layer has 16"),
        (Tiles1d(5, 0), r"\$\.window\.tile: tiles of 5 do not divide the 16 grid"),
        (Tiles3d((1, 4, 4), (1, 3, 4), 1), r"\$\.window\.tile: tiles of 1x3x4 do not divide the 1x4x4 grid"),
    ],
)
def test_tiles_that_do_not_fit_name_the_field(window, message):
    doc = as_doc(tiled_plan())
    doc["window"] = msgspec.to_builtins(window)
    with pytest.raises(PlanError, match=message):
        decode_doc(doc)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"kind": "tiles2d", "grid": [4], "tile": [2, 2], "k": 0}, naming("$.window.grid", "2")),
        ({"kind": "tiles5d", "tile": 2, "k": 0}, naming("$.window.kind", "tiles5d")),
        ({"kind": "tiles1d", "tile": 0, "k": 0}, naming("$.window.tile", "1")),
        ({"kind": "tiles1d", "tile": 4, "k": -1}, naming("$.window.k", "0")),
        ({"kind": "tiles1d", "tile": 4, "k": 0, "pad": 1}, r"\bpad\b"),
        ("band:3", naming("$.window")),
    ],
)
def test_malformed_windows_are_refused_with_their_path(value, message):
    doc = as_doc(tiled_plan())
    doc["window"] = value
    with pytest.raises(PlanError, match=message):
        decode_doc(doc)


def test_temporal_layers_keep_a_band():
    plan = video_plan(schema_version=2)
    doc = as_doc(plan)
    doc["layers"][1]["window"] = {"kind": "tiles1d", "tile": 2, "k": 0}
    with pytest.raises(PlanError, match=r"\$\.layers\[1\]\.window: a temporal layer keeps a band over frames"):
        decode_doc(doc)


def test_spatial_video_layers_take_tiles():
    layers = [schemas.Layer("spatial", 16, TILES, sequences=4), schemas.Layer("temporal", 4, 1, sequences=16)]
    grid = [["full", "full"], ["wars", "wars_asc"]]
    plan = video_plan(schema_version=2, window=TILES, layers=layers, summary=summarize(grid, 16, TILES, layers))
    assert decode_plan(encode_plan(plan)) == plan
    spatial = 4 * 16 * 16
    temporal = 16 * 4 * 4
    expected = (spatial + temporal + spatial * 4 / 16 + temporal * (4 * 3 - 2) / 16 / 2) / (2 * (spatial + temporal))
    assert plan.summary.attention_flops_fraction == pytest.approx(expected)


@pytest.mark.parametrize(
    ("window", "keys"),
    [(Tiles2d((4, 4), (2, 2), 0), 4), (Tiles2d((4, 4), (1, 1), 1), 9), (Tiles1d(4, 1), 12), (Tiles1d(2, 9), 16)],
)
def test_flops_fraction_counts_the_tiles_pairs(window, keys):
    grid = [["full", "full"], ["wars", "wars_asc"], ["asc", "ast"]]
    got = summarize(grid, 16, window).attention_flops_fraction
    assert got == pytest.approx((2 + keys / 16 + keys / 32 + 0.5) / 6)


def test_window_errors_must_measure_the_plans_window():
    calibration = msgspec.structs.replace(make_plan().calibration, window_errors={"band:3": 0.2, "tiles2d:2x2:0": 0.1})
    plan = tiled_plan(calibration=calibration)
    assert decode_plan(encode_plan(plan)).calibration.window_errors == {"band:3": 0.2, "tiles2d:2x2:0": 0.1}
    doc = as_doc(plan)
    del doc["calibration"]["window_errors"]["tiles2d:2x2:0"]
    with pytest.raises(PlanError, match=r"\$\.calibration\.window_errors: measures no tiles2d:2x2:0"):
        decode_doc(doc)
    doc["calibration"]["window_errors"] = {"tiles2d:2x2:0": -1.0}
    with pytest.raises(PlanError, match=naming("$.calibration.window_errors[...]", "0.0")):
        decode_doc(doc)


def test_window_name_is_the_cli_form():
    assert [schemas.window_name(w) for w in (32, Tiles1d(64, 0), TILES, Tiles3d((2, 4, 4), (1, 2, 2), 1))] == [
        "band:32", "tiles1d:64:0", "tiles2d:2x2:0", "tiles3d:1x2x2:1",
    ]  # fmt: skip


def test_profile_carries_a_tiled_window_from_version_2():
    profile = make_profile(schema_version=2, window=TILES)
    assert schemas.decode_profile(schemas.encode_profile(profile)) == profile
    doc = msgspec.msgpack.decode(schemas.encode_profile(profile))
    doc["schema_version"] = 1
    with pytest.raises(ProfileError, match=r"\$\.window: tiled windows need schema_version 2 \(got 1\)"):
        schemas.decode_profile(msgspec.msgpack.encode(doc))
