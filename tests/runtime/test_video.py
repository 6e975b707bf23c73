"""Latte: spatial and temporal self-attention layers, both CFG layouts."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime
from schemas import Layer, PlanError
from tests.plans import all_full, plan_for
from tests.runtime.reference import ReferenceRun
from tests.tiny import FRAMES, tiny_latte_pipeline, tiny_latte_transformer

TOKENS = 16  # 8x8 latents, patch 2
LAYERS = 4  # spatial 0, temporal 0, spatial 1, temporal 1


@functools.cache
def model() -> torch.nn.Module:
    return tiny_latte_transformer(seed=3).double()


def layers(spatial_window: int, temporal_window: int) -> list[Layer]:
    return [
        Layer("spatial", TOKENS, spatial_window, sequences=FRAMES),
        Layer("temporal", FRAMES, temporal_window, sequences=TOKENS),
    ] * 2


def inputs(step: int) -> dict:
    g = torch.Generator().manual_seed(50 + step)
    latents = torch.randn(2, 4, FRAMES, 8, 8, generator=g, dtype=torch.float64)
    text = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    return {
        "hidden_states": torch.cat([latents, latents]),
        "encoder_hidden_states": text,
        "timestep": torch.full((4,), 900.0 - 150 * step, dtype=torch.float64),
    }


def run(m, steps: int) -> list[torch.Tensor]:
    with torch.no_grad():
        return [m(**inputs(t)).sample for t in range(steps)]


def video_plan(methods, ws=5, wt=1):
    return plan_for(model(), methods, num_tokens=TOKENS, window=ws, layers=layers(ws, wt), frames=FRAMES)


@st.composite
def grids(draw):
    steps = draw(st.integers(2, 4))
    choices = ["full", "wars", "ast", "asc", "wars_asc"]
    return [["full"] * LAYERS] + [[draw(st.sampled_from(choices)) for _ in range(LAYERS)] for _ in range(steps - 1)]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(methods=grids(), ws=st.integers(1, TOKENS - 1), wt=st.integers(1, FRAMES - 1))
def test_every_method_matches_float64_reference_on_both_layer_kinds(methods, ws, wt):
    m = model()
    ref = ReferenceRun(methods, [ws, wt] * 2, cond_first=False)  # LattePipeline: [uncond, cond]
    expected = ref.outputs(m, lambda t: [m(**inputs(t)).sample])
    with runtime.apply(video_plan(methods, ws, wt), m):
        got = run(m, len(methods))
    for t, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"step {t} of {methods}")


@pytest.mark.parametrize("kind_index", [2, 3])  # spatial and temporal layers of block 1
def test_cfg_sharing_takes_the_conditional_rows_of_each_layout(kind_index):
    """With asc on one layer only, the output's halves must both equal the cond half."""
    m = model()
    methods = [["full"] * LAYERS, ["full"] * LAYERS]
    methods[1][kind_index] = "asc"
    seen = {}

    def grab(module, args, output):
        seen["out"] = output

    blocks = m.transformer_blocks if kind_index == 2 else m.temporal_transformer_blocks
    attn = blocks[1].attn1
    hook = attn.register_forward_hook(grab)
    try:
        full = run(m, 2)
        full_out = seen["out"]
        with runtime.apply(video_plan(methods), m):
            run(m, 2)
        shared_out = seen["out"]
    finally:
        hook.remove()
    half = full_out.shape[0] // 2
    torch.testing.assert_close(shared_out[half:], full_out[half:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shared_out[:half], full_out[half:], rtol=1e-12, atol=1e-12)
    assert (full_out[:half] - full_out[half:]).abs().max() > 1e-6  # the halves did differ


def test_stats_weigh_spatial_and_temporal_layers_by_their_cost():
    m = model()
    methods = [["full"] * LAYERS, ["wars", "ast", "wars", "ast"]]
    plan = video_plan(methods, ws=3, wt=1)
    with runtime.apply(plan, m) as handle:
        run(m, 2)
    stats = handle.stats()
    band = (TOKENS * 7 - 3 * 4) / TOKENS**2
    spatial, temporal = FRAMES * TOKENS**2, TOKENS * FRAMES**2
    refresh = 2 * spatial * band  # step 0 windows that refresh the spatial residuals
    kept = 2 * (spatial + temporal) + 2 * spatial * band + refresh
    assert stats.attention_flops_fraction == pytest.approx(kept / (4 * (spatial + temporal)))
    want = (2 * (spatial + temporal) + 2 * spatial * band) / (4 * (spatial + temporal))
    assert plan.summary.attention_flops_fraction == pytest.approx(want)


def test_all_full_plan_is_identity_on_latte_pipeline():
    pipe = tiny_latte_pipeline(seed=0)
    call = dict(prompt="a cat", num_inference_steps=3, height=8, width=8, video_length=FRAMES,
                output_type="pt", clean_caption=False)
    raw = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    plan = plan_for(pipe.transformer, all_full(3, LAYERS), num_tokens=TOKENS,
                    layers=layers(4, 1), frames=FRAMES)
    with runtime.apply(plan, pipe):
        planned = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    assert torch.equal(raw, planned)


def test_image_plan_on_a_video_model_is_refused():
    with pytest.raises(PlanError, match=r"\$\.layers: plan has a spatial layer 1, the model's layer 1 is temporal"):
        runtime.apply(plan_for(model(), all_full(2, LAYERS), num_tokens=TOKENS), model())


def test_layer_token_mismatch_names_the_layer():
    bad = [Layer("spatial", TOKENS, 3, FRAMES), Layer("temporal", 8, 1, TOKENS)] * 2
    plan = plan_for(model(), all_full(2, LAYERS), num_tokens=TOKENS, layers=bad, frames=8)
    with runtime.apply(plan, model()), pytest.raises(
        PlanError, match=r"\$\.layers\[1\]\.num_tokens: plan has 8 tokens, layer 1 \(temporal\) runs 4"
    ):
        run(model(), 1)
