"""Refining a plan on its final score: cost-neutral moves, validity, the fit and the budget."""

from __future__ import annotations

import pytest

from planner.refine import executed_attention, moved, no_dearer, positions, refine, with_methods
from planner.schedules import base_plan, uniform_plan
from schemas import PlanError, decode_plan, encode_plan, method_cost
from schemas.plan import check_plan
from tests.planner.test_compile_forecast import LAYERS, STEPS, profile

WANTED = {0: [0, 2, 4], 1: [0, 1, 5]}  # per layer, the steps a synthetic score wants computed


def closeness(plan) -> float:
    """Minus the distance of every computed (``full``) cell to the nearest wanted step of its layer."""
    return -sum(
        min(abs(t - w) for w in WANTED[i])
        for t, row in enumerate(plan.methods) for i, m in enumerate(row) if m == "full"
    )  # fmt: skip


def column_counts(plan) -> list[dict[str, int]]:
    return [{m: [row[i] for row in plan.methods].count(m) for m in set(r[i] for r in plan.methods)}
            for i in range(LAYERS)]  # fmt: skip


def test_refine_climbs_to_the_best_grid_without_changing_any_layers_methods():
    start = uniform_plan(base_plan(profile()), 2, 1, "ast")  # full at steps 0, 2, 4 in both layers
    result = refine(start, closeness, max_evals=500)
    assert result.start == closeness(start) == -2  # layer 1 wants 1 and 5 where it has 2 and 4
    assert result.score == closeness(result.plan) == 0 and result.kept == 2
    assert [row[0] for row in result.plan.methods] == [row[0] for row in start.methods]
    assert [row[1] for row in result.plan.methods] == ["full", "full", "ast", "ast", "ast", "full"]
    assert column_counts(result.plan) == column_counts(start)
    assert result.plan.summary.attention_flops_fraction == start.summary.attention_flops_fraction
    assert result.plan.losses is None and result.plan.calibration.search.endswith("+refined")
    assert decode_plan(encode_plan(result.plan)) == result.plan


def test_a_check_score_keeps_the_refined_grid_only_where_it_gains_too():
    start = uniform_plan(base_plan(profile()), 2, 1, "ast")
    agrees = refine(start, closeness, max_evals=500, check=lambda plan: 10 * closeness(plan))
    assert agrees.passed and agrees.checked == (-20, 0) and agrees.plan == refine(start, closeness, max_evals=500).plan
    disagrees = refine(start, closeness, max_evals=500, check=lambda plan: -closeness(plan))
    assert not disagrees.passed and disagrees.checked == (2, 0) and disagrees.kept == 2
    assert disagrees.plan == start and (disagrees.start, disagrees.score) == (-2, 0)
    barely = refine(start, closeness, max_evals=500, min_gain=0.5, check=lambda plan: 0.1 * closeness(plan))
    assert not barely.passed and barely.plan == start  # gains 0.2 on the check, less than min_gain
    calls = []
    refine(start, lambda plan: 0.0, max_evals=5, check=lambda plan: calls.append(1) or 0.0)
    assert not calls  # nothing kept: nothing to check


def test_refine_skips_invalid_grids_and_those_that_do_not_fit():
    start = uniform_plan(base_plan(profile()), 2, 2, "forecast")  # full at 0, 1, 3, 5
    seen = []

    def score(plan):
        check_plan(plan)  # never handed an invalid grid
        seen.append(plan.methods)
        return closeness(plan)

    keep_layer_0 = lambda plan: [row[0] for row in plan.methods] == [row[0] for row in start.methods]  # noqa: E731
    result = refine(start, score, fits=keep_layer_0, max_evals=500)
    assert all([row[0] for row in grid] == [row[0] for row in start.methods] for grid in seen)
    assert (result.start, result.score) == (-5, -4)  # layer 0 held; layer 1's full at 3 moves to 2
    assert [row[1] for row in result.plan.methods] == ["full", "full", "full", "forecast", "forecast", "full"]
    with pytest.raises(PlanError):  # a forecast with one computed step before it is what was skipped
        check_plan(with_methods(start, moved(start.methods, (1, 0))))


def test_refine_spends_at_most_its_evaluations_and_keeps_the_plan_when_nothing_gains():
    start = uniform_plan(base_plan(profile()), 2, 1, "ast")
    calls = []
    result = refine(start, lambda plan: calls.append(1) or 0.0, max_evals=5)
    assert len(calls) == result.evals <= 5
    assert result.plan == start and result.kept == 0


def test_moves_cover_rows_and_cells_and_skip_equal_swaps():
    assert positions(4, 2) == [(1, None), (2, None), (1, 0), (2, 0), (1, 1), (2, 1)]
    grid = [["full", "full"], ["ast", "full"], ["ast", "ast"]]
    assert moved(grid, (1, None)) == [["full", "full"], ["ast", "ast"], ["ast", "full"]]
    assert moved(grid, (1, 0)) is None
    assert moved(grid, (1, 1)) == [["full", "full"], ["ast", "ast"], ["ast", "full"]]
    assert grid == [["full", "full"], ["ast", "full"], ["ast", "ast"]]  # not modified in place


def test_executed_attention_adds_the_windows_of_the_refreshing_steps():
    base = base_plan(profile())
    grid = [["full"] * LAYERS for _ in range(STEPS)]
    grid[1][0], grid[2][0] = "wars", "wars"  # step 0 of layer 0 refreshes its residual once
    plan = with_methods(base, grid)
    window = method_cost("wars", plan.tokens.num_tokens, plan.window)
    assert executed_attention(plan) == pytest.approx(plan.summary.attention_flops_fraction + window / (LAYERS * STEPS))
    assert executed_attention(base) == 1.0
    fits = no_dearer(plan)
    assert fits(plan) and not fits(base)
