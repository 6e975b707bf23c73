"""Recording mode: what each method would have returned, measured at every full layer-step.

With a ``Recorder`` on the ``Runner`` (``runner.recorder``), the processor hands it,
after each ``full`` layer-step that writes caches, the layer's q/k/v, its per-head
output and its projected output. The recorder computes from them, with the runtime's
own window kernel and output projection, the outputs ``ast``, ``wars``, ``asc`` and
``wars_asc`` would have produced with the caches of up to ``lags`` steps earlier, and
accumulates their squared distances to the full output. Per head ``h`` of the layer it
also measures, at lag 1, the projected output with that head alone replaced by its
output of the previous step (``head_ast``) or by its window attention plus its residual
of the previous step (``head_wars``), as a per-head plan (``Plan.heads``) would run it.
It never changes what the processor returns. The measurements are defined in
``schemas/profile.py``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from runtime.adapters import extrapolate
from schemas.profile import forecast_pairs

if TYPE_CHECKING:
    from runtime.runner import Runner

MEASURES = ("ast", "wars", "wars_after_asc", "wars_asc")  # per lag
HEAD_MEASURES = ("head_ast", "head_wars")  # per head, lag 1: stored under index ``head``
# forecast: per pair of lags (j, k), 1 <= j < k <= lags, stored under index ``pair``
CFG_MEASURES = ("wars_after_asc", "wars_asc", "asc")

Project = Callable[[torch.Tensor], torch.Tensor]


def _squared(x: torch.Tensor) -> float:
    """Sum of squares, in at least float32 per element and float64 over the sum."""
    if x.dtype != torch.float64:
        x = x.float()
    return float(x.pow(2).sum(dtype=torch.float64))


class Recorder:
    """Accumulates, per (step, layer, lag), squared distances of each method to full attention.

    Keeps per layer the projected outputs ``O`` and per-head residuals ``R`` of the last
    ``lags`` recorded steps, and with ``heads`` (the per-head measures) the per-head
    output ``o`` of the last one (a generation must be recorded from step 0, in order). Sums
    add up over several recorders (one per calibration chunk) with ``merge``, and over the
    ranks of a data-parallel run with ``reduce``.
    """

    def __init__(self, lags: int, *, heads: bool = False) -> None:
        if lags < 1:
            raise ValueError(f"lags: must be >= 1 (got {lags})")
        self.lags = lags
        self.heads = heads  # whether to measure head_ast / head_wars (two projections per head)
        self.reference: dict[tuple[int, int], float] = {}  # (step, layer) -> ||O_t||^2
        self.ffn_reference: dict[tuple[int, int], float] = {}  # (step, feed-forward layer) -> ||F_t||^2
        self.squared: dict[tuple[str, int, int, int], float] = {}  # (measure, step, layer, lag)
        self._history: dict[tuple[int, int], deque[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        self._pending: dict[int, tuple[int, torch.Tensor, dict[int, torch.Tensor]]] = {}
        self._ffn_history: dict[tuple[int, int], deque[tuple[int, torch.Tensor]]] = {}
        self._heads_history: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}  # (call, layer) -> (step, o)
        self.num_heads: int | None = None  # heads of the recorded per-head outputs (dim 1 of ``o``)

    def reset(self) -> None:
        """Forget the cached history (a new generation starts); the sums stay."""
        self._history.clear()
        self._pending.clear()
        self._ffn_history.clear()
        self._heads_history.clear()

    def record(
        self,
        runner: Runner,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        o: torch.Tensor,
        out: torch.Tensor,
        project: Project,
    ) -> None:
        """Measure one full layer-step: ``o`` per head, ``out = project(o)`` for the whole batch.

        With CFG in separate calls each call keeps its own history; the conditional call's
        ``wars`` outputs wait for the unconditional call of the same step, whose rows the
        shared methods give the conditional call's outputs (``_record_shared``)."""
        step = runner.state.step
        call = runner.state.call if runner.cfg_mode == "separate" else 0
        history = self._history.setdefault((call, layer), deque(maxlen=self.lags))
        if history and history[-1][0] >= step:  # a new generation on the same recorder
            history.clear()
        window = runner.window_attention(q, k, v, layer)
        residual = o - window
        key = (step, layer)
        self.reference[key] = self.reference.get(key, 0.0) + _squared(out)
        cfg = runner.cfg_mode == "batched" and o.shape[0] % 2 == 0
        rows = runner.cond_rows(o.shape[0]) if cfg else None
        both = runner.copy_to_both_halves
        if cfg:
            self._add("asc", step, layer, 0, both(out[rows]) - out)
        self._record_forecasts(runner, step, layer, out, history)
        wars_outputs = {}
        for earlier, out_s, residual_s in history:
            lag = step - earlier
            self._add("ast", step, layer, lag, out_s - out)
            wars_outputs[earlier] = project(window + residual_s)
            self._add("wars", step, layer, lag, wars_outputs[earlier] - out)
            if cfg:
                cond_residual = residual_s[rows]
                shared = project(window + both(cond_residual))
                self._add("wars_after_asc", step, layer, lag, shared - out)
                cond = project(window[rows] + cond_residual)
                self._add("wars_asc", step, layer, lag, both(cond) - out)
        if runner.cfg_mode == "separate":
            self._record_shared(call, step, layer, window, out, project, wars_outputs)
        if self.heads:
            previous = history[-1] if history and history[-1][0] == step - 1 else None
            self._record_heads(call, step, layer, o, window, out, project, previous)
        history.append((step, out.detach(), residual.detach()))

    def _record_heads(
        self,
        call: int,
        step: int,
        layer: int,
        o: torch.Tensor,
        window: torch.Tensor,
        out: torch.Tensor,
        project: Project,
        previous: tuple[int, torch.Tensor, torch.Tensor] | None,
    ) -> None:
        """``head_ast`` and ``head_wars`` of every head at lag 1: the projected output with head
        ``h`` of ``o`` (``[batch, heads, tokens, head_dim]``) alone replaced by its output of the
        previous step, or by its window attention plus its residual of the previous step."""
        heads = o.shape[1]
        if self.num_heads is None:
            self.num_heads = heads
        elif self.num_heads != heads:
            raise ValueError(f"layer {layer}: {heads} heads, earlier layers had {self.num_heads}")
        last = self._heads_history.get((call, layer))
        self._heads_history[call, layer] = step, o.detach()
        if last is None or last[0] != step - 1:
            return
        o_prev = last[1]
        mixed = o.clone()
        for h in range(heads):
            replacements = [("head_ast", o_prev[:, h])]
            if previous is not None:
                replacements.append(("head_wars", window[:, h] + previous[2][:, h]))
            for measure, value in replacements:
                mixed[:, h] = value
                self._add(measure, step, layer, h, project(mixed) - out)
            mixed[:, h] = o[:, h]

    def record_ffn(self, runner: Runner, layer: int, out: torch.Tensor) -> None:
        """Measure feed-forward layer ``layer``'s computed output ``out``: what ``reuse`` from up to
        ``lags`` steps back (``ffn_reuse``) and ``forecast`` from each pair (``ffn_forecast``) give."""
        step = runner.state.step
        call = runner.state.call if runner.cfg_mode == "separate" else 0
        history = self._ffn_history.setdefault((call, layer), deque(maxlen=self.lags))
        if history and history[-1][0] >= step:
            history.clear()
        key = (step, layer)
        self.ffn_reference[key] = self.ffn_reference.get(key, 0.0) + _squared(out)
        for earlier, out_s in history:
            self._add("ffn_reuse", step, layer, step - earlier, out_s - out)
        for pair, forecast in self._forecasts(runner, step, history):
            self._add("ffn_forecast", step, layer, pair, forecast - out)
        history.append((step, out.detach()))

    def _forecasts(self, runner: Runner, step: int, history: deque) -> list[tuple[int, torch.Tensor]]:
        """``(pair, forecast)`` from every pair of recorded outputs, as the runtime computes it."""
        earlier = {entry[0]: entry[1] for entry in history}
        found = []
        for pair, (j, k) in enumerate(forecast_pairs(self.lags)):
            a, b = step - j, step - k
            if a in earlier and b in earlier:
                found.append((pair, extrapolate(earlier[a], earlier[b], runner.coefficient(step, a, b))))
        return found

    def _record_forecasts(
        self, runner: Runner, step: int, layer: int, out: torch.Tensor, history: deque
    ) -> None:
        """``forecast`` from every pair of recorded earlier outputs, as the runtime computes it."""
        for pair, forecast in self._forecasts(runner, step, history):
            self._add("forecast", step, layer, pair, forecast - out)

    def _record_shared(
        self,
        call: int,
        step: int,
        layer: int,
        window: torch.Tensor,
        out: torch.Tensor,
        project: Project,
        wars_outputs: dict[int, torch.Tensor],
    ) -> None:
        """The shared methods with CFG in separate calls. The conditional call's rows get its
        own results (``asc`` exact, ``wars_asc`` and ``wars_after_asc`` its ``wars``); the
        unconditional call's rows get the conditional call's output (``asc``) or ``wars``
        output (``wars_asc``), or its own window plus the conditional residual
        (``wars_after_asc``: the residual an ``asc`` refresh hands over)."""
        if call == 0:
            for earlier, output in wars_outputs.items():
                for measure in ("wars_asc", "wars_after_asc"):
                    self._add(measure, step, layer, step - earlier, output - out)
            self._pending[layer] = step, out.detach(), wars_outputs
            return
        pending = self._pending.pop(layer, None)
        if pending is None or pending[0] != step:
            return
        _, cond_out, cond_wars = pending
        self._add("asc", step, layer, 0, cond_out - out)
        cond_history = {earlier: residual_s for earlier, _, residual_s in self._history.get((0, layer), ())}
        for earlier, cond_output in cond_wars.items():
            lag = step - earlier
            self._add("wars_asc", step, layer, lag, cond_output - out)
            if earlier in cond_history:
                self._add("wars_after_asc", step, layer, lag, project(window + cond_history[earlier]) - out)

    def _add(self, measure: str, step: int, layer: int, lag: int, error: torch.Tensor) -> None:
        key = (measure, step, layer, lag)
        self.squared[key] = self.squared.get(key, 0.0) + _squared(error)

    def merge(self, other: Recorder) -> None:
        """Add ``other``'s sums to this recorder's (the rows of another chunk)."""
        for key, value in other.reference.items():
            self.reference[key] = self.reference.get(key, 0.0) + value
        for key, value in other.ffn_reference.items():
            self.ffn_reference[key] = self.ffn_reference.get(key, 0.0) + value
        for key, value in other.squared.items():
            self.squared[key] = self.squared.get(key, 0.0) + value
        if self.num_heads is None:
            self.num_heads = other.num_heads

    def reduce(self, sum_all: Callable[[list[float]], list[float]]) -> None:
        """Replace the sums by ``sum_all`` of them, in key order: e.g. their sums over the ranks
        of a data-parallel run, which all recorded the same (step, layer, lag) keys."""
        keys = sorted(self.reference), sorted(self.ffn_reference), sorted(self.squared)
        values = iter(sum_all(
            [self.reference[k] for k in keys[0]] + [self.ffn_reference[k] for k in keys[1]]
            + [self.squared[k] for k in keys[2]]
        ))  # fmt: skip
        self.reference = {k: next(values) for k in keys[0]}
        self.ffn_reference = {k: next(values) for k in keys[1]}
        self.squared = {k: next(values) for k in keys[2]}

    def distance(self, measure: str, step: int, layer: int, lag: int = 0) -> float | None:
        """``||X - O_t|| / ||O_t||`` over every recorded row; ``None`` if not measured.

        ``lag`` is 0 for ``asc``, the number of steps back for the cache measures, the
        index of the pair of lags for ``forecast`` and the head for ``head_ast``/``head_wars``.
        """
        squared = self.squared.get((measure, step, layer, lag))
        if squared is None:
            return None
        reference = (self.ffn_reference if measure.startswith("ffn_") else self.reference)[(step, layer)]
        if reference == 0.0:
            return 0.0 if squared == 0.0 else math.inf
        return math.sqrt(squared / reference)

    def grids(self, steps: int, layers: int) -> dict[str, list]:
        """Every measure as ``[step][layer][lag - 1]`` (``asc`` and ``norm``: ``[step][layer]``;
        ``forecast``: ``[step][layer][pair]``; ``head_ast``, ``head_wars``: ``[step][layer][head]``)."""
        grids: dict[str, list] = {
            m: [[[self.distance(m, t, i, lag) for lag in range(1, self.lags + 1)] for i in range(layers)]
                for t in range(steps)]
            for m in MEASURES
        }
        pairs = range(len(forecast_pairs(self.lags)))
        grids["forecast"] = [
            [[self.distance("forecast", t, i, p) for p in pairs] for i in range(layers)] for t in range(steps)
        ]
        grids["asc"] = [[self.distance("asc", t, i) for i in range(layers)] for t in range(steps)]
        grids["norm"] = [[self.norm(t, i) for i in range(layers)] for t in range(steps)]
        for m in HEAD_MEASURES:  # [step][layer][head]; None when no per-head output was recorded
            heads = range(self.num_heads) if self.num_heads is not None else None
            grids[m] = None if heads is None else [
                [[self.distance(m, t, i, h) for h in heads] for i in range(layers)] for t in range(steps)
            ]
        return grids

    def ffn_grids(self, steps: int, layers: int) -> dict[str, list]:
        """``ffn_reuse`` as ``[step][layer][lag - 1]``, ``ffn_forecast`` as ``[step][layer][pair]``."""
        pairs = range(len(forecast_pairs(self.lags)))
        return {
            "ffn_reuse": [[[self.distance("ffn_reuse", t, j, lag) for lag in range(1, self.lags + 1)]
                           for j in range(layers)] for t in range(steps)],
            "ffn_forecast": [[[self.distance("ffn_forecast", t, j, p) for p in pairs] for j in range(layers)]
                             for t in range(steps)],
        }  # fmt: skip

    def norm(self, step: int, layer: int) -> float | None:
        """``||O_t||`` over every recorded row; ``None`` if not recorded."""
        reference = self.reference.get((step, layer))
        return None if reference is None else math.sqrt(reference)
