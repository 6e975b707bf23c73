"""Recording mode: it changes no output, and it measures what the runtime would execute."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch

import runtime
from runtime import Recorder
from runtime.feedforward import feed_forward_layers
from schemas import forecast_pairs, with_figures
from tests.plans import all_full, plan_for
from tests.runtime.conftest import float64_model, generate_dit, generate_pixart, run_steps

ORDERS = {"pixart": "uncond_cond", "dit": "cond_uncond"}
LAYERS, STEPS, WINDOW = 3, 4, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def outputs_of(modules, model, kind: str, plan, recorder: Recorder | None) -> list[list[torch.Tensor]]:
    """Each of ``modules``' output at each step, ``[step][module]``, with ``plan`` applied."""
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda module, args, out: seen.append(out.clone())) for m in modules]
    try:
        with runtime.apply(plan, model) as handle:
            handle.runner.recorder = recorder
            run_steps(model, kind, len(plan.methods), order=ORDERS[kind])
    finally:
        for hook in hooks:
            hook.remove()
    return [seen[t * LAYERS : (t + 1) * LAYERS] for t in range(len(plan.methods))]


def attention_outputs(model, kind: str, methods: list[list[str]], recorder: Recorder | None = None):
    """Each layer's attention output at each step, ``[step][layer]``, under ``methods``."""
    plan = plan_for(model, methods, window=WINDOW, cfg_order=ORDERS[kind])
    return outputs_of([block.attn1 for block in model.transformer_blocks], model, kind, plan, recorder)


def relative_l2(x: torch.Tensor, reference: torch.Tensor) -> float:
    return math.sqrt(float(((x - reference) ** 2).sum()) / float((reference**2).sum()))


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_recording_leaves_every_output_unchanged(kind):
    model = float64_model(kind)
    plan = plan_for(model, all_full(STEPS, LAYERS), window=WINDOW, cfg_order=ORDERS[kind])
    with runtime.apply(plan, model) as handle:
        plain = run_steps(model, kind, STEPS, order=ORDERS[kind])
        handle.reset()
        handle.runner.recorder = recorder = Recorder(lags=2)
        recorded = run_steps(model, kind, STEPS, order=ORDERS[kind])
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded))
    assert recorder.distance("ast", STEPS - 1, 0, 1) is not None


def test_recording_leaves_a_pipeline_generation_unchanged(pixart_pipe, dit_pipe):
    for pipe, generate, order in ((pixart_pipe, generate_pixart, "uncond_cond"), (dit_pipe, generate_dit, "cond_uncond")):
        raw = generate(pipe)
        plan = plan_for(pipe.transformer, all_full(4, LAYERS), window=WINDOW, cfg_order=order)
        with runtime.apply(plan, pipe) as handle:
            handle.runner.recorder = Recorder(lags=3)
            recorded = generate(pipe)
        assert torch.equal(raw, recorded)


def column(source: str, between: str, method: str, t: int, lag: int) -> list[str]:
    """One layer's methods: ``source`` at ``t - lag``, ``between`` after it, ``method`` at ``t``."""
    col = ["full"] * (t + 1)
    col[t - lag] = source
    for u in range(t - lag + 1, t):
        col[u] = between
    col[t] = method
    return col


# measure -> (the step that leaves the cache, the steps in between, the method at step t)
CASES = {
    "ast": ("full", "ast", "ast"),
    "wars": ("full", "ast", "wars"),
    "wars_after_asc": ("asc", "ast", "wars"),
    "wars_asc": ("full", "ast", "wars_asc"),
}


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_distances_are_those_of_the_methods_as_the_runtime_executes_them(kind):
    """Each recorded distance equals the one of a plan running that method with a cache that old."""
    model = float64_model(kind)
    t, layer = STEPS - 1, 1
    recorder = Recorder(lags=t)
    full = attention_outputs(model, kind, all_full(STEPS, LAYERS), recorder)
    reference = full[t][layer]
    for measure, (source, between, method) in CASES.items():
        for lag in range(1, t + 1):
            methods = all_full(STEPS, LAYERS)
            for u, m in enumerate(column(source, between, method, t, lag)):
                methods[u][layer] = m
            planned = attention_outputs(model, kind, methods)[t][layer]
            expected = relative_l2(planned, reference)
            assert recorder.distance(measure, t, layer, lag) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    methods = all_full(STEPS, LAYERS)
    methods[t][layer] = "asc"
    expected = relative_l2(attention_outputs(model, kind, methods)[t][layer], reference)
    assert recorder.distance("asc", t, layer) == pytest.approx(expected, rel=1e-9)
    assert expected > 0 and recorder.distance("ast", t, layer, 2) > 0


def test_lags_beyond_the_history_are_not_measured():
    model = float64_model("pixart")
    recorder = Recorder(lags=2)
    attention_outputs(model, "pixart", all_full(STEPS, LAYERS), recorder)
    grids = recorder.grids(STEPS, LAYERS)
    assert grids["ast"][0] == [[None, None]] * LAYERS
    assert all(cell[0] is not None and cell[1] is None for cell in grids["wars"][1])
    assert all(cell[1] is not None for cell in grids["wars_asc"][3])
    assert recorder.distance("ast", 3, 0, 3) is None
    assert [len(row) for row in grids["asc"]] == [LAYERS] * STEPS


def test_without_cfg_only_the_cache_measures_are_recorded():
    model = float64_model("dit")
    plan = plan_for(model, all_full(3, LAYERS), window=WINDOW, cfg=False)
    recorder = Recorder(lags=1)
    with runtime.apply(plan, model) as handle:
        handle.runner.recorder = recorder
        run_steps(model, "dit", 3, cfg=False)
    assert recorder.distance("ast", 2, 0, 1) is not None
    assert recorder.distance("wars", 2, 0, 1) is not None
    for measure in ("asc", "wars_asc", "wars_after_asc"):
        assert recorder.distance(measure, 2, 0, 0 if measure == "asc" else 1) is None


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_forecast_distances_are_those_of_forecasts_from_that_pair_of_steps(kind):
    """``forecast`` per pair of lags ``(j, k)`` equals a plan that computed only steps ``t - j``
    and ``t - k`` (and step 0) before forecasting at ``t``."""
    model = float64_model(kind)
    t, layer = STEPS - 1, 2
    recorder = Recorder(lags=t)
    reference = attention_outputs(model, kind, all_full(STEPS, LAYERS), recorder)[t][layer]
    for pair, (j, k) in enumerate(forecast_pairs(t)):
        methods = all_full(STEPS, LAYERS)
        for u in range(1, t):
            methods[u][layer] = "full" if u in (t - j, t - k) else "ast"
        methods[t][layer] = "forecast"
        planned = attention_outputs(model, kind, methods)[t][layer]
        expected = relative_l2(planned, reference)
        assert expected > 0
        assert recorder.distance("forecast", t, layer, pair) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert recorder.grids(STEPS, LAYERS)["forecast"][1][layer] == [None] * len(forecast_pairs(t))


def feed_forward_outputs(model, kind: str, methods, ffn, recorder: Recorder | None = None):
    """Each feed-forward layer's output at each step, ``[step][layer]``, under the two grids."""
    plan = with_figures(msgspec.structs.replace(plan_for(model, methods, window=WINDOW, cfg_order=ORDERS[kind]), ffn=ffn))
    return outputs_of(feed_forward_layers(model), model, kind, plan, recorder)


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_feed_forward_distances_are_those_of_reuse_and_forecast_as_the_runtime_runs_them(kind):
    model = float64_model(kind)
    t, layer = STEPS - 1, 1
    recorder = Recorder(lags=t)
    compute = [["compute"] * LAYERS for _ in range(STEPS)]
    reference = feed_forward_outputs(model, kind, all_full(STEPS, LAYERS), compute, recorder)[t][layer]
    for lag in range(1, t + 1):
        ffn = [list(row) for row in compute]
        for u in range(t - lag + 1, t + 1):
            ffn[u][layer] = "reuse"
        got = feed_forward_outputs(model, kind, all_full(STEPS, LAYERS), ffn)[t][layer]
        assert recorder.distance("ffn_reuse", t, layer, lag) == pytest.approx(relative_l2(got, reference), rel=1e-9)
    for pair, (j, k) in enumerate(forecast_pairs(t)):
        ffn = [list(row) for row in compute]
        for u in range(1, t):
            ffn[u][layer] = "compute" if u in (t - j, t - k) else "reuse"
        ffn[t][layer] = "forecast"
        got = feed_forward_outputs(model, kind, all_full(STEPS, LAYERS), ffn)[t][layer]
        expected = relative_l2(got, reference)
        assert expected > 0
        assert recorder.distance("ffn_forecast", t, layer, pair) == pytest.approx(expected, rel=1e-9, abs=1e-12)
