"""MMDiTs (SD3 with MMDiT-X, FLUX): joint layers, arrow windows, CFG batched, separate or none."""

from __future__ import annotations

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime
from runtime import arrow
from schemas import PlanError, Tiles1d, Tiles2d, Tokens, summarize, window_pairs
from tests.runtime.joint_reference import JointReference, arrow_reference_mask, attention
from tests.runtime.mmdit import (
    FLUX_GRID,
    SD3_GRID,
    float64_model,
    geometry,
    mmdit_plan,
    run_calls,
    step_calls,
    tiny_flux,
    tiny_sd3,
)

LAYERS = 4
MODES = {"sd3": ["batched", "none"], "flux": ["separate", "none"]}
CASES = [(family, mode) for family, modes in MODES.items() for mode in modes]
TILES = {"sd3": Tiles2d(SD3_GRID, (4, 4), 0), "flux": Tiles2d(FLUX_GRID, (2, 2), 0)}


def reference_outputs(family: str, methods, window, mode: str, heads=None) -> list[torch.Tensor]:
    model = float64_model(family)
    tokens, text, kinds = geometry(family)
    texts = [text if kind == "joint" else 0 for kind in kinds]
    ref = JointReference(methods, [window] * LAYERS, texts, mode, heads)
    return ref.outputs(model, lambda t: step_calls(family, t, mode))


def runtime_outputs(family: str, methods, window, mode: str, kernel: str = "auto", heads=None) -> list[torch.Tensor]:
    model = float64_model(family)
    with runtime.apply(mmdit_plan(model, family, methods, window, mode, heads), model, kernel=kernel):
        return run_calls(model, family, len(methods), mode)


@st.composite
def grids(draw, cfg: bool):
    steps = draw(st.integers(2, 3))
    choices = ["full", "wars", "ast"] + (["asc", "wars_asc"] if cfg else [])
    return [["full"] * LAYERS] + [[draw(st.sampled_from(choices)) for _ in range(LAYERS)] for _ in range(steps - 1)]


@pytest.mark.parametrize(("family", "mode"), CASES)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kernel=st.sampled_from(["chunked", "dense", "flex"]))
def test_every_method_matches_float64_reference_with_arrow_band(family, mode, data, kernel):
    tokens = geometry(family)[0]
    methods = data.draw(grids(cfg=mode != "none"))
    window = data.draw(st.integers(1, tokens - 1))
    expected = reference_outputs(family, methods, window, mode)
    got = runtime_outputs(family, methods, window, mode, kernel)
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"call {i} of {methods}, window {window}")


@pytest.mark.parametrize(("family", "mode"), CASES)
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_per_head_cells_match_float64_reference(family, mode, data):
    """Per-head cells on joint layers, with CFG batched, in separate calls (each call its own
    per-head output; the unconditional call of a shared step takes the conditional one's) or none."""
    tokens = geometry(family)[0]
    methods = data.draw(grids(cfg=mode != "none"))
    methods[-1] = ["wars"] * LAYERS
    letters = st.text("fwa", min_size=2, max_size=2).filter(lambda x: x != "ww")
    heads = {(t, i): data.draw(letters) for t, row in enumerate(methods) for i, m in enumerate(row)
             if m == "wars" and data.draw(st.booleans())}  # fmt: skip
    window = data.draw(st.integers(1, tokens - 1))
    expected = reference_outputs(family, methods, window, mode, heads)
    got = runtime_outputs(family, methods, window, mode, heads=heads)
    for n, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"call {n} of {methods} {heads}")


@pytest.mark.parametrize(("family", "mode"), CASES)
@pytest.mark.parametrize("kernel", ["auto", "dense"])
def test_tiled_arrow_matches_float64_reference(family, mode, kernel):
    sharing = ["asc", "wars_asc"] if mode != "none" else ["wars", "ast"]
    methods = [["full"] * LAYERS, ["wars", "wars", sharing[0], "ast"], [sharing[1], "wars", "wars", "wars"]]
    expected = reference_outputs(family, methods, TILES[family], mode)
    got = runtime_outputs(family, methods, TILES[family], mode, kernel)
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"call {i}")


@pytest.mark.parametrize(("family", "mode"), CASES)
def test_compressed_plan_changes_outputs(family, mode):
    """Guards the reference tests against vacuity: the methods do change the result."""
    full = runtime_outputs(family, [["full"] * LAYERS] * 3, 2, mode)
    harsh = runtime_outputs(family, [["full"] * LAYERS, ["wars"] * LAYERS, ["ast"] * LAYERS], 2, mode)
    calls = len(full) // 3
    for i in range(calls, 3 * calls):
        assert (full[i] - harsh[i]).abs().max() > 1e-4


@pytest.mark.parametrize(("family", "mode"), CASES)
def test_all_full_plan_is_identity(family, mode):
    model = tiny_sd3() if family == "sd3" else tiny_flux()
    raw = run_calls(model, family, 3, mode, dtype=torch.float32)
    plan = mmdit_plan(model, family, [["full"] * LAYERS] * 3, 4, mode)
    with runtime.apply(plan, model) as handle:
        planned = run_calls(model, family, 3, mode, dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(raw, planned))
    assert handle.stats().method_counts["full"] == 3 * LAYERS and handle.stats().steps == 3


def test_separate_asc_returns_the_conditional_calls_output():
    """FLUX with true CFG: at ``asc`` the negative-prompt call's output equals the prompt call's."""
    methods = [["full"] * LAYERS, ["asc"] * LAYERS]
    model = float64_model("flux")
    with runtime.apply(mmdit_plan(model, "flux", methods, 2, "separate"), model) as handle:
        got = run_calls(model, "flux", 2, "separate")
    stats = handle.stats()
    assert stats.steps == 2 and stats.method_counts["asc"] == LAYERS
    assert stats.attention_flops_fraction == pytest.approx(0.75)  # the conditional call alone at step 1
    full = runtime_outputs("flux", [["full"] * LAYERS] * 2, 2, "separate")
    torch.testing.assert_close(got[2], full[2], rtol=1e-12, atol=1e-12)
    assert (got[3] - full[3]).abs().max() > 1e-4  # the negative call no longer computes its own


def test_separate_calls_keep_their_own_caches():
    """``ast``/``wars`` in the unconditional call read its own output/residual, not the conditional one's."""
    methods = [["full"] * LAYERS, ["wars", "ast", "wars", "ast"]]
    got = runtime_outputs("flux", methods, 2, "separate")
    expected = reference_outputs("flux", methods, 2, "separate")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert (got[3] - got[2]).abs().max() > 1e-4


def test_arrow_flops_are_counted_exactly():
    family, mode = "sd3", "none"
    tokens, text, _ = geometry(family)
    model = float64_model(family)
    methods = [["full"] * LAYERS, ["wars", "wars", "ast", "full"]]
    plan = mmdit_plan(model, family, methods, 3, mode)
    with runtime.apply(plan, model) as handle:
        run_calls(model, family, 2, mode)
    joint, image = (tokens + text) ** 2, tokens**2
    arrow, band = window_pairs(tokens, 3, text), window_pairs(tokens, 3)
    assert arrow == sum(
        1 for i in range(tokens + text) for j in range(tokens + text)
        if i >= tokens or j >= tokens or abs(i - j) <= 3
    )
    weights = [joint, image, joint, joint]
    kept = sum(weights) + arrow + band + joint
    assert plan.summary.attention_flops_fraction == pytest.approx(kept / (2 * sum(weights)))
    refresh = arrow + band  # step 0 refreshes the residuals of layers 0 and 1
    assert handle.stats().attention_flops_fraction == pytest.approx((kept + refresh) / (2 * sum(weights)))


@settings(max_examples=40, deadline=None)
@given(
    case=st.one_of(
        st.tuples(st.integers(1, 40), st.integers(0, 45)),  # band: image tokens, half-width
        st.sampled_from([(16, Tiles2d((4, 4), (2, 2), 0)), (24, Tiles2d((4, 6), (2, 3), 1)), (12, Tiles1d(3, 1))]),
    ),
    text=st.integers(1, 9),
    text_first=st.booleans(),
    kernel=st.sampled_from(["auto", "chunked", "flex", "dense"]),
    seed=st.integers(0, 2**16),
)
def test_arrow_kernels_match_the_dense_reference(case, text, text_first, kernel, seed):
    tokens, window = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, tokens + text, 3, 8, generator=g, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    allowed = arrow_reference_mask(window, tokens, text, text_first)
    assert torch.equal(arrow.mask(window, tokens, text, text_first), allowed)
    got = arrow.bind_arrow(window, tokens, text, text_first, kernel)(q, k, v)
    torch.testing.assert_close(got, attention(q, k, v, allowed), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------
# refusals and step guards


def test_an_image_plan_is_refused_on_an_mmdit():
    model, methods = float64_model("sd3"), [["full"] * LAYERS] * 2
    plan = mmdit_plan(model, "sd3", methods, 2, "none")
    image = msgspec.structs.replace(plan, layers=None, tokens=Tokens(64), summary=summarize(methods, 64, 2))
    with pytest.raises(PlanError, match=r"\$\.layers: plan has a spatial layer 0, the model's layer 0 is joint"):
        runtime.apply(image, model)


def test_a_flux_plan_is_refused_on_sd3():
    plan = mmdit_plan(float64_model("flux"), "flux", [["full"] * LAYERS] * 2, 2, "none")
    with pytest.raises(PlanError, match=r"\$\.layers\[1\]\.kind: plan has a joint layer 1, the model's layer 1 is spatial"):
        runtime.apply(plan, tiny_sd3())
    same_layout = tiny_flux(seed=0)
    same_layout.register_to_config(num_single_layers=3)  # another configuration, same layers
    with pytest.raises(PlanError, match=r"\$\.model\.config_hash: plan was calibrated for another"):
        runtime.apply(plan, same_layout)


def test_batched_cfg_is_refused_on_flux_and_separate_on_sd3():
    flux, sd3 = float64_model("flux"), float64_model("sd3")
    with pytest.raises(PlanError, match=r"\$\.sampling\.cfg_mode: plan says 'batched', FluxTransformer2DModel runs CFG in separate calls"):
        runtime.apply(mmdit_plan(flux, "flux", [["full"] * LAYERS] * 2, 2, "batched"), flux)
    with pytest.raises(PlanError, match=r"\$\.sampling\.cfg_mode: plan says 'separate', SD3Transformer2DModel runs CFG batched \('uncond_cond'\)"):
        runtime.apply(mmdit_plan(sd3, "sd3", [["full"] * LAYERS] * 2, 2, "separate"), sd3)


def test_text_token_mismatch_names_the_field():
    model = float64_model("sd3")
    plan = mmdit_plan(model, "sd3", [["full"] * LAYERS] * 2, 2, "none")
    inputs = step_calls("sd3", 0, "none")[0]
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :3]
    with runtime.apply(plan, model), pytest.raises(
        PlanError, match=r"\$\.layers\[0\]\.text_tokens: plan has 5 text tokens, layer 0 \(joint\) runs 3"
    ), torch.no_grad():
        model(**inputs)


def _flux_handle(methods):
    model = float64_model("flux")
    return model, runtime.apply(mmdit_plan(model, "flux", methods, 2, "separate"), model)


def test_a_third_call_in_one_step_is_refused():
    model, handle = _flux_handle([["full"] * LAYERS] * 3)
    calls = step_calls("flux", 0, "separate")
    with handle, torch.no_grad():
        model(**calls[0])
        model(**calls[1])
        assert handle.step == 1
        with pytest.raises(PlanError, match=r"\$\.sampling\.cfg_mode: a third transformer call at step 0"):
            model(**calls[1])


def test_a_step_missing_its_second_call_is_refused():
    model, handle = _flux_handle([["full"] * LAYERS] * 3)
    with handle, torch.no_grad():
        model(**step_calls("flux", 0, "separate")[0])
        assert handle.step == 0
        with pytest.raises(PlanError, match=r"\$\.sampling\.cfg_mode: step 0 ran one transformer call"):
            model(**step_calls("flux", 1, "separate")[0])


def test_separate_steps_past_the_plan_are_refused():
    model, handle = _flux_handle([["full"] * LAYERS] * 2)
    with handle, torch.no_grad():
        for t in range(2):
            for call in step_calls("flux", t, "separate"):
                model(**call)
        assert handle.stats().steps == 2 and handle.stats().method_counts["full"] == 2 * LAYERS
        with pytest.raises(PlanError, match=r"\$\.sampling\.num_steps: plan has 2 steps"):
            model(**step_calls("flux", 2, "separate")[0])


def test_a_cfg_batch_is_refused_by_a_separate_plan():
    model, handle = _flux_handle([["full"] * LAYERS] * 2)
    call = step_calls("flux", 0, "separate")[0]
    call = {**call, "hidden_states": torch.cat([call["hidden_states"][:1]] * 2)}
    with handle, torch.no_grad(), pytest.raises(PlanError, match=r"\$\.sampling\.cfg_mode: plan is calibrated in separate calls"):
        model(**call)
