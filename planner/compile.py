"""Compile a plan from a profile for any δ, without running the model.

The rule mirrors the greedy search (DESIGN §2) on predicted losses. Per step
``t = 1 … T-1`` and layer ``i = 0 … L-1`` in order, the first candidate of ``ast`` /
``forecast`` (both free: the lower loss of the two), ``wars_asc``, ``wars``, ``asc`` whose
predicted loss fits ``(i + 1) / L × (1 − δ) / w_t`` is kept, else ``full``. ``w_t`` is the
profile's step weight to the power ``STEP_WEIGHT_POWER`` (1 without weights): steps whose
errors move the final image more get less budget. With ``ffn`` the feed-forward layers
take part too (``reuse`` / ``forecast``, else ``compute``), interleaved with the attention
layers by depth, and the objective is the transformer's FLOPs. A candidate's own loss is predicted as ``gain[t][i] × dist`` and
added to the loss of the step's earlier choices: ``sum`` (default) adds them, an upper
bound when errors do not cancel; ``rss`` takes the root of the sum of squares, as for
independent errors, which usually keeps less attention at the same δ. Here

- ``dist`` is the profile's distance of that method at ``(t, i)`` with the caches the
  plan being compiled leaves there: for ``ast`` the output of the layer's last
  computed step, for ``wars``/``wars_asc`` the residual of its last ``full``/``asc``
  step (``wars_after_asc`` when that was ``asc``). A cache older than the profile's
  ``lags`` is bounded by chaining measurements (``Predictor.distance``).
- ``gain[t][i]`` is ``loss / dist`` of the method itself when it was probed, else the
  mean over the probed methods: the share of a layer's error that reaches the output.

To make the plan monotone in δ, the rule is evaluated at every δ' = 1 − k/1000 with
δ' ≥ δ, and the plan of the least cost is chosen (each satisfies δ's budgets, which
only widen as δ falls; with ``heads`` each δ' also offers its plan without per-head
cells). So δ = 1 gives the all-``full`` plan, lower δ never costs more, and δ
counts to 0.001. The cost is the objective: ``flops``, the attention FLOPs kept, or
``time``, the time predicted from the latencies the profile measured (the default when
it has them). With latencies, a method that is not faster than ``full`` on the measured
device is never a candidate, and ``time`` tries the candidates fastest first.

With ``heads`` (profiles of schema version 5, which measured ``head_ast``/``head_wars``),
an attention unit whose kept method is ``full`` or ``wars``, whose residual comes from a
``full`` step, may become a per-head cell (``Plan.heads``): each head ``h`` runs ``f``
(distance 0, cost 1), ``w`` (distance ``head_wars[t][i][h] × r_w``, the layer's ``wars``
cost) or ``a`` (distance ``head_ast[t][i][h] × r_a``, cost 0; costs in the objective's
units, relative to ``full``). ``r_w = d_wars(t, i, lag) / d_wars(t, i, 1)`` with the
residual's age and ``r_a = d_ast(t, i, lag) / d_ast(t, i, 1)`` with the age of the
layer's last computed output rescale the lag-1 head figures (1 where undefined or zero).
The cell's own loss is ``gain_wars[t][i] × sqrt(Σ_h d_h²)`` (independent heads), combined
with the step's running loss as above. The letters are chosen greedily: from all ``f``,
the move (``f→w``, ``f→a``, ``w→a``) that saves the most cost per unit of added squared
distance, while the total fits; of the states it went through, the last one that is
neither all ``w`` (the plain ``wars`` cell) nor all ``a`` (that is ``ast``, whose own
measured distance decided it) and is strictly cheaper than the method kept is taken.
The cell is a computed step for later ``ast`` and ``forecast`` and leaves the residual's
step unchanged.

``pick`` ``ratio`` replaces "the first candidate that fits" by the fitting candidate that
saves the most cost (in the objective's units, against ``full``) per unit of its own
predicted loss; a zero loss ranks first, ties go to the larger saving.
Pure Python: no model, no torch.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Literal

import msgspec

from planner.errors import bad_input
from schemas import (
    HEAD_LETTERS,
    METHODS,
    HeadCell,
    Plan,
    Profile,
    ProfileError,
    decode_profile,
    effective_seconds,
    faster_than_full,
    layer_weight,
    method_cost,
    plan_layers,
    time_fraction,
    with_latency,
)
from schemas.latency import Heads
from schemas.plan import flops_fractions
from schemas.profile import forecast_pairs, header_plan, profile_calibration

CANDIDATES = ("ast", "forecast", "wars_asc", "wars", "asc")  # most compressive first, as the search
REUSES = ("ast", "forecast")  # cost nothing: of two that fit, the lower loss is kept
REUSES_ANY = (*REUSES, "reuse")  # with the feed-forward layers' reuse
CFG_SHARING = ("wars_asc", "asc")
# profile measure -> the method it predicts
MEASURES = {"ast": "ast", "wars_asc": "wars_asc", "wars": "wars", "wars_after_asc": "wars", "asc": "asc"}
RESOLUTION = 1000  # δ is compiled on the grid 1 - k / RESOLUTION
STEP_WEIGHT_POWER = 0.5  # a step's budget is divided by its measured weight to this power
Combine = Literal["sum", "rss"]
COMBINE: tuple[str, ...] = ("sum", "rss")
Objective = Literal["time", "flops", "transformer"]
OBJECTIVES: tuple[str, ...] = ("time", "flops", "transformer")
Pick = Literal["cheapest", "ratio"]
PICKS: tuple[str, ...] = ("cheapest", "ratio")
SEARCH_NAMES = {"sum": "profile", "rss": "profile-rss"}  # the plan's calibration.search
# one state of a per-head cell's greedy: (letters, mean cost, Σ d², max Σ d² up to it)
HeadState = tuple[str, float, float, float]


def tool_version() -> str:
    """The installed ditfastattn version (as ``planner.build`` records it, without its imports)."""
    try:
        return metadata.version("ditfastattn")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class Choice:
    """The methods of one compiled grid (and its feed-forward grid, when compiled with one),
    the predicted loss of each kept decision, its cost, and its per-head cells
    (``(step, layer)`` -> letters; their grid method is ``wars``)."""

    methods: list[list[str]]
    losses: list[list[float | None]]
    cost: float
    ffn: list[list[str]] | None = None
    heads: Heads = field(default_factory=dict)


class Predictor:
    """Predicted output losses of every candidate at every (step, layer, cache age)."""

    def __init__(
        self,
        profile: Profile,
        objective: Objective = "flops",
        *,
        weighted: bool = False,
        ffn: bool = False,
        power: float = STEP_WEIGHT_POWER,
        heads: bool = False,
    ) -> None:
        self.profile = profile
        m = profile.measurements
        self.heads = heads and m.head_ast is not None and m.head_wars is not None
        self.ffn_layers = len(m.ffn_reuse[0]) if ffn and m.ffn_reuse else 0
        self.steps, self.layers, self.lags = profile.sampling.num_steps, profile.model.num_layers, profile.lags
        candidates = tuple(
            c for c in CANDIDATES
            if (profile.sampling.cfg or c not in CFG_SHARING) and (c != "forecast" or m.forecast is not None)
        )
        if profile.latency is not None:
            candidates = faster_than_full(profile.latency, candidates)
            if objective == "time":
                candidates = tuple(sorted(candidates, key=lambda c: effective_seconds(profile.latency, c)))
        self.candidates = candidates
        self.objective = objective
        self.by_lag = {"ast": m.ast, "wars": m.wars, "wars_after_asc": m.wars_after_asc, "wars_asc": m.wars_asc}
        self._chained: dict[tuple[str, int, int, int], float | None] = {}
        self.gains = [[self._gain(t, i) for i in range(self.layers)] for t in range(self.steps)]
        # table[measure][t][i][lag]: predicted loss reading a cache ``lag`` steps old (asc: lag 0)
        self.table: dict[str, list[list[list[float | None]]]] = {}
        self.costs = [
            {c: layer_weight(x) * method_cost(c, x.num_tokens, x.window, x.text_tokens) for c in METHODS}
            for x in plan_layers(header_plan(profile))
        ]
        grids = {**self.by_lag, "asc": m.asc}
        for measure, method in MEASURES.items():
            if method in self.candidates and grids[measure] is not None:
                self.table[measure] = [
                    [self._row(measure, method, t, i) for i in range(self.layers)] for t in range(self.steps)
                ]
        self.pairs = {pair: p for p, pair in enumerate(forecast_pairs(self.lags))}
        self.weights = [1.0] * self.steps
        if weighted and m.step_weight is not None:
            self.weights = [1.0 if w is None else w**power for w in m.step_weight]
        # per layer, in the objective's units: each head letter's cost relative to full, and
        # each candidate's cost saved against full (pick ratio)
        if objective == "time" and profile.latency is not None:
            seconds = profile.latency.seconds
            units = {c: seconds[m] / seconds["full"] if seconds["full"] else 1.0 for c, m in HEAD_LETTERS.items()}
            effective = {c: effective_seconds(profile.latency, c) for c in self.candidates}
            saved = {c: seconds["full"] - x for c, x in effective.items() if x is not None}
            self.head_units = [units for _ in range(self.layers)]
            self.savings = [saved for _ in range(self.layers)]
        else:
            self.head_units = [
                {c: x[m] / x["full"] if x["full"] else 1.0 for c, m in HEAD_LETTERS.items()} for x in self.costs
            ]
            self.savings = [{c: x["full"] - x[c] for c in self.candidates} for x in self.costs]
        self._head_states: dict[tuple[int, int, int, int], list[HeadState]] = {}

    def forecast_loss(self, t: int, i: int, a: int, b: int) -> float | None:
        """Predicted output loss of ``forecast`` at ``(t, i)`` from the outputs of steps ``a > b``."""
        pair = self.pairs.get((t - a, t - b))
        gain = self.gains[t][i].get("forecast")
        dist = self.profile.measurements.forecast[t][i][pair] if pair is not None else None
        return None if gain is None or dist is None else gain * dist

    def distance(self, measure: str, t: int, i: int, lag: int = 1) -> float | None:
        """The distance of ``measure`` at ``(t, i)`` for a cache ``lag`` steps old.

        Within the profile's ``lags`` it is the measured one; older caches chain
        measurements through step ``s = t - lags`` (triangle inequality, norms rescaled):
        ``d(t, lag) ≤ d(t, lags) + d_base(s, lag - lags) × ||O_s|| / ||O_t||``, where the
        base is ``ast`` for ``ast`` and ``wars`` (the residual's drift) for the others.
        """
        if measure == "asc":
            return self.profile.measurements.asc[t][i]
        if not 1 <= lag <= t:
            return None
        if lag <= self.lags:
            return self.by_lag[measure][t][i][lag - 1]
        key = (measure, t, i, lag)
        if key not in self._chained:
            s = t - self.lags
            head = self.by_lag[measure][t][i][self.lags - 1]
            rest = self.distance("ast" if measure == "ast" else "wars", s, i, lag - self.lags)
            norms = self.profile.measurements.output_norm
            value = None
            if head is not None and rest is not None and norms[t][i] and norms[s][i] is not None:
                value = head + rest * norms[s][i] / norms[t][i]
            self._chained[key] = value
        return self._chained[key]

    def _gain(self, t: int, i: int) -> dict[str, float]:
        own: dict[str, float] = {}
        for method, grid in self.profile.measurements.loss.items():
            if method == "forecast":  # probed, but its distance needs a pair of lags
                pair = self.profile.measurements.forecast
                loss, dist = grid[t][i], pair[t][i][0] if pair is not None and t >= 2 else None
            else:
                loss, dist = grid[t][i], self.distance(method, t, i)
            if loss is None or dist is None:
                continue
            if dist > 0.0:
                own[method] = loss / dist
            elif loss == 0.0:
                own[method] = 0.0
        if not own:
            return {}
        mean = sum(own.values()) / len(own)
        return {c: own.get(c, mean) for c in self.candidates}

    def _row(self, measure: str, method: str, t: int, i: int) -> list[float | None]:
        gain = self.gains[t][i].get(method)
        lags = [0] if measure == "asc" else range(t + 1)
        return [None if gain is None or (d := self.distance(measure, t, i, lag)) is None else gain * d for lag in lags]

    def cost(self, methods: list[list[str]], ffn: list[list[str]] | None = None, heads: Heads | None = None) -> float:
        """The objective of a grid: its attention FLOPs, the transformer's FLOPs (with the
        feed-forward grid ``ffn``) or its predicted time, as a fraction; the per-head cells
        ``heads`` at their heads' mean cost."""
        if self.objective == "time":
            return time_fraction(methods, self.profile.latency, heads or None)
        if self.objective == "transformer":
            cells = [HeadCell(t, i, letters) for (t, i), letters in sorted(heads.items())] if heads else None
            plan = msgspec.structs.replace(header_plan(self.profile), methods=methods, ffn=ffn, heads=cells)
            return flops_fractions(plan)[1]
        return _flops(self.costs, methods, heads)

    def head_cell(
        self, t: int, i: int, kept: str, wars_lag: int, ast_lag: int, so_far: float, limit: float, combine: Combine
    ) -> tuple[str, float] | None:
        """The per-head cell at ``(t, i)`` replacing ``kept`` (``full`` or ``wars``) and its total
        loss with the step's running loss ``so_far``, the residual ``wars_lag`` and the last
        computed output ``ast_lag`` steps old; ``None`` when none fits or it saves nothing."""
        gain = self.gains[t][i].get("wars")
        if gain is None or not math.isfinite(gain):
            return None
        states = self._head_sequence(t, i, wars_lag, ast_lag)

        def total(d2: float) -> float:
            return _combined(so_far, gain * math.sqrt(d2), combine)

        fits = bisect.bisect_left(states, True, key=lambda state: total(state[3]) > limit)
        bound = self.head_units[i][{"full": "f", "wars": "w"}[kept]]
        for letters, cost, d2, _ in reversed(states[:fits]):  # the cheapest fitting state first
            if cost >= bound:
                return None
            if len(set(letters)) > 1:  # all w is the plain wars cell, all a is ast
                return letters, total(d2)
        return None

    def _ratio(self, measure: str, t: int, i: int, lag: int) -> float:
        """``d(t, i, lag) / d(t, i, 1)``: 1 where either is undefined or zero."""
        base, value = self.distance(measure, t, i, 1), self.distance(measure, t, i, lag)
        return value / base if base and value is not None and math.isfinite(value / base) else 1.0

    def _head_sequence(self, t: int, i: int, wars_lag: int, ast_lag: int) -> list[HeadState]:
        """The states of the per-head greedy at ``(t, i)`` (a cached function of the caches' ages):
        from all ``f``, each best move in turn, until no move saves cost."""
        key = (t, i, wars_lag, ast_lag)
        if key in self._head_states:
            return self._head_states[key]
        m = self.profile.measurements
        r_w, r_a = self._ratio("wars", t, i, wars_lag), self._ratio("ast", t, i, ast_lag)
        dist = {
            "w": [None if d is None else d * r_w for d in m.head_wars[t][i]],
            "a": [None if d is None else d * r_a for d in m.head_ast[t][i]],
        }
        units = self.head_units[i]
        heads = len(dist["w"])
        letters, d2 = ["f"] * heads, [0.0] * heads
        cost, total, peak = float(heads), 0.0, 0.0
        states: list[HeadState] = []
        while True:
            best = None
            for h in range(heads):
                for target in ("w", "a"):
                    d = dist[target][h]
                    saving = units[letters[h]] - units[target]
                    if d is None or letters[h] == target or letters[h] == "a" or saving <= 0.0:
                        continue
                    added = d * d - d2[h]
                    rank = (math.inf if added <= 0.0 else saving / added, saving)
                    if best is None or rank > best[0]:
                        best = rank, h, target, added
            if best is None:
                break
            _, h, target, added = best
            cost -= units[letters[h]] - units[target]
            letters[h], d2[h] = target, d2[h] + added
            total = sum(d2)
            peak = max(peak, total)
            states.append(("".join(letters), cost / heads, total, peak))
        self._head_states[key] = states
        return states

    def units(self) -> list[tuple[str, int]]:
        """The order a step spends its budget in: attention layer ``i`` at depth ``(i + ½) / L``,
        feed-forward layer ``j`` just after, at ``(j + ¾) / F``."""
        units = [((i + 0.5) / self.layers, "attention", i) for i in range(self.layers)]
        units += [((j + 0.75) / self.ffn_layers, "ffn", j) for j in range(self.ffn_layers)]
        return [(kind, index) for _, kind, index in sorted(units)]

    def ffn_loss(self, t: int, j: int, method: str, a: int, b: int) -> float | None:
        """Predicted output loss of feed-forward layer ``j`` running ``method`` at step ``t``,
        its last two computed steps ``a > b`` (``b`` = -1: none)."""
        m = self.profile.measurements
        loss, dist = m.ffn_loss[t][j], m.ffn_reuse[t][j][0] if t >= 1 else None
        if loss is None or dist is None:
            return None
        gain = loss / dist if dist > 0 else 0.0
        if method == "reuse":
            value = m.ffn_reuse[t][j][t - a - 1] if t - a <= self.lags else None
        else:
            pair = self.pairs.get((t - a, t - b)) if b >= 0 else None
            value = m.ffn_forecast[t][j][pair] if pair is not None else None
        return None if value is None else gain * value

    def loss(self, t: int, i: int, measure: str, lag: int) -> float | None:
        """Predicted output loss of the method measured by ``measure``, alone at ``(t, i)``."""
        row = self.table[measure][t][i] if measure in self.table else []
        return row[lag] if 0 <= lag < len(row) else None


def _rule(predictor: Predictor, budget: float, combine: Combine, pick: Pick, *, with_heads: bool = True) -> Choice:
    """The greedy rule on predicted losses with ``budget`` = 1 − δ.

    Per step the units (attention layers, and feed-forward layers when compiled with them,
    interleaved by depth: ``Predictor.units``) spend the step's budget in order, unit ``u``
    of ``U`` up to ``(u + 1) / U`` of it. Per-head cells are tried when the predictor has
    per-head figures and ``with_heads``.
    """
    p, table, layers = predictor, predictor.table, predictor.layers
    methods = [["full"] * layers for _ in range(p.steps)]
    losses: list[list[float | None]] = [[None] * layers for _ in range(p.steps)]
    ffn = [["compute"] * p.ffn_layers for _ in range(p.steps)]
    heads: Heads = {}
    computed = [0] * layers  # last step that computed this layer's output (ast source)
    before = [-1] * layers  # the computed step before it (forecast's second source)
    source = [0] * layers  # last full/asc step: the residual's step
    after_asc = [False] * layers  # whether that step was asc
    ffn_computed, ffn_before = [0] * p.ffn_layers, [-1] * p.ffn_layers
    units = p.units()
    for t in range(1, p.steps):
        so_far = 0.0
        scale = budget / p.weights[t] if p.weights[t] > 0 else math.inf
        for u, (kind, i) in enumerate(units):
            limit = (u + 1) / len(units) * scale
            if kind == "ffn":
                options = {"reuse": p.ffn_loss(t, i, "reuse", ffn_computed[i], ffn_before[i]),
                           "forecast": p.ffn_loss(t, i, "forecast", ffn_computed[i], ffn_before[i])}  # fmt: skip
                kept, so_far = _cheapest_fit(options, so_far, limit, combine, "compute")
                ffn[t][i] = kept
                if kept == "compute":
                    ffn_computed[i], ffn_before[i] = t, ffn_computed[i]
                continue
            options = {}
            for c in p.candidates:
                if c == "forecast":
                    options[c] = p.forecast_loss(t, i, computed[i], before[i]) if before[i] >= 0 else None
                    continue
                if c == "ast":
                    row, lag = table["ast"][t][i], t - computed[i]
                elif c == "asc":
                    row, lag = table["asc"][t][i], 0
                else:
                    measure = "wars_after_asc" if c == "wars" and after_asc[i] else c
                    row, lag = table[measure][t][i], t - source[i]
                options[c] = row[lag] if lag < len(row) else None
            previous = so_far
            if pick == "ratio":
                kept, so_far = _best_ratio_fit(options, so_far, limit, combine, "full", p.savings[i])
            else:
                kept, so_far = _cheapest_fit(options, so_far, limit, combine, "full")
            methods[t][i], losses[t][i] = kept, so_far
            if with_heads and p.heads and kept in ("full", "wars") and not after_asc[i]:
                cell = p.head_cell(t, i, kept, t - source[i], t - computed[i], previous, limit, combine)
                if cell is not None:
                    heads[t, i], so_far = cell
                    methods[t][i], losses[t][i] = "wars", so_far
                    computed[i], before[i] = t, computed[i]  # computed; the residual's step stays
                    continue
            if kept not in REUSES:
                computed[i], before[i] = t, computed[i]
            if kept in ("full", "asc"):
                source[i], after_asc[i] = t, kept == "asc"
    grid = ffn if p.ffn_layers else None
    return Choice(methods, losses, predictor.cost(methods, grid, heads), grid, heads)


def check_options(combine: str, objective: str | None, pick: str) -> None:
    """Refuse a ``combine``, ``objective`` (``None``: the profile's default) or ``pick`` the
    compiler does not know, in one line naming the option and the values it takes."""
    options = (("combine", combine, COMBINE), ("pick", pick, PICKS), ("objective", objective, OBJECTIVES))
    for field, value, allowed in options:
        if value is not None and value not in allowed:
            raise bad_input(f"{field}: use {', '.join(allowed[:-1])} or {allowed[-1]} (got {value!r})")


def _combined(so_far: float, alone: float, combine: Combine) -> float:
    """A step's running loss with one more unit's own loss: added (``sum``) or in quadrature (``rss``)."""
    return so_far + alone if combine == "sum" else math.hypot(so_far, alone)


def _cheapest_fit(
    options: dict[str, float | None], so_far: float, limit: float, combine: Combine, default: str
) -> tuple[str, float]:
    """The first option (in order) whose total loss fits ``limit``, of the reusing ones the
    lowest; ``default`` at ``so_far`` when none fits."""
    kept, kept_loss = default, so_far
    for c, alone in options.items():
        if kept != default and not (kept in REUSES_ANY and c in REUSES_ANY):
            break
        if alone is None or not math.isfinite(alone):
            continue
        total = _combined(so_far, alone, combine)
        if total <= limit and (kept == default or total < kept_loss):
            kept, kept_loss = c, total
    return kept, kept_loss


def _best_ratio_fit(
    options: dict[str, float | None], so_far: float, limit: float, combine: Combine, default: str,
    savings: dict[str, float],
) -> tuple[str, float]:
    """Of the options whose total loss fits ``limit`` and that save cost, the one saving the
    most per unit of its own loss (a zero loss first; ties: the larger saving); ``default``
    at ``so_far`` when none fits."""
    kept, kept_loss, best = default, so_far, (-1.0, -1.0)
    for c, alone in options.items():
        if alone is None or not math.isfinite(alone) or savings.get(c, 0.0) <= 0.0:
            continue
        total = _combined(so_far, alone, combine)
        rank = (savings[c] / alone if alone > 0.0 else math.inf, savings[c])
        if total <= limit and rank > best:
            kept, kept_loss, best = c, total, rank
    return kept, kept_loss


def _flops(costs: list[dict[str, float]], methods: list[list[str]], heads: Heads | None = None) -> float:
    """The grid's attention FLOPs fraction given each layer's cost per method (``summarize``'s
    figure); a per-head cell of ``heads`` at its heads' mean cost."""
    total = sum(c["full"] for c in costs) * len(methods)
    kept = sum(costs[i][m] for row in methods for i, m in enumerate(row))
    for (t, i), letters in (heads or {}).items():
        kept += sum(costs[i][HEAD_LETTERS[c]] for c in letters) / len(letters) - costs[i][methods[t][i]]
    return kept / total


def budget_steps(delta: float) -> int:
    """The largest k with 1 − k / RESOLUTION ≥ δ."""
    if not 0.0 < delta <= 1.0:
        raise bad_input(f"delta: must be in (0, 1] (got {delta})")
    return math.floor((1.0 - delta) * RESOLUTION + 1e-9)


class Compiler:
    """Compiles plans from one profile; rule results are cached across δ.

    ``objective`` ``None`` is ``time`` when the profile measured latencies, else ``flops``.
    """

    def __init__(
        self,
        profile: Profile,
        *,
        combine: Combine = "sum",
        objective: Objective | None = None,
        weighted: bool = False,
        ffn: bool = False,
        power: float = STEP_WEIGHT_POWER,
        heads: bool = False,
        pick: Pick = "cheapest",
    ) -> None:
        self.profile = profile
        self.combine: Combine = combine
        check_options(combine, objective, pick)
        self.pick: Pick = pick
        self.weighted = weighted and profile.measurements.step_weight is not None
        self.power = power
        if ffn and profile.measurements.ffn_reuse is None:
            raise bad_input("ffn: the profile measured no feed-forward layers; profile again with --ffn")
        if ffn and objective not in (None, "transformer"):
            raise bad_input(f"objective: feed-forward reuse is compiled for --objective transformer (got {objective})")
        if objective == "transformer" and profile.costs is None:
            raise bad_input("objective: the profile has no FLOP counts ($.costs); profile again")
        if heads and (profile.measurements.head_ast is None or profile.measurements.head_wars is None):
            raise bad_input("heads: the profile measured no per-head distances; profile again")
        self.ffn = ffn
        self.heads = heads
        objective = "transformer" if ffn else objective
        self.objective: Objective = objective or ("time" if profile.latency is not None else "flops")
        if self.objective == "time" and profile.latency is None:
            raise bad_input("objective: the profile has no measured latencies; use --objective flops")
        self.predictor = Predictor(
            profile, self.objective, weighted=self.weighted, ffn=ffn, power=power, heads=heads
        )
        self._rules: dict[int, Choice] = {}
        self._best: list[Choice] = []  # _best[k]: least FLOPs among rules 0..k

    def choice(self, delta: float) -> Choice:
        """The grid for δ: the least-cost rule result over δ' = 1 − k/1000 ≥ δ."""
        top = budget_steps(delta)
        while len(self._best) <= top:
            k = len(self._best)
            rule = self._rule(k)
            best = self._best[-1] if self._best else rule
            self._best.append(rule if rule.cost < best.cost else best)
        return self._best[top]

    def _rule(self, k: int) -> Choice:
        if k not in self._rules:
            p = self.predictor
            if k == 0:  # no budget: nothing to spend, as the search at δ = 1
                grid = [["full"] * p.layers for _ in range(p.steps)]
                losses: list[list[float | None]] = [[None] * p.layers for _ in range(p.steps)]
                ffn = [["compute"] * p.ffn_layers for _ in range(p.steps)] if p.ffn_layers else None
                self._rules[k] = Choice(grid, losses, p.cost(grid, ffn), ffn)
            else:
                rule = _rule(p, k / RESOLUTION, self.combine, self.pick)
                if p.heads:  # a cell spends budget later layers may save more with: keep the cheaper
                    plain = _rule(p, k / RESOLUTION, self.combine, self.pick, with_heads=False)
                    rule = rule if rule.cost < plain.cost else plain
                self._rules[k] = rule
        return self._rules[k]

    def plan(self, delta: float) -> Plan:
        """The checked plan for δ, with the profile's header facts and predicted losses."""
        choice = self.choice(delta)
        base = header_plan(self.profile, choice.methods, choice.ffn, choice.heads)
        weights = "-weighted" if self.power == STEP_WEIGHT_POWER else f"-weighted^{self.power:g}"
        search = SEARCH_NAMES[self.combine] + (weights if self.weighted else "") + (
            {"time": "-time", "transformer": "-transformer"}.get(self.objective, "")
        ) + ("-heads" if self.heads else "") + ("-ratio" if self.pick == "ratio" else "")
        plan = msgspec.structs.replace(
            base,
            tool_version=tool_version(),
            calibration=profile_calibration(self.profile, delta, search),
            losses=choice.losses,
        )
        return with_latency(plan, self.profile.latency)


def compile_plan(
    profile: Profile,
    delta: float,
    *,
    combine: Combine = "sum",
    objective: Objective | None = None,
    weighted: bool = False,
    ffn: bool = False,
    heads: bool = False,
    pick: Pick = "cheapest",
) -> Plan:
    """The plan for ``delta`` compiled from ``profile`` (see the module docstring)."""
    compiler = Compiler(profile, combine=combine, objective=objective, weighted=weighted, ffn=ffn, heads=heads, pick=pick)
    return compiler.plan(delta)


def compile_plans(
    profile: Profile,
    deltas: Iterable[float],
    *,
    combine: Combine = "sum",
    objective: Objective | None = None,
    weighted: bool = False,
    ffn: bool = False,
    heads: bool = False,
    pick: Pick = "cheapest",
) -> list[Plan]:
    """One plan per δ, sharing the work between them."""
    compiler = Compiler(profile, combine=combine, objective=objective, weighted=weighted, ffn=ffn, heads=heads, pick=pick)
    return [compiler.plan(d) for d in deltas]


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """A checked profile from a file; ``ProfileError`` (a ``PlanError``) if it is not one."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ProfileError(f"cannot read profile {str(path)!r}: {exc.strerror or exc}") from None
    return decode_profile(raw)


def sweep_file_name(delta: float) -> str:
    """``plan-<δ>.json``, δ written in full so that distinct values never share a name."""
    return f"plan-{delta!r}.json"


def parse_deltas(text: str | Sequence[float]) -> list[float]:
    """δ values from ``0.975,0.95,...`` (or a sequence), each in (0, 1]."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    deltas = []
    for part in parts:
        if part == "":
            continue
        try:
            value = float(part)
        except ValueError:
            raise bad_input(f"deltas: {part!r} is not a number") from None
        if not 0.0 < value <= 1.0:
            raise bad_input(f"deltas: {value} is not in (0, 1]")
        if value in deltas:
            raise bad_input(f"deltas: {value!r} is given twice")
        deltas.append(value)
    if not deltas:
        raise bad_input("deltas: give at least one δ, e.g. 0.975,0.95")
    return deltas
