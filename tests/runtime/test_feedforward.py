"""Feed-forward reuse and forecast, with attention methods, against a float64 reference."""

from __future__ import annotations

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime
from runtime.feedforward import feed_forward_layers
from schemas import Costs, PlanError, with_figures
from tests.plans import plan_for
from tests.runtime.conftest import float64_model
from tests.runtime.reference import ReferenceRun
from tests.runtime.test_forecast import LAYERS, ORDERS, TIMES, inputs_at, valid


class FeedForwardReference:
    """Forward hooks on each block's ``ff`` that replace its output as ``grid`` says, keeping
    every computed output (naive caching)."""

    def __init__(self, grid: list[list[str]]) -> None:
        self.grid, self.step = grid, 0
        self.computed: dict[int, list[tuple[int, torch.Tensor]]] = {}

    def hook(self, j: int):
        def replace(module, args, out):
            method = self.grid[self.step][j]
            if method == "compute":
                self.computed.setdefault(j, []).append((self.step, out))
                return None
            (b, out_b), (a, out_a) = ([(None, None)] + self.computed[j])[-2:]
            if method == "reuse":
                return out_a
            return out_a + (out_a - out_b) * ((TIMES[self.step] - TIMES[a]) / (TIMES[a] - TIMES[b]))

        return replace


def reference(kind: str, methods, ffn, window: int) -> list[torch.Tensor]:
    model = float64_model(kind)
    ref = ReferenceRun(methods, window, cond_first=ORDERS[kind] == "cond_uncond", times=TIMES)
    ffn_ref = FeedForwardReference(ffn)
    hooks = [block.ff.register_forward_hook(ffn_ref.hook(j)) for j, block in enumerate(model.transformer_blocks)]

    def step(t):
        ffn_ref.step = t
        return [model(**inputs_at(kind, t)).sample]

    try:
        return ref.outputs(model, step)
    finally:
        for hook in hooks:
            hook.remove()


def plan_with_ffn(model, methods, ffn, window: int = 8, kind: str = "dit"):
    base = plan_for(model, methods, window=window, cfg_order=ORDERS[kind])
    return with_figures(msgspec.structs.replace(base, ffn=ffn))


def planned(kind: str, methods, ffn, window: int):
    model = float64_model(kind)
    with torch.no_grad(), runtime.apply(plan_with_ffn(model, methods, ffn, window, kind), model) as handle:
        return [model(**inputs_at(kind, t)).sample for t in range(len(methods))], handle


@st.composite
def grids(draw):
    steps = draw(st.integers(3, len(TIMES)))
    attention = ["full", "wars", "ast", "asc", "forecast"]
    columns = [valid(["full"] + [draw(st.sampled_from(attention)) for _ in range(steps - 1)]) for _ in range(LAYERS)]
    ffn_columns = []
    for _ in range(LAYERS):
        column = ["full"] + [draw(st.sampled_from(["full", "ast", "forecast"])) for _ in range(steps - 1)]
        names = {"full": "compute", "ast": "reuse", "forecast": "forecast"}
        ffn_columns.append([names[m] for m in valid(column)])
    return [list(r) for r in zip(*columns)], [list(r) for r in zip(*ffn_columns)]


@pytest.mark.parametrize("kind", ["pixart", "dit"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grid=grids(), window=st.integers(1, 63))
def test_feed_forward_methods_match_float64_reference(kind, grid, window):
    methods, ffn = grid
    got, handle = planned(kind, methods, ffn, window)
    for t, (a, b) in enumerate(zip(got, reference(kind, methods, ffn, window))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"step {t} of {methods} / {ffn}")
    assert all(c.output is None and c.previous is None for calls in handle.runner.state.ffn_calls for c in calls)


def test_reused_feed_forwards_do_not_run_and_are_counted():
    model = float64_model("dit")
    methods = [["full"] * LAYERS] * 4
    ffn = [["compute"] * LAYERS, ["reuse", "compute", "compute"], ["reuse", "reuse", "compute"], ["compute"] * LAYERS]
    calls = []
    hooks = [m.net[0].register_forward_hook(lambda *a: calls.append(1)) for m in feed_forward_layers(model)]
    try:
        _, handle = planned("dit", methods, ffn, 8)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == 12 - 3
    stats = handle.stats()
    assert stats.ffn_counts == {"compute": 9, "reuse": 3, "forecast": 0}
    assert stats.ffn_flops_fraction == pytest.approx(9 / 12)
    assert not any("forward" in vars(m) for m in feed_forward_layers(model))  # removed with the plan


def test_summary_reports_feed_forward_and_transformer_fractions_from_the_costs():
    model = float64_model("dit")
    methods = [["full"] * LAYERS, ["ast", "asc", "full"]]
    ffn = [["compute"] * LAYERS, ["reuse", "compute", "compute"]]
    costs = Costs(attention=[4.0] * LAYERS, projections=[2.0] * LAYERS, ffn=[8.0, 8.0, 2.0], other=3.0)
    plan = with_figures(msgspec.structs.replace(plan_with_ffn(model, methods, ffn), costs=costs))
    assert plan.summary.ffn_flops_fraction == pytest.approx((18 + 10) / 36)
    # step 0: all 3 + 18 + 6 + 12 = 39; step 1: other 3, attention 0 + 2 + 4, projections 0 + 1 + 2, ffn 10
    assert plan.summary.transformer_flops_fraction == pytest.approx((39 + 3 + 6 + 3 + 10) / 78)
    assert runtime.load_plan(msgspec.json.encode(plan)) == plan
    wrong = msgspec.structs.replace(plan, summary=msgspec.structs.replace(plan.summary, ffn_flops_fraction=0.5))
    with pytest.raises(PlanError, match=r"\$\.summary\.ffn_flops_fraction: says 0\.5"):
        runtime.load_plan(msgspec.json.encode(wrong))


@pytest.mark.parametrize(
    ("ffn", "field"),
    [
        ([["reuse", "compute", "compute"], ["compute"] * 3], r"\$\.ffn\[0\]\[0\]: step 0 must be 'compute'"),
        ([["compute"] * 3, ["forecast", "compute", "compute"]], r"\$\.ffn\[1\]\[0\]: 'forecast' needs two earlier"),
        ([["compute"] * 3, ["compute"] * 2], r"\$\.ffn\[1\]: row has 2 feed-forward layers"),
        ([["compute"] * 3], r"\$\.ffn: grid has 1 steps"),
    ],
)
def test_bad_feed_forward_grids_are_refused_naming_the_cell(ffn, field):
    model = float64_model("dit")
    plan = msgspec.structs.replace(plan_for(model, [["full"] * LAYERS] * 2, cfg_order="cond_uncond"), ffn=ffn)
    with pytest.raises(PlanError, match=field):
        runtime.load_plan(msgspec.json.encode(plan))


def test_a_grid_for_another_number_of_feed_forward_layers_is_refused_at_apply():
    model = float64_model("dit")
    plan = plan_with_ffn(model, [["full"] * LAYERS] * 2, [["compute"] * 2] * 2)
    with pytest.raises(PlanError, match=r"\$\.ffn\[0\]: plan has 2 feed-forward layers, the model has 3"):
        runtime.apply(plan, model)
    assert not any("forward" in vars(m) for m in feed_forward_layers(model))
    with runtime.apply(plan_for(model, [["full"] * LAYERS] * 2, cfg_order="cond_uncond"), model):
        pass  # the refused apply left nothing behind
