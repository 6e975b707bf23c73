"""Uniform schedules (FORA- and TaylorSeer-like caches) written as plans."""

from __future__ import annotations

import pytest

from planner.schedules import base_plan, computed_steps, uniform_plan, uniform_plans
from schemas import decode_plan, encode_plan
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


def test_forecast_needs_two_computed_steps_and_reuse_must_be_known():
    with pytest.raises(ValueError, match="warmup >= 2"):
        uniform_plan(base_plan(profile()), 2, 1, "forecast")
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
    assert all(p.methods[1][0] == "full" for p in found if "forecast" in p.calibration.search)
