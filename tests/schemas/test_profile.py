"""The profile format: round trip, cross-field rules, versions, corruption."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas
from schemas import PlanError, ProfileError, decode_plan, decode_profile, encode_profile
from tests.messages import naming

STEPS, LAYERS, LAGS = 3, 2, 2


def lag_grid(value: float = 0.25) -> list:
    return [[[value if k <= t else None for k in range(1, LAGS + 1)] for _ in range(LAYERS)] for t in range(STEPS)]


def step_grid(value: float = 0.125, *, first: float | None = None) -> list:
    return [[first if t == 0 else value for _ in range(LAYERS)] for t in range(STEPS)]


def make_profile(cfg: bool = True, **changes) -> schemas.Profile:
    profile = schemas.Profile(
        format="ditfastattn-profile",
        schema_version=1,
        tool_version="test",
        model=schemas.ModelInfo("PixArtTransformer2DModel", "tiny", "ab" * 32, LAYERS, 2, 8),
        tokens=schemas.Tokens(num_tokens=16, height=32, width=32),
        sampling=schemas.Sampling("DPMSolverMultistepScheduler", STEPS, cfg, "uncond_cond" if cfg else None, 4.5),
        window=3,
        calibration=schemas.ProfileCalibration("rel_l1", "cd" * 32, 6, 0),
        lags=LAGS,
        measurements=schemas.Measurements(
            ast=lag_grid(0.5),
            wars=lag_grid(0.25),
            wars_after_asc=lag_grid(0.3) if cfg else None,
            wars_asc=lag_grid(0.4) if cfg else None,
            asc=step_grid(0.2, first=0.1) if cfg else None,
            output_norm=step_grid(3.0, first=2.5),
            loss={"ast": step_grid(0.01)},
        ),
    )
    return msgspec.structs.replace(profile, **changes)


def sized_profile(cfg: bool, layers: int, steps: int, lags: int, **measurements) -> schemas.Profile:
    """A version-4 ``make_profile`` of ``layers`` x ``steps`` at ``lags``, with these measurement grids."""
    base = make_profile(cfg, schema_version=4)
    return msgspec.structs.replace(
        base,
        model=msgspec.structs.replace(base.model, num_layers=layers),
        sampling=msgspec.structs.replace(base.sampling, num_steps=steps),
        lags=lags,
        measurements=msgspec.structs.replace(base.measurements, **measurements),
    )


def as_doc(profile: schemas.Profile) -> dict:
    return msgspec.msgpack.decode(encode_profile(profile))


def decode_doc(doc: dict) -> schemas.Profile:
    return decode_profile(msgspec.msgpack.encode(doc))


@pytest.mark.parametrize("cfg", [True, False])
def test_round_trip(cfg):
    profile = make_profile(cfg)
    raw = encode_profile(profile)
    assert decode_profile(raw) == profile
    assert encode_profile(decode_profile(raw)) == raw


def test_committed_json_schema_is_current():
    committed = json.loads(Path(schemas.__file__).with_name("profile.schema.json").read_text())
    assert committed == json.loads(json.dumps(schemas.profile_json_schema())), (
        "schemas/profile.schema.json is stale: run `planner schema --profile > schemas/profile.schema.json`"
    )


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["measurements"]["ast"].pop(), r"\$\.measurements\.ast: has 2 steps, sampling\.num_steps is 3"),
        (lambda d: d["measurements"]["wars"][1].pop(), r"\$\.measurements\.wars\[1\]: has 1 layers"),
        (lambda d: d["measurements"]["wars_asc"][2][0].pop(), r"\$\.measurements\.wars_asc\[2\]\[0\]: has 1 lags, lags is 2"),
        (lambda d: d["measurements"]["ast"][1][0].__setitem__(1, 0.5), r"\$\.measurements\.ast\[1\]\[0\]\[1\]: must be null, no step -1"),
        (lambda d: d["measurements"]["loss"]["ast"][0].__setitem__(1, 0.5), r"\$\.measurements\.loss\.ast\[0\]\[1\]: must be null, step 0"),
        (lambda d: d["measurements"]["loss"].__setitem__("full", d["measurements"]["asc"]), r"loss\.full: 'full' is the reference"),
        (lambda d: d["measurements"]["ast"][2][1].__setitem__(0, -0.1), naming("$.measurements.ast[2][1][0]", "0.0")),
        (lambda d: d["measurements"]["ast"][2][1].__setitem__(0, float("inf")), r"\$\.measurements\.ast\[2\]\[1\]\[0\]: must be finite"),
        (lambda d: d["measurements"]["ast"][2][1].__setitem__(0, float("nan")), r"\$\.measurements\.ast\[2\]\[1\]\[0\]"),
        (lambda d: d["measurements"].__setitem__("asc", None), r"\$\.measurements\.asc: required when sampling\.cfg is on"),
        (lambda d: d["measurements"]["output_norm"].pop(), r"\$\.measurements\.output_norm: has 2 steps"),
        (lambda d: d["measurements"]["loss"].__setitem__("sparse", d["measurements"]["asc"]), r"\bsparse\b"),
        (lambda d: d.__setitem__("lags", 0), r"\$\.lags` \(got 0\)"),
        (lambda d: d["model"].__setitem__("config_hash", "xyz"), r"\$\.model\.config_hash"),
        (lambda d: d["sampling"].__setitem__("cfg_order", None), r"\$\.sampling\.cfg_order: required"),
        (lambda d: d.__setitem__("window", 16), r"\$\.window: the window must be in 1 … tokens - 1 = 15 \(got 16\)"),
        (lambda d: d.__setitem__("extra", 1), r"\bextra\b"),
        (lambda d: d.pop("calibration"), r"missing required field `calibration`"),
    ],
)
def test_inconsistent_profiles_name_the_field(mutate, field):
    doc = as_doc(make_profile())
    mutate(doc)
    with pytest.raises(ProfileError, match=field):
        decode_doc(doc)


def test_cfg_measures_without_cfg_are_refused():
    doc = as_doc(make_profile(cfg=False))
    doc["measurements"]["asc"] = step_grid(0.2)
    with pytest.raises(ProfileError, match=r"\$\.measurements\.asc: must be null when sampling\.cfg is off"):
        decode_doc(doc)
    doc = as_doc(make_profile(cfg=False))
    doc["measurements"]["loss"]["asc"] = step_grid(0.2)
    with pytest.raises(ProfileError, match=r"loss\.asc: 'asc' shares across CFG halves"):
        decode_doc(doc)


@pytest.mark.parametrize("version", [0, 6, "1", None])
def test_unknown_schema_version_says_what_this_build_reads(version):
    doc = as_doc(make_profile())
    doc["schema_version"] = version
    with pytest.raises(ProfileError, match=r"\$\.schema_version: unsupported profile schema version .* reads version 1, 2, 3, 4, 5"):
        decode_doc(doc)


def test_a_plan_is_not_a_profile_and_a_profile_is_not_a_plan():
    plan = schemas.encode_plan(schemas.profile.header_plan(make_profile()))
    with pytest.raises(ProfileError, match="not a profile"):
        decode_profile(plan)
    with pytest.raises(ProfileError, match=r"\$\.format: not a ditfastattn profile"):
        decode_profile(msgspec.msgpack.encode(json.loads(plan)))
    with pytest.raises(PlanError):
        decode_plan(encode_profile(make_profile()))


def test_profile_errors_are_plan_errors():
    assert issubclass(ProfileError, PlanError)


def test_encode_refuses_an_inconsistent_profile():
    broken = make_profile(lags=3)
    with pytest.raises(ProfileError, match=r"\$\.measurements\.ast\[0\]\[0\]: has 2 lags, lags is 3"):
        encode_profile(broken)


def test_every_truncation_is_a_profile_error():
    raw = encode_profile(make_profile())
    for cut in range(len(raw)):
        with pytest.raises(ProfileError):
            decode_profile(raw[:cut])


def test_deeply_nested_input_is_a_profile_error():
    with pytest.raises(ProfileError):
        decode_profile(b"\x81\xa6format" + b"\x91" * 100_000 + b"\x00")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_give_profile_or_profile_error(raw):
    try:
        decode_profile(raw)
    except ProfileError:
        pass


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_flipped_bytes_give_profile_or_profile_error(data):
    raw = bytearray(encode_profile(make_profile()))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        profile = decode_profile(bytes(raw))
    except ProfileError:
        return
    assert isinstance(profile, schemas.Profile)


# ---------------------------------------------------------------------------
# bounded work on hostile files


def _refused_fast(raw: bytes, message: str) -> None:
    """``raw`` is refused with ``message``, having allocated a few MB at most."""
    tracemalloc.start()
    try:
        with pytest.raises(ProfileError, match=message):
            decode_profile(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000


@pytest.mark.parametrize("steps", [2**64 - 1, 10**7, 1001])
def test_a_huge_declared_step_count_is_refused_before_any_work(steps):
    doc = as_doc(make_profile())
    doc["sampling"]["num_steps"] = steps
    raw = msgspec.msgpack.encode(doc)
    assert len(raw) < 5000
    _refused_fast(raw, naming("$.sampling.num_steps", "1000"))


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("model", "num_layers"), 2**32, naming("$.model.num_layers", "1024")),
        (("lags",), 2**64 - 1, naming("$.lags", "64")),
        (("tokens", "num_tokens"), 2**40, naming("$.tokens.num_tokens", "4194304")),
        (("window",), 2**40, naming("$.window", "4194304")),
        (("calibration", "num_prompts"), 2**21, naming("$.calibration.num_prompts", "1048576")),
        (("calibration", "seed"), 2**32, naming("$.calibration.seed", "4294967295")),
        (("calibration", "seed"), -1, naming("$.calibration.seed", "0")),
        (("sampling", "guidance_scale"), 1e300, naming("$.sampling.guidance_scale", "100.0")),
        (("sampling", "guidance_scale"), float("inf"), naming("$.sampling.guidance_scale", "100.0")),
        (("sampling", "guidance_scale"), float("nan"), r"\$\.sampling\.guidance_scale"),
    ],
)
def test_declared_sizes_and_settings_past_the_limits_are_refused(path, value, field):
    doc = as_doc(make_profile())
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _refused_fast(msgspec.msgpack.encode(doc), field)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_steps": 10**7}, r"\$\.measurements\.ast: has 3 steps, sampling\.num_steps is 10000000"),
        ({"num_layers": 10**7}, r"\$\.measurements\.ast\[0\]: has 2 layers, model\.num_layers is 10000000"),
    ],
)
def test_check_profile_matches_grids_to_declared_sizes_before_building_anything(changes, message):
    profile = make_profile()
    if "num_steps" in changes:
        profile = msgspec.structs.replace(profile, sampling=msgspec.structs.replace(profile.sampling, **changes))
    else:
        profile = msgspec.structs.replace(profile, model=msgspec.structs.replace(profile.model, **changes))
    tracemalloc.start()
    try:
        with pytest.raises(ProfileError, match=message):
            schemas.profile.check_profile(profile)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_encode_refuses_what_decode_would_refuse():
    profile = make_profile(lags=65)
    with pytest.raises(ProfileError, match=naming("$.lags", "64", prefix="invalid profile: ")):
        encode_profile(profile)
    sampling = msgspec.structs.replace(make_profile().sampling, guidance_scale=float("inf"))
    with pytest.raises(ProfileError, match=r"at `\$\.sampling\.guidance_scale`"):
        encode_profile(make_profile(sampling=sampling))


def test_profile_limits_are_in_the_json_schema():
    defs = schemas.profile_json_schema()["$defs"]
    assert defs["Profile"]["properties"]["lags"]["maximum"] == schemas.plan.MAX_LAGS
    assert defs["Sampling"]["properties"]["num_steps"]["maximum"] == schemas.plan.MAX_STEPS
    assert defs["ProfileCalibration"]["properties"]["seed"] == {
        "type": "integer", "minimum": 0, "maximum": schemas.plan.MAX_SEED
    }


# ---------------------------------------------------------------------------
# per-head measures (schema version 5)

HEADS = 2  # make_profile's model.num_heads


def head_grid(value: float = 0.3) -> list:
    return [[[None if t == 0 else value + 0.01 * h for h in range(HEADS)] for _ in range(LAYERS)] for t in range(STEPS)]


def head_profile(**changes) -> schemas.Profile:
    profile = make_profile(schema_version=5)
    measurements = msgspec.structs.replace(profile.measurements, head_ast=head_grid(0.2), head_wars=head_grid(0.1))
    return msgspec.structs.replace(profile, measurements=measurements, **changes)


def test_per_head_measures_round_trip():
    profile = head_profile()
    raw = encode_profile(profile)
    assert decode_profile(raw) == profile
    assert decode_profile(raw).measurements.head_wars[1][0] == [0.1, 0.11]
    assert schemas.PROFILE_SCHEMA_VERSION == 5


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["measurements"]["head_ast"].pop(), r"\$\.measurements\.head_ast: has 2 steps, sampling\.num_steps is 3"),
        (lambda d: d["measurements"]["head_wars"][1].pop(), r"\$\.measurements\.head_wars\[1\]: has 1 layers, model\.num_layers is 2"),
        (lambda d: d["measurements"]["head_ast"][2][1].pop(), r"\$\.measurements\.head_ast\[2\]\[1\]: has 1 heads, model\.num_heads is 2"),
        (lambda d: d["measurements"]["head_wars"][2][1].append(0.5), r"\$\.measurements\.head_wars\[2\]\[1\]: has 3 heads, model\.num_heads is 2"),
        (lambda d: d["measurements"]["head_ast"][0][0].__setitem__(1, 0.5), r"\$\.measurements\.head_ast\[0\]\[0\]\[1\]: must be null, no step -1"),
        (lambda d: d["measurements"]["head_wars"][1][0].__setitem__(0, float("inf")), r"\$\.measurements\.head_wars\[1\]\[0\]\[0\]: must be finite"),
        (lambda d: d["measurements"]["head_wars"][1][0].__setitem__(0, -1.0), r"\$\.measurements\.head_wars\[1\]\[0\]\[0\]"),
        (lambda d: d["measurements"].__setitem__("head_wars", None), r"\$\.measurements\.head_ast: present only with \$\.measurements\.head_wars"),
        (lambda d: d["measurements"].__setitem__("head_ast", None), r"\$\.measurements\.head_wars: present only with \$\.measurements\.head_ast"),
        (lambda d: d.__setitem__("schema_version", 4), r"\$\.measurements\.head_ast: needs schema_version 5 \(got 4\)"),
    ],
)
def test_inconsistent_per_head_measures_name_the_field(mutate, field):
    doc = as_doc(head_profile())
    mutate(doc)
    with pytest.raises(ProfileError, match=field):
        decode_doc(doc)


def test_encode_refuses_per_head_measures_of_the_wrong_shape():
    profile = head_profile()
    model = msgspec.structs.replace(profile.model, num_heads=3)
    with pytest.raises(ProfileError, match=r"\$\.measurements\.head_ast\[0\]\[0\]: has 2 heads, model\.num_heads is 3"):
        encode_profile(msgspec.structs.replace(profile, model=model))


def test_header_plan_carries_per_head_cells_and_their_cost():
    profile = head_profile()
    methods = [["full"] * LAYERS for _ in range(STEPS)]
    methods[1][0] = methods[2][1] = "wars"
    plan = schemas.profile.header_plan(profile, methods, heads={(2, 1): "af", (1, 0): "wa"})
    assert [(c.step, c.layer, c.methods) for c in plan.heads] == [(1, 0, "wa"), (2, 1, "af")]
    assert decode_plan(schemas.encode_plan(plan)) == plan
    band = schemas.method_cost("wars", 16, 3)
    cells = (band + 0.0) / 2 + (0.0 + 1.0) / 2  # the two per-head cells
    assert plan.summary.attention_flops_fraction == pytest.approx((STEPS * LAYERS - 2 + cells) / (STEPS * LAYERS))
    assert schemas.profile.header_plan(profile, methods, heads={}).heads is None
