"""``forecast``: the first-order extrapolation of a layer's output, against a float64 reference."""

from __future__ import annotations

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime
from runtime.schedule import Schedule
from schemas import PlanError
from tests.plans import plan_for
from tests.runtime.conftest import float64_model, step_inputs
from tests.runtime.reference import ReferenceRun

ORDERS = {"pixart": "uncond_cond", "dit": "cond_uncond"}
LAYERS = 3
TIMES = [999.0, 961.0, 870.0, 866.0, 640.0, 301.0, 120.0]  # uneven: a step count would differ


def inputs_at(kind: str, t: int) -> dict:
    inputs = step_inputs(kind, t, cfg=True, order=ORDERS[kind])
    inputs["timestep"] = torch.full_like(inputs["timestep"], TIMES[t])
    return inputs


def reference(kind: str, methods: list[list[str]], window: int) -> list[torch.Tensor]:
    model = float64_model(kind)
    ref = ReferenceRun(methods, window, cond_first=ORDERS[kind] == "cond_uncond", times=TIMES)
    return ref.outputs(model, lambda t: [model(**inputs_at(kind, t)).sample])


def planned(kind: str, methods: list[list[str]], window: int, **apply: object) -> tuple[list[torch.Tensor], object]:
    model = float64_model(kind)
    plan = plan_for(model, methods, window=window, cfg_order=ORDERS[kind])
    with torch.no_grad(), runtime.apply(plan, model, **apply) as handle:
        outs = [model(**inputs_at(kind, t)).sample for t in range(len(methods))]
        return outs, handle


def valid(column: list[str]) -> list[str]:
    """``column`` with each ``forecast`` that lacks two earlier computed steps made ``ast``."""
    out, computed = [], 0
    for m in column:
        if m == "forecast" and computed < 2:
            m = "ast"
        computed += m not in ("ast", "forecast")
        out.append(m)
    return out


@st.composite
def grids(draw):
    steps = draw(st.integers(3, len(TIMES)))
    choices = ["full", "wars", "ast", "asc", "wars_asc", "forecast", "forecast"]
    columns = [valid(["full"] + [draw(st.sampled_from(choices)) for _ in range(steps - 1)]) for _ in range(LAYERS)]
    return [list(row) for row in zip(*columns)]


@pytest.mark.parametrize("kind", ["pixart", "dit"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(methods=grids(), window=st.integers(1, 63))
def test_forecast_matches_float64_reference_within_any_grid(kind, methods, window):
    got, _ = planned(kind, methods, window)
    for t, (a, b) in enumerate(zip(got, reference(kind, methods, window))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"step {t} of {methods}")


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_forecast_extrapolates_in_the_timestep_not_the_step_count(kind):
    methods = [["full"] * LAYERS, ["full"] * LAYERS, ["forecast"] * LAYERS, ["full"] * LAYERS, ["forecast"] * LAYERS]
    got, _ = planned(kind, methods, 8)
    right = reference(kind, methods, 8)
    torch.testing.assert_close(got[4], right[4], rtol=1e-9, atol=1e-10)
    model = float64_model(kind)
    by_step = ReferenceRun(methods, 8, cond_first=ORDERS[kind] == "cond_uncond", times=list(range(len(TIMES))))
    wrong = by_step.outputs(model, lambda t: [model(**inputs_at(kind, t)).sample])
    assert (got[4] - wrong[4]).abs().max() > 1e-6
    copy = [["full"] * LAYERS, ["full"] * LAYERS, ["ast"] * LAYERS, ["full"] * LAYERS, ["ast"] * LAYERS]
    assert (got[4] - planned(kind, copy, 8)[0][4]).abs().max() > 1e-6


def test_forecast_keeps_two_outputs_only_where_read_and_frees_them_after():
    column = ["full", "full", "ast", "full", "forecast", "forecast", "full", "wars", "full", "full", "forecast"]
    schedule = Schedule([[m] for m in column])
    kept = [t for t in range(len(column)) if schedule.keeps_output(t, 0)]
    assert kept == [1, 3, 8, 9]  # ast at 2 reads 1; forecasts at 4, 5 read 3 and 1; at 10: 9 and 8
    freed = [t for t in range(len(column)) if schedule.frees_after(t, 0)[1]]
    assert freed == [5, 10]  # after 2 the output of step 1 is still to be read at 4 and 5


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_derived_caches_give_the_outputs_of_keeping_everything_and_end_empty(kind):
    methods = [["full"] * LAYERS, ["full", "asc", "full"], ["forecast", "ast", "wars"], ["forecast", "full", "forecast"],
               ["full", "forecast", "ast"]]  # fmt: skip
    got, handle = planned(kind, methods, 8)
    keep_all = float64_model(kind)
    plan = plan_for(keep_all, methods, window=8, cfg_order=ORDERS[kind])
    with torch.no_grad(), runtime.apply(plan, keep_all) as everything:
        everything.runner.schedule = Schedule(methods, keep_all=True)
        expected = [keep_all(**inputs_at(kind, t)).sample for t in range(len(methods))]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    caches = handle.runner.state.caches
    assert all(c.output is None and c.previous is None and c.residual is None for c in caches)
    assert handle.stats().method_counts["forecast"] == 4


def test_a_plan_forecasting_without_two_computed_outputs_is_refused():
    model = float64_model("dit")
    methods = [["full"] * LAYERS, ["forecast", "full", "full"]]
    with pytest.raises(PlanError, match=r"\$\.methods\[1\]\[0\]: 'forecast' needs two earlier computed steps"):
        runtime.load_plan(msgspec.json.encode(plan_for(model, methods, cfg_order="cond_uncond")))


def test_forecast_needs_schema_version_4():
    model = float64_model("dit")
    methods = [["full"] * LAYERS, ["full"] * LAYERS, ["forecast"] * LAYERS]
    old = msgspec.structs.replace(plan_for(model, methods, cfg_order="cond_uncond"), schema_version=3)
    with pytest.raises(PlanError, match=r"\$\.methods\[2\]\[0\]: 'forecast' needs schema_version 4"):
        runtime.load_plan(msgspec.json.encode(old))
