"""The search on a tiny Latte pipeline: spatial and temporal layers in one plan."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

import runtime
from planner.build import BuildRequest, build_plan
from planner.report import render_plan
from schemas import decode_plan, encode_plan
from tests.tiny import FRAMES, tiny_latte_pipeline

CAPTIONS = ("a red cat under the tree", "the big blue house")


@pytest.fixture(scope="module")
def latte():
    pipe = tiny_latte_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def request(**changes) -> BuildRequest:
    settings = dict(name="tiny-latte", inputs=CAPTIONS, delta=0.9, steps=3, guidance=4.5, seed=0,
                    height=8, width=8)
    settings.update(changes)
    return BuildRequest(**settings)


def fresh_generation(pipe, req: BuildRequest) -> torch.Tensor:
    return pipe(
        prompt=list(req.inputs), negative_prompt="", num_inference_steps=req.steps,
        guidance_scale=req.guidance, generator=torch.Generator("cpu").manual_seed(req.seed),
        height=8, width=8, video_length=FRAMES, output_type="latent", clean_caption=False,
    ).frames


def test_video_plan_describes_spatial_and_temporal_layers(latte):
    plan = build_plan(latte, request()).plan
    kinds = [layer.kind for layer in plan.layers]
    assert kinds == ["spatial", "temporal"] * 2
    assert [layer.num_tokens for layer in plan.layers] == [16, FRAMES] * 2
    assert plan.tokens.frames == FRAMES
    assert decode_plan(encode_plan(plan)) == plan
    assert plan.summary.attention_flops_fraction < 1.0  # the trained-free tiny model compresses


def test_video_calibration_trajectory_is_what_the_runtime_runs(latte):
    req = request()
    result = build_plan(latte, req)
    with runtime.apply(result.plan, latte):
        again = fresh_generation(latte, req)
    assert torch.equal(result.images, again)


def test_video_delta_one_keeps_every_layer_full(latte):
    plan = build_plan(latte, request(delta=1.0)).plan
    assert plan.summary.method_counts["full"] == 3 * 4


def test_show_marks_temporal_layers(latte):
    plan = build_plan(latte, request()).plan
    console = Console(width=120, record=True, color_system=None)
    console.print(render_plan(plan))
    text = console.export_text()
    assert f"{FRAMES} frames, temporal window" in text
    assert "lower case: temporal layer" in text
    first_row = next(line for line in text.splitlines() if line.strip().startswith("0 "))
    assert "Ff Ff" in first_row
