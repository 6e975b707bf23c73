"""Uniform schedules (FORA- and TaylorSeer-like caches) written as plans."""

from __future__ import annotations

import msgspec
import pytest

from planner.schedules import base_plan, computed_steps, uniform_plan, uniform_plans
from schemas import Costs, decode_plan, encode_plan
from tests.planner.test_compile_forecast import LAYERS, STEPS, profile


def attention(plan) -> float:
    return plan.summary.attention_flops_fraction


@pytest.mark.parametrize(
    ("steps", "interval", "warmup", "expected"),
    [
        (10, 3, 2, [0, 1, 4, 7]),
        (10, 2, 1, [0, 2, 4, 6, 8]),
        (6, 4, 3, [0, 1, 2]),  # 2 + 4 = 6 is past the last step
    ],
)
def test_computed_steps_are_the_warmup_then_every_interval_after_its_last(steps, interval, warmup, expected):
    computed = computed_steps(steps, interval, warmup)
    assert [t for t, c in enumerate(computed) if c] == expected


@pytest.mark.parametrize("reuse", ["ast", "forecast"])
def test_uniform_plan_computes_every_layer_on_its_steps_and_reuses_between(reuse):
    plan = uniform_plan(base_plan(profile()), 2, 2, reuse)
    assert plan.methods == [["full"] * LAYERS if t in (0, 1, 3, 5) else [reuse] * LAYERS for t in range(STEPS)]
    assert attention(plan) == pytest.approx(4 / STEPS)
    assert plan.calibration.search == f"uniform-{reuse}-every-2-after-2"
    assert decode_plan(encode_plan(plan)) == plan  # a valid plan: forecasts have two computed steps before them


@pytest.mark.parametrize("ffn", [False, True])
def test_a_forecast_schedule_copies_until_two_steps_are_computed(ffn):
    base = base_plan(profile())
    if ffn:
        ones = [1.0] * LAYERS
        base = msgspec.structs.replace(base, costs=Costs(attention=ones, projections=ones, ffn=ones, other=1.0))
    plan = uniform_plan(base, 3, 1, "forecast", ffn=ffn)  # computed 0, 3
    between = {1: "ast", 2: "ast", 4: "forecast", 5: "forecast"}
    assert plan.methods == [["full"] * LAYERS if t in (0, 3) else [between[t]] * LAYERS for t in range(STEPS)]
    if ffn:
        names = {"full": "compute", "ast": "reuse", "forecast": "forecast"}
        assert plan.ffn == [[names[m[0]]] * LAYERS for m in plan.methods]
    assert decode_plan(encode_plan(plan)) == plan


def test_reuse_must_be_known_and_ffn_counted():
    with pytest.raises(ValueError, match="reuse: expected one of"):
        uniform_plan(base_plan(profile()), 2, 2, "wars")
    with pytest.raises(ValueError, match=r"ffn: the plan counts no feed-forward layers"):
        uniform_plan(base_plan(profile()), 2, 2, "ast", ffn=True)


@pytest.mark.parametrize("target", [0.5, 0.34, 0.7])
def test_uniform_plans_take_the_most_compute_that_fits_the_target(target):
    found = uniform_plans(base_plan(profile()), target, attention)
    assert found, "some uniform schedule fits"
    for plan in found:
        assert attention(plan) <= target
        _, reuse, _, interval, _, warmup = plan.calibration.search.split("-")
        if int(interval) > 2:  # the next denser schedule would not fit
            assert attention(uniform_plan(base_plan(profile()), int(interval) - 1, int(warmup), reuse)) > target
    for plan in found:  # every forecast has two computed steps before it
        computed = [row[0] == "full" for row in plan.methods]
        assert all(sum(computed[:t]) >= 2 for t, row in enumerate(plan.methods) if row[0] == "forecast")
    assert any("forecast" in p.calibration.search and "after-1" in p.calibration.search for p in found)
