"""Refine a plan against its final images: cost-neutral moves, kept when the score improves.

The compiler predicts a plan's error from per-step, per-layer losses; the final image can
disagree. ``refine`` takes a plan and a ``score`` (higher is better: e.g. the PSNR of the
calibration images against raw) and tries moves that leave every layer's methods the
same multiset, so the plan's attention FLOPs do not change: two neighbouring steps of one
layer trade methods, or two neighbouring steps trade whole rows (a computation moves one
step earlier or later). A move is kept when the plan stays valid (``schemas.check_plan``),
``fits`` (e.g. the attention it executes with its residual refreshes stays under a
target) and scores more than ``min_gain`` above the best so far. Sweeps repeat until one
keeps nothing or ``max_evals`` scores are spent. The refined plan drops the compiler's
predicted ``losses`` (they were for the old grid) and adds ``+refined`` to its search name.

A handful of calibration images is easy to overfit: a move can gain on them and lose on
any other sample. With a ``check`` score (the same prompts with the next seeds,
``calibration_score(..., seed_offset=len(prompts))``) the refined plan is returned only
if it also gains more than ``min_gain`` there; otherwise the starting plan is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

import runtime
from planner import yardstick
from planner.calibration import inputs_hash
from planner.errors import bad_input
from planner.evaluate import EvalInputs, call_kwargs, match_scheduler
from planner.registry import ModelSpec
from schemas import Plan, PlanError, head_cells, layer_weight, method_cost, plan_layers, summarize
from schemas.latency import refreshed_cells
from schemas.plan import check_plan, with_figures, with_latency


@dataclass(frozen=True)
class Refined:
    """The plan returned, the best grid's score (the returned plan's, unless the check dropped
    that grid), the starting score, the moves kept and the scores spent; with a check, the
    start's and the best grid's check scores and whether the grid passed."""

    plan: Plan
    score: float
    start: float
    kept: int
    evals: int
    checked: tuple[float, float] | None = None
    passed: bool = True

    def check_note(self) -> str:
        """The check in a line (empty without one): its scores and whether the refined grid was kept."""
        if self.checked is None:
            return ""
        outcome = "kept" if self.passed else "no gain there, the plan is written unrefined"
        return f"next seeds {self.checked[0]:.2f} → {self.checked[1]:.2f} dB: {outcome}"


def executed_attention(plan: Plan) -> float:
    """The plan's attention FLOPs fraction plus the windows its residual refreshes run
    (half a window at an ``asc`` step), as ``RunStats`` counts them."""
    layers = plan_layers(plan)
    weights = [layer_weight(x) for x in layers]
    refresh = sum(
        weights[i] * (0.5 if plan.methods[t][i] == "asc" else 1.0)
        * method_cost("wars", layers[i].num_tokens, layers[i].window, layers[i].text_tokens)
        for t, i in refreshed_cells(plan.methods, head_cells(plan))
    )  # fmt: skip
    return plan.summary.attention_flops_fraction + refresh / (sum(weights) * len(plan.methods))


def no_dearer(start: Plan) -> Callable[[Plan], bool]:
    """Whether a plan executes no more attention, nor transformer FLOPs, than ``start``."""
    attention, transformer = executed_attention(start), start.summary.transformer_flops_fraction

    def fits(plan: Plan) -> bool:
        if executed_attention(plan) > attention + 1e-12:
            return False
        return transformer is None or plan.summary.transformer_flops_fraction <= transformer + 1e-12

    return fits


def calibration_score(
    pipe: Any, spec: ModelSpec, like: Plan, prompts: Sequence[Any], *, seed_offset: int = 0
) -> Callable[[Plan], float]:
    """A plan's PSNR against raw over ``prompts`` with seeds ``calibration.seed + seed_offset + i``,
    as ``like`` samples (steps, guidance, size); the raw images are made once, here. The
    prompts must be the plan's calibration prompts (its ``prompts_hash``)."""
    c = like.calibration
    if c is None or c.prompts_hash != inputs_hash(list(prompts)):
        raise bad_input("prompts: not the plan's calibration prompts ($.calibration.prompts_hash); pass them")
    seeds = tuple(c.seed + seed_offset + i for i in range(len(prompts)))
    inputs = EvalInputs(tuple(prompts), None, seeds)
    match_scheduler(pipe, like)

    def images() -> np.ndarray:
        return np.asarray(pipe(**call_kwargs(spec, like, inputs, slice(0, len(inputs)))).images, dtype=np.float64)

    raw = images()

    def score(plan: Plan) -> float:
        with runtime.apply(plan, pipe):
            return float(yardstick.psnr(raw, images()))

    return score


def with_methods(plan: Plan, methods: list[list[str]]) -> Plan:
    """``plan`` with another method grid, its summary, figures and predicted time derived again
    (per-head cells stay where they are: a move that leaves one on a cell not ``wars`` makes
    an invalid plan, which is never scored)."""
    summary = summarize(methods, plan.tokens.num_tokens, plan.window, plan.layers, head_cells(plan))
    plan = msgspec.structs.replace(plan, methods=methods, losses=None, summary=summary)
    return with_latency(with_figures(plan), plan.latency)


Move = tuple[int, int | None]  # (step t, layer i): steps t and t + 1 trade layer i's methods, or whole rows (None)


def positions(steps: int, layers: int) -> list[Move]:
    """Every move: adjacent rows (never row 0), then adjacent cells of each layer."""
    rows: list[Move] = [(t, None) for t in range(1, steps - 1)]
    return rows + [(t, i) for i in range(layers) for t in range(1, steps - 1)]


def moved(methods: list[list[str]], move: Move) -> list[list[str]] | None:
    """``methods`` with ``move`` made; ``None`` where it changes nothing."""
    t, i = move
    if (methods[t] if i is None else methods[t][i]) == (methods[t + 1] if i is None else methods[t + 1][i]):
        return None
    grid = [list(row) for row in methods]
    if i is None:
        grid[t], grid[t + 1] = grid[t + 1], grid[t]
    else:
        grid[t][i], grid[t + 1][i] = grid[t + 1][i], grid[t][i]
    return grid


def refine(
    plan: Plan,
    score: Callable[[Plan], float],
    *,
    fits: Callable[[Plan], bool] = lambda plan: True,
    max_evals: int = 200,
    min_gain: float = 0.05,
    progress: Callable[[int, float], None] | None = None,
    check: Callable[[Plan], float] | None = None,
) -> Refined:
    """Hill-climb ``plan`` on ``score`` (see the module docstring): the moves are tried in
    turn, round and round, each on the best grid so far, until a whole round keeps none or
    ``max_evals`` scores are spent; ``progress(evals, best)`` follows each score. With
    ``check``, a refined grid that does not also gain ``min_gain`` on it is dropped."""
    best, best_score = plan, score(plan)
    start, kept, evals = best_score, 0, 1
    order = positions(len(plan.methods), len(plan.methods[0]))
    since_kept, k = 0, 0
    while since_kept < len(order) and evals < max_evals:
        move, k, since_kept = order[k], (k + 1) % len(order), since_kept + 1
        grid = moved(best.methods, move)
        if grid is None:
            continue
        try:
            candidate = with_methods(best, grid)
            check_plan(candidate)
        except PlanError:
            continue
        if not fits(candidate):
            continue
        value = score(candidate)
        evals += 1
        if progress is not None:
            progress(evals, max(best_score, value))
        if value > best_score + min_gain:
            best, best_score, kept, since_kept = candidate, value, kept + 1, 0
    if not kept:
        return Refined(plan, start, start, 0, evals)
    checked = None
    if check is not None:
        checked = (check(plan), check(best))
        if checked[1] <= checked[0] + min_gain:
            return Refined(plan, best_score, start, kept, evals, checked, passed=False)
    if best.calibration is not None:
        calibration = msgspec.structs.replace(best.calibration, search=f"{best.calibration.search}+refined")
        best = msgspec.structs.replace(best, calibration=calibration)
    return Refined(best, best_score, start, kept, evals, checked)
