"""The plan format: round trip, cross-field rules, versions, fuzzing."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas
from schemas import PlanError, decode_plan, encode_plan, summarize, window_pairs
from tests.messages import naming

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
        (lambda d: d["methods"][2].__setitem__(0, "sparse"), naming("$.methods[2][0]", "sparse")),
        (lambda d: d["calibration"].__setitem__("delta", 1.5), r"\$\.calibration\.delta` \(got 1.5\)"),
        (lambda d: d.__setitem__("extra", 1), r"\bextra\b"),
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


@pytest.mark.parametrize("version", [0, 6, "1", None])
def test_unknown_schema_version_says_what_this_build_reads(version):
    doc = as_doc(make_plan())
    doc["schema_version"] = version
    with pytest.raises(PlanError, match=r"\$\.schema_version: .*(reads version 1, 2, 3, 4, 5|missing)"):
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


def _valid_raw() -> bytes:
    return encode_plan(make_plan())


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "not a plan"),
        (b"[" * 100_000, "not a plan"),
        (b'{"a":' * 50_000, "invalid plan: nested too deeply"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "invalid plan: nested too deeply"),
        (b'{"schema_version": 1, "tool_version": ' + b"[" * 100_000, "invalid plan: nested too deeply"),
        (b'{"schema_version": 1, "calibration": ' + b'{"a":' * 50_000, "invalid plan: nested too deeply"),
    ],
)
def test_deeply_nested_input_is_a_plan_error(raw, message):
    with pytest.raises(PlanError, match=message):
        decode_plan(raw)


def test_deep_nesting_inside_a_valid_plan_is_a_plan_error():
    raw = _valid_raw()
    for old, deep in [(b'"test"', b"[" * 100_000 + b"]" * 100_000), (b'"delta": 0.9', b'"delta": ' + b'{"a":' * 50_000)]:
        with pytest.raises(PlanError, match="invalid plan: nested too deeply"):
            decode_plan(raw.replace(old, deep, 1))


def test_invalid_utf8_inside_a_string_is_a_plan_error():
    raw = _valid_raw().replace(b'"tool_version": "test"', b'"tool_version": "te\x80st"')
    at = raw.index(b"\x80")
    with pytest.raises(PlanError) as info:
        decode_plan(raw)
    assert str(info.value) == f"invalid plan: not UTF-8 at byte {at}"
    with pytest.raises(PlanError, match="invalid plan: not UTF-8 at byte 3"):
        decode_plan(b"   \xff{}")
    with pytest.raises(PlanError, match="invalid plan: character 0 cannot be written as UTF-8"):
        decode_plan("\ud800{}")


# ---------------------------------------------------------------------------
# limits and non-finite numbers


LIMITS = [
    (("sampling", "num_steps"), schemas.plan.MAX_STEPS),
    (("model", "num_layers"), schemas.plan.MAX_LAYERS),
    (("model", "num_heads"), schemas.plan.MAX_HEADS),
    (("model", "head_dim"), schemas.plan.MAX_HEAD_DIM),
    (("tokens", "num_tokens"), schemas.plan.MAX_TOKENS),
    (("tokens", "height"), schemas.plan.MAX_SIDE),
    (("tokens", "width"), schemas.plan.MAX_SIDE),
    (("tokens", "frames"), schemas.plan.MAX_FRAMES),
    (("window",), schemas.plan.MAX_WINDOW),
    (("calibration", "num_prompts"), schemas.plan.MAX_PROMPTS),
    (("calibration", "seed"), schemas.plan.MAX_SEED),
    (("sampling", "guidance_scale"), schemas.plan.MAX_GUIDANCE),
]


def _set(doc: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


@pytest.mark.parametrize(("path", "limit"), LIMITS, ids=[".".join(p) for p, _ in LIMITS])
def test_each_limit_is_refused_past_it_and_shown_in_the_schema(path, limit):
    doc = as_doc(make_plan())
    over = limit + 1 if isinstance(limit, int) else limit * 1.01
    _set(doc, path, over)
    with pytest.raises(PlanError, match=naming("$." + ".".join(path), str(limit))):
        decode_doc(doc)
    defs = schemas.json_schema()["$defs"]
    struct = {"sampling": "Sampling", "model": "ModelInfo", "tokens": "Tokens", "calibration": "Calibration"}
    prop = defs[struct.get(path[0], "Plan")]["properties"][path[-1]]
    assert limit in [alt.get("maximum") for alt in prop.get("anyOf", [prop])]


@pytest.mark.parametrize("field", ["num_tokens", "window", "sequences"])
def test_layer_limits(field):
    doc = as_doc(video_plan())
    doc["layers"][0][field] = 2**22 + 1
    with pytest.raises(PlanError, match=naming(f"$.layers[0].{field}", str(2**22))):
        decode_doc(doc)


@pytest.mark.parametrize("steps", [2**64 - 1, 10**7, 1001])
def test_huge_declared_step_counts_are_refused_before_any_work(steps):
    doc = as_doc(make_plan())
    doc["sampling"]["num_steps"] = steps
    raw = json.dumps(doc).encode()
    tracemalloc.start()
    try:
        with pytest.raises(PlanError, match=naming("$.sampling.num_steps", "1000")):
            decode_plan(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_plans_at_the_limits_decode():
    steps, top = schemas.plan.MAX_STEPS, schemas.plan.MAX_TOKENS
    grid = [["full", "full"]] + [["wars", "ast"]] * (steps - 1)
    plan = make_plan(grid, window=top - 1, tokens=top, losses=None)
    plan = msgspec.structs.replace(
        plan,
        tokens=schemas.Tokens(top, schemas.plan.MAX_SIDE, schemas.plan.MAX_SIDE),
        sampling=msgspec.structs.replace(plan.sampling, guidance_scale=schemas.plan.MAX_GUIDANCE),
        calibration=schemas.Calibration(1.0, "rel_l1", "cd" * 32, schemas.plan.MAX_PROMPTS, schemas.plan.MAX_SEED),
    )
    assert decode_plan(encode_plan(plan)) == plan


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("sampling", "guidance_scale"), 1e300, naming("$.sampling.guidance_scale", "100.0")),
        (("sampling", "guidance_scale"), -1.0, naming("$.sampling.guidance_scale", "0.0")),
        (("calibration", "seed"), -1, naming("$.calibration.seed", "0")),
        (("calibration", "seed"), 2**64 - 1, naming("$.calibration.seed", "4294967295")),
        (("calibration", "seed"), 2**64, r"\$\.calibration\.seed"),
        (("calibration", "delta"), 0.0, r"\$\.calibration\.delta"),
        (("losses", 1, 0), -0.5, naming("$.losses[1][0]", "0.0")),
    ],
)
def test_out_of_range_numbers_name_the_field(path, value, message):
    doc = as_doc(make_plan())
    _set(doc, path, value)
    with pytest.raises(PlanError, match=message):
        decode_doc(doc)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (b'"guidance_scale": 4.5', b'"guidance_scale": 1e999', r"at `\$\.sampling\.guidance_scale`"),
        (b"[null,null],\n    [0.01", b"[null,null],\n    [1e999", r"at `\$\.losses\[1\]\[0\]`"),
        (b'"guidance_scale": 4.5', b'"guidance_scale": NaN', None),
        (b'"guidance_scale": 4.5', b'"guidance_scale": Infinity', None),
        (b'"guidance_scale": 4.5', b'"guidance_scale": -Infinity', None),
        (b"[0.01", b"[NaN", None),
    ],
)
def test_non_finite_json_numbers_are_refused(old, new, message):
    raw = _valid_raw()
    assert old in raw
    with pytest.raises(PlanError, match=message):
        decode_plan(raw.replace(old, new, 1))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"losses": [[None, None], [float("inf"), 0.01], [0.01, 0.01]]}, r"\$\.losses\[1\]\[0\]: must be finite \(got inf\)"),
        ({"losses": [[None, None], [0.01, float("nan")], [0.01, 0.01]]}, r"\$\.losses\[1\]\[1\]"),
        ({"summary": schemas.Summary(float("nan"), summarize(GRID, 16, 3).method_counts)}, r"\$\.summary\.attention_flops_fraction"),
        ({"summary": schemas.Summary(float("inf"), summarize(GRID, 16, 3).method_counts)}, r"\$\.summary\.attention_flops_fraction"),
    ],
)
def test_non_finite_floats_in_a_built_plan_are_refused(changes, message):
    plan = make_plan(**changes)
    with pytest.raises(PlanError, match=message):
        schemas.check_plan(plan)
    with pytest.raises(PlanError, match=message):
        encode_plan(plan)


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"guidance_scale": float("inf")}, "sampling.guidance_scale"),
        ({"guidance_scale": float("nan")}, "sampling.guidance_scale"),
        ({"guidance_scale": 1e300}, "sampling.guidance_scale"),
    ],
)
def test_encode_refuses_what_decode_would_refuse(sampling, field):
    plan = make_plan()
    plan = msgspec.structs.replace(plan, sampling=msgspec.structs.replace(plan.sampling, **sampling))
    with pytest.raises(PlanError, match=naming(f"$.{field}", prefix="invalid plan: ")):
        encode_plan(plan)


def test_encode_refuses_a_seed_out_of_range():
    with pytest.raises(PlanError, match=naming("$.calibration.seed", prefix="invalid plan: ")):
        encode_plan(make_plan(calibration=schemas.Calibration(0.9, "rel_l1", "cd" * 32, 6, -1)))


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
