"""The compiler's ``ratio`` pick: the fitting method that saves the most cost per unit of loss."""

from __future__ import annotations

import math

import msgspec
import pytest

from planner.compile import Compiler, _best_ratio_fit, _cheapest_fit, compile_plan
from planner.errors import PlannerError
from schemas import Latency, decode_plan, encode_plan
from tests.planner.test_compile_forecast import LAGS, LAYERS, STEPS, profile


def with_wars(distance: float):
    """``profile(ast=0.5)`` (predicted ``ast`` loss 0.05) whose ``wars`` distance is ``distance`` at every lag."""
    base = profile(ast=0.5)
    wars = [[[distance if k <= t else None for k in range(1, LAGS + 1)] for _ in range(LAYERS)] for t in range(STEPS)]
    return msgspec.structs.replace(base, measurements=msgspec.structs.replace(base.measurements, wars=wars))


def test_ratio_takes_the_most_saving_per_unit_of_loss_among_those_that_fit():
    options = {"ast": 0.5, "forecast": None, "wars": 0.1, "asc": 0.05}
    savings = {"ast": 1.0, "forecast": 1.0, "wars": 0.8, "asc": 0.5}
    assert _cheapest_fit(options, 0.0, 1.0, "sum", "full") == ("ast", 0.5)
    assert _best_ratio_fit(options, 0.0, 1.0, "sum", "full", savings) == ("asc", 0.05)  # 10 per unit, wars 8, ast 2
    assert _best_ratio_fit(options, 0.2, 0.27, "sum", "full", savings) == ("asc", pytest.approx(0.25))  # only asc fits
    assert _best_ratio_fit(options, 0.0, 0.01, "sum", "full", savings) == ("full", 0.0)  # none fits
    assert _best_ratio_fit({**options, "wars": 0.0}, 0.0, 1.0, "sum", "full", savings) == ("wars", 0.0)  # free: first
    assert _best_ratio_fit(options, 0.0, 1.0, "sum", "full", {**savings, "asc": 0.0})[0] == "wars"  # saves nothing
    assert _best_ratio_fit({"ast": 0.3, "wars": 0.4}, 0.3, 0.5, "rss", "full", {"ast": 1.0, "wars": 1.0}) == (
        "ast", pytest.approx(math.hypot(0.3, 0.3))
    )


def test_a_cheap_accurate_window_beats_a_free_costly_reuse_under_ratio_only():
    p = with_wars(0.01)  # wars predicts 0.001 for about half the cost; ast 0.05 for all of it
    cheapest = compile_plan(p, 0.8, objective="flops")
    ratio = compile_plan(p, 0.8, objective="flops", pick="ratio")
    assert all(m == "ast" for row in cheapest.methods[1:] for m in row)
    assert all(m == "wars" for row in ratio.methods[1:] for m in row)
    assert ratio.calibration.search == "profile-ratio" and decode_plan(encode_plan(ratio)) == ratio
    assert ratio.summary.attention_flops_fraction > cheapest.summary.attention_flops_fraction


def test_ratio_counts_the_time_objective_in_measured_seconds():
    p = with_wars(0.01)
    fast_window = {"full": 1.0, "full_refresh": 1.0, "wars": 0.2, "ast": 0.05, "forecast": 0.05}
    slow_window = {**fast_window, "wars": 0.99}  # saves 0.01 s for a loss of 0.001: 10 per unit; ast 0.95 / 0.05 = 19
    for seconds, chosen in ((fast_window, "wars"), (slow_window, "ast")):
        latency = Latency(device="test device", dtype="float32", kernel="auto", rows=2, seconds=seconds)
        plan = compile_plan(msgspec.structs.replace(p, latency=latency), 0.8, pick="ratio")
        assert plan.calibration.search == "profile-time-ratio"
        assert {m for row in plan.methods[1:] for m in row} == {chosen}


def test_ratio_plans_keep_their_budgets_and_are_monotone_in_delta():
    compiler = Compiler(with_wars(0.3), objective="flops", pick="ratio")
    previous = math.inf
    for delta in (1.0, 0.95, 0.9, 0.8, 0.6, 0.3):
        plan = compiler.plan(delta)
        for t, row in enumerate(plan.losses[1:], start=1):  # the step's running loss within its last unit's limit
            assert max((x for x in row if x is not None), default=0.0) <= 1 - delta + 1e-12
        assert plan.summary.attention_flops_fraction <= previous + 1e-12
        previous = plan.summary.attention_flops_fraction


def test_an_unknown_pick_is_refused():
    with pytest.raises(PlannerError, match="pick: use cheapest or ratio"):
        Compiler(profile(), pick="best")  # type: ignore[arg-type]
