"""The plan format: round trip, cross-field rules, versions, fuzzing."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas
from schemas import PlanError, decode_plan, encode_plan, summarize, window_pairs

GRID = [["full", "full"], ["wars", "ast"], ["asc", "wars_asc"]]


def make_plan(methods=GRID, *, window=3, tokens=16, cfg=True, **changes) -> schemas.Plan:
    plan = schemas.Plan(
        schema_version=1,
        tool_version="test",
        model=schemas.ModelInfo("PixArtTransformer2DModel", "tiny", "ab" * 32, len(methods[0]), 2, 8),
        tokens=schemas.Tokens(num_tokens=tokens, height=32, width=32),
        sampling=schemas.Sampling("DPMSolverMultistepScheduler", len(methods), cfg, "uncond_cond" if cfg else None, 4.5),
        window=window,
        methods=methods,
        summary=summarize(methods, tokens, window),
        calibration=schemas.Calibration(0.9, "rel_l1", "cd" * 32, 6, 0),
        losses=[[None] * len(methods[0])] + [[0.01] * len(methods[0]) for _ in methods[1:]],
    )
    return msgspec.structs.replace(plan, **changes)


def as_doc(plan: schemas.Plan) -> dict:
    return json.loads(encode_plan(plan))


def decode_doc(doc: dict) -> schemas.Plan:
    return decode_plan(json.dumps(doc).encode())


def test_round_trip():
    plan = make_plan()
    assert decode_plan(encode_plan(plan)) == plan


def test_committed_json_schema_is_current():
    committed = json.loads(Path(schemas.__file__).with_name("plan.schema.json").read_text())
    assert committed == json.loads(json.dumps(schemas.json_schema())), (
        "schemas/plan.schema.json is stale: run `python -m schemas > schemas/plan.schema.json`"
    )


@pytest.mark.parametrize("n", [1, 2, 7, 64])
@pytest.mark.parametrize("w", [0, 1, 3, 63, 100])
def test_window_pairs_counts_the_band(n, w):
    brute = sum(1 for i in range(n) for j in range(n) if abs(i - j) <= w)
    assert window_pairs(n, w) == brute


def test_flops_fraction_of_each_method():
    tokens, window = 64, 8
    band = window_pairs(tokens, window) / tokens**2
    for method, expected in {"full": 1, "asc": 0.5, "wars": band, "wars_asc": band / 2, "ast": 0}.items():
        grid = [["full"], [method]]
        assert summarize(grid, tokens, window).attention_flops_fraction == pytest.approx((1 + expected) / 2)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["methods"].pop(), r"\$\.methods: grid has 2 steps, sampling.num_steps is 3"),
        (lambda d: d["methods"][1].pop(), r"\$\.methods\[1\]: row has 1 layers"),
        (lambda d: d["methods"][0].__setitem__(1, "wars"), r"\$\.methods\[0\]\[1\]: step 0 must be 'full'"),
        (lambda d: d.__setitem__("window", 0), r"\$\.window: 'wars' methods need a window >= 1 \(got 0\)"),
        (lambda d: d.__setitem__("window", 16), r"\$\.window: 16 exceeds"),
        (lambda d: d["sampling"].__setitem__("cfg_order", None), r"\$\.sampling\.cfg_order: required"),
        (lambda d: d["summary"]["method_counts"].__setitem__("ast", 2), r"\$\.summary\.method_counts\.ast: says 2"),
        (lambda d: d["summary"].__setitem__("attention_flops_fraction", 0.5), r"\$\.summary\.attention_flops_fraction"),
        (lambda d: d["losses"].pop(), r"\$\.losses"),
        (lambda d: d["model"].__setitem__("num_heads", 0), r"\$\.model\.num_heads` \(got 0\)"),
        (lambda d: d["methods"][2].__setitem__(0, "sparse"), r"Invalid enum value 'sparse' - at `\$\.methods\[2\]\[0\]`"),
        (lambda d: d["calibration"].__setitem__("delta", 1.5), r"\$\.calibration\.delta` \(got 1.5\)"),
        (lambda d: d.__setitem__("extra", 1), r"unknown field `extra`"),
        (lambda d: d["model"].__setitem__("config_hash", "xyz"), r"\$\.model\.config_hash"),
        (lambda d: d.pop("model"), r"missing required field `model`"),
    ],
)
def test_inconsistent_plans_name_the_field(mutate, field):
    doc = as_doc(make_plan())
    mutate(doc)
    with pytest.raises(PlanError, match=field):
        decode_doc(doc)


def test_sharing_needs_cfg():
    doc = as_doc(make_plan([["full"], ["wars"]], cfg=False))
    doc["methods"][1][0] = "wars_asc"
    with pytest.raises(PlanError, match=r"\$\.methods\[1\]\[0\]: 'wars_asc' .*sampling\.cfg is false"):
        decode_doc(doc)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_unknown_schema_version_says_what_this_build_reads(version):
    doc = as_doc(make_plan())
    doc["schema_version"] = version
    with pytest.raises(PlanError, match=r"\$\.schema_version: .*(reads version 1|missing)"):
        decode_doc(doc)


def test_encode_refuses_an_inconsistent_plan():
    with pytest.raises(PlanError, match=r"\$\.methods\[0\]\[0\]"):
        encode_plan(make_plan([["wars"], ["full"]]))


def _decodes_or_plan_error(raw: bytes) -> None:
    try:
        plan = decode_plan(raw)
    except PlanError:
        return
    assert isinstance(plan, schemas.Plan)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_give_plan_or_plan_error(raw):
    _decodes_or_plan_error(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_mutated_valid_plans_give_plan_or_plan_error(data):
    doc = as_doc(make_plan())
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        path = data.draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "delete":
            parent.pop(path[-1])
        else:
            parent[path[-1]] = data.draw(json_values)
    raw = json.dumps(doc, allow_nan=True).encode()
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(raw)))
        raw = raw[:cut] + data.draw(st.binary(max_size=4)) + raw[cut:]
    _decodes_or_plan_error(raw)


def test_deeply_nested_input_is_a_plan_error():
    with pytest.raises(PlanError):
        decode_plan(b"[" * 100_000 + b"]" * 100_000)


def test_invalid_utf8_inside_a_string_is_a_plan_error():
    raw = encode_plan(make_plan()).replace(b'"tool_version": "test"', b'"tool_version": "te\x80st"')
    with pytest.raises(PlanError, match="not UTF-8"):
        decode_plan(raw)


def video_plan(**changes) -> schemas.Plan:
    layers = [schemas.Layer("spatial", 16, 3, sequences=4), schemas.Layer("temporal", 4, 1, sequences=16)]
    grid = [["full", "full"], ["wars", "wars_asc"]]
    plan = make_plan(grid, tokens=16)
    plan = msgspec.structs.replace(
        plan,
        tokens=schemas.Tokens(16, frames=4),
        layers=layers,
        summary=summarize(grid, 16, 3, layers),
        losses=None,
    )
    return msgspec.structs.replace(plan, **changes)


def test_video_plan_round_trips_and_version_stays_1():
    plan = video_plan()
    assert decode_plan(encode_plan(plan)) == plan
    assert plan.schema_version == 1


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["layers"].pop(), r"\$\.layers: 1 entries, model.num_layers is 2"),
        (lambda d: d["layers"][1].__setitem__("num_tokens", 5), r"\$\.layers\[1\]\.num_tokens: a temporal layer"),
        (lambda d: d["layers"][1].__setitem__("window", 4), r"\$\.layers\[1\]\.window: 4 exceeds"),
        (lambda d: d["layers"][0].__setitem__("kind", "axial"), r"\$\.layers\[0\]\.kind"),
    ],
)
def test_inconsistent_video_plans_name_the_field(mutate, field):
    doc = as_doc(video_plan())
    mutate(doc)
    with pytest.raises(PlanError, match=field):
        decode_doc(doc)
