"""Every method against an independent float64 reference; identities of the runtime."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime
from runtime.schedule import Schedule
from tests.plans import all_full, plan_for
from tests.runtime.conftest import (
    float64_model,
    generate_dit,
    generate_pixart,
    run_steps,
)
from tests.runtime.reference import ReferenceRun

ORDERS = {"pixart": "uncond_cond", "dit": "cond_uncond"}
LAYERS = 3
TOKENS = 64


def reference_outputs(model, kind, methods, window, heads=None):
    ref = ReferenceRun(methods, window, cond_first=ORDERS[kind] == "cond_uncond", heads=heads)
    return ref.outputs(model, lambda t: run_steps_at(model, kind, t))


def run_steps_at(model, kind, t):
    from tests.runtime.conftest import step_inputs

    with torch.no_grad():
        return [model(**step_inputs(kind, t, cfg=True, order=ORDERS[kind])).sample]


def runtime_outputs(model, kind, methods, window, kernel="auto", heads=None):
    plan = plan_for(model, methods, num_tokens=TOKENS, window=window, cfg_order=ORDERS[kind], heads=heads)
    with runtime.apply(plan, model, kernel=kernel):
        return run_steps(model, kind, len(methods), order=ORDERS[kind])


@st.composite
def grids(draw, layers=LAYERS, cfg=True):
    steps = draw(st.integers(2, 4))
    choices = ["full", "wars", "ast"] + (["asc", "wars_asc"] if cfg else [])
    rest = [[draw(st.sampled_from(choices)) for _ in range(layers)] for _ in range(steps - 1)]
    return [["full"] * layers] + rest


@pytest.mark.parametrize("kind", ["pixart", "dit"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(methods=grids(), window=st.integers(1, TOKENS - 1), kernel=st.sampled_from(["chunked", "dense", "flex"]))
def test_every_method_matches_float64_reference(kind, methods, window, kernel):
    model = float64_model(kind)
    expected = reference_outputs(model, kind, methods, window)
    got = runtime_outputs(model, kind, methods, window, kernel)
    for t, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"step {t} of {methods}")


@st.composite
def head_grids(draw, heads=2):
    """A grid with per-head letters on some of its ``wars`` cells (not all ``w``)."""
    methods = draw(grids())
    cells = {}
    for t, row in enumerate(methods):
        for i, m in enumerate(row):
            if m == "wars" and draw(st.booleans()):
                letters = "".join(draw(st.sampled_from("fwa")) for _ in range(heads))
                if letters != "w" * heads:
                    cells[t, i] = letters
    return methods, cells


@pytest.mark.parametrize("kind", ["pixart", "dit"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grid=head_grids(), window=st.integers(1, TOKENS - 1), kernel=st.sampled_from(["chunked", "dense", "flex"]))
def test_per_head_cells_match_float64_reference(kind, grid, window, kernel):
    methods, heads = grid
    model = float64_model(kind)
    expected = reference_outputs(model, kind, methods, window, heads)
    got = runtime_outputs(model, kind, methods, window, kernel, heads)
    for t, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"step {t} of {methods} {heads}")


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_per_head_cell_differs_from_its_wars_cell(kind):
    """Each head letter changes what the cell returns: the heads really run their methods."""
    model = float64_model(kind)
    methods = [["full"] * LAYERS, ["wars"] * LAYERS, ["wars"] * LAYERS]
    plain = runtime_outputs(model, kind, methods, 4)
    for letters in ("fw", "wa", "af"):
        mixed = runtime_outputs(model, kind, methods, 4, heads={(2, 1): letters})
        assert torch.equal(mixed[1], plain[1])
        assert not torch.allclose(mixed[2], plain[2])


def test_per_head_outputs_are_kept_only_for_a_heads_and_freed_after():
    column = ["full", "wars", "ast", "wars", "wars", "full", "forecast", "wars", "wars"]
    heads = {(1, 0): "fw", (3, 0): "aw", (4, 0): "wa", (7, 0): "fw", (8, 0): "wf"}
    schedule = Schedule([[m] for m in column], heads=heads)
    kept = [t for t in range(len(column)) if schedule.keeps_head_output(t, 0)]
    assert kept == [1, 3]  # 3 reads step 1's (the ast at 2 computes nothing); 4 reads 3's
    freed = [t for t in range(len(column)) if schedule.frees_head_output(t, 0)]
    assert freed == [4]
    assert schedule.head_groups(3, 0) == ((), (1,), (0,)) and schedule.head_groups(2, 0) is None


def test_a_per_head_cell_without_w_heads_neither_reads_nor_ends_the_residual():
    schedule = Schedule([["full"], ["wars"], ["full"], ["wars"], ["wars"]], heads={(1, 0): "fa", (3, 0): "af"})
    assert not schedule.refreshes_residual(0, 0)  # step 1 reads no residual
    assert schedule.refreshes_residual(2, 0)  # step 4 reads step 2's, across step 3
    assert [t for t in range(5) if schedule.frees_after(t, 0)[0]] == [4]


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_per_head_caches_end_empty_and_count_each_cell(kind):
    model = float64_model(kind)
    methods = [["full"] * LAYERS, ["wars"] * LAYERS, ["ast", "wars", "wars"], ["wars"] * LAYERS]
    heads = {(1, 0): "af", (3, 0): "wa", (3, 1): "ff", (3, 2): "fa"}
    plan = plan_for(model, methods, num_tokens=TOKENS, window=8, cfg_order=ORDERS[kind], heads=heads)
    with runtime.apply(plan, model) as handle:
        run_steps(model, kind, len(methods), order=ORDERS[kind])
        caches = handle.runner.state.caches
        assert all(c.head_output is None for c in caches)
        stats = handle.stats()
    assert stats.head_cells == 4 and stats.method_counts["wars"] == 8


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_wars_asc_takes_the_conditional_rows_residual(kind):
    model = float64_model(kind)
    methods = [["full"] * LAYERS, ["wars_asc"] * LAYERS]
    got = runtime_outputs(model, kind, methods, window=4)
    right = reference_outputs(model, kind, methods, window=4)
    torch.testing.assert_close(got[1], right[1], rtol=1e-9, atol=1e-10)
    # the original code's bug (first half whatever the order) is visibly different
    ref = ReferenceRun(methods[:2], 4, cond_first=ORDERS[kind] != "cond_uncond")
    wrong = ref.outputs(model, lambda t: run_steps_at(model, kind, t))
    assert (got[1] - wrong[1]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_wars_with_window_covering_all_tokens_equals_full(kind):
    model = float64_model(kind)
    full = runtime_outputs(model, kind, all_full(3, LAYERS), window=TOKENS - 1)
    wars = runtime_outputs(model, kind, [["full"] * LAYERS] + [["wars"] * LAYERS] * 2, window=TOKENS - 1)
    for a, b in zip(wars, full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_compressed_plan_changes_outputs(kind):
    """Guards the reference test against vacuity: the methods do change the result."""
    model = float64_model(kind)
    full = runtime_outputs(model, kind, all_full(3, LAYERS), window=2)
    harsh = runtime_outputs(model, kind, [["full"] * LAYERS, ["wars"] * LAYERS, ["ast"] * LAYERS], window=2)
    assert (full[1] - harsh[1]).abs().max() > 1e-4
    assert (full[2] - harsh[2]).abs().max() > 1e-4


def test_all_full_plan_is_identity_on_pixart_pipeline(pixart_pipe):
    raw = generate_pixart(pixart_pipe)
    plan = plan_for(pixart_pipe.transformer, all_full(4, LAYERS), cfg_order="uncond_cond")
    with runtime.apply(plan, pixart_pipe) as handle:
        planned = generate_pixart(pixart_pipe)
    assert torch.equal(raw, planned)
    assert handle.stats().method_counts["full"] == 4 * LAYERS


def test_all_full_plan_is_identity_on_dit_pipeline(dit_pipe):
    raw = generate_dit(dit_pipe)
    plan = plan_for(dit_pipe.transformer, all_full(4, LAYERS), cfg_order="cond_uncond")
    with runtime.apply(plan, dit_pipe):
        planned = generate_dit(dit_pipe)
    assert torch.equal(raw, planned)
