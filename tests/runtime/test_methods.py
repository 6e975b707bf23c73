"""Every method against an independent float64 reference; identities of the runtime."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime
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


def reference_outputs(model, kind, methods, window):
    ref = ReferenceRun(methods, window, cond_first=ORDERS[kind] == "cond_uncond")
    return ref.outputs(model, lambda t: run_steps_at(model, kind, t))


def run_steps_at(model, kind, t):
    from tests.runtime.conftest import step_inputs

    with torch.no_grad():
        return [model(**step_inputs(kind, t, cfg=True, order=ORDERS[kind])).sample]


def runtime_outputs(model, kind, methods, window, kernel="auto"):
    plan = plan_for(model, methods, num_tokens=TOKENS, window=window, cfg_order=ORDERS[kind])
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
