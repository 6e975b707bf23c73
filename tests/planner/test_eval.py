"""``planner eval``: figures computed from the generated images, never echoed from the plan."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import cli
import runtime
from planner.build import draft_plan
from planner.calibration import CLASS_IDS, EVAL_CAPTIONS, EVAL_CLASS_IDS
from planner.embedded import EMBEDDED_MODELS
from planner.evaluate import eval_inputs, evaluate
from planner.output import write_plan
from planner.registry import FAMILIES, ModelSpec, resolve_model
from schemas import Plan, summarize
from tests.planner.pipelines import request

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args], env={"COLUMNS": "120"})


def with_methods(plan: Plan, methods: list[list[str]], name: str | None = None) -> Plan:
    """``plan`` with another grid (and model name), its summary recomputed."""
    model = msgspec.structs.replace(plan.model, name=name) if name else plan.model
    summary = summarize(methods, plan.tokens.num_tokens, plan.window)
    return msgspec.structs.replace(plan, model=model, methods=methods, summary=summary)


def grid(layers: int, later: str, *, last_only: bool = False) -> list[list[str]]:
    """Step 0 full; ``later`` on every later cell, or only on layer 0 of the last step."""
    rows = [["full"] * layers for _ in range(STEPS)]
    for t in range(1, STEPS):
        for i in range(layers):
            if not last_only or (t == STEPS - 1 and i == 0):
                rows[t][i] = later
    return rows


@pytest.fixture(scope="module")
def plans(pipelines, folders, tmp_path_factory) -> dict[str, Path]:
    """Hand-made plans for the tiny folders: all full, mild (one wars cell), harsh (ast everywhere)."""
    root = tmp_path_factory.mktemp("eval-plans")
    made = {}
    for family in ("pixart-sigma", "dit"):
        pipe = pipelines[family]
        draft = draft_plan(pipe, request(pipe, steps=STEPS, seed=0))
        layers = draft.model.num_layers
        grids = {
            "full": grid(layers, "full"),
            "mild": grid(layers, "wars", last_only=True),
            "harsh": grid(layers, "ast"),
        }
        for kind, methods in grids.items():
            path = root / f"{family}-{kind}.json"
            write_plan(with_methods(draft, methods, name=str(folders[family])), path)
            made[f"{family}-{kind}"] = path
    return made


def eval_json(plan: Path, *extra) -> dict:
    result = invoke("eval", plan, "-n", 4, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_all_full_plan_gives_identical_images_and_time_ratio_near_one(plans):
    facts = eval_json(plans["pixart-sigma-full"], "--repeats", 3)
    assert facts["psnr_db"] == "inf"
    assert facts["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert facts["attention_flops_kept"] == {"plan": 1.0, "executed": 1.0}
    assert 0.5 < facts["time_ratio"] < 2.0
    assert facts["time_ratio"] == pytest.approx(facts["seconds"]["planned"] / facts["seconds"]["raw"])
    layers = len(json.loads(plans["pixart-sigma-full"].read_text())["methods"][0])
    assert facts["method_counts"]["full"] == STEPS * layers  # one generation of 4 samples
    assert facts["accuracy"] is None  # no digit classifier for a non-digit model


def test_harsher_plan_gives_lower_fidelity(plans):
    mild = eval_json(plans["pixart-sigma-mild"])
    harsh = eval_json(plans["pixart-sigma-harsh"])
    assert math.isfinite(mild["psnr_db"]) and math.isfinite(harsh["psnr_db"])
    assert harsh["psnr_db"] < mild["psnr_db"] - 3.0
    assert harsh["ssim"] < mild["ssim"] < 1.0
    plan = json.loads(plans["pixart-sigma-harsh"].read_text())
    assert harsh["attention_flops_kept"]["plan"] == pytest.approx(1 / STEPS)
    assert harsh["attention_flops_kept"]["executed"] == pytest.approx(1 / STEPS)
    assert harsh["method_counts"]["ast"] == plan["summary"]["method_counts"]["ast"]
    # the mild plan refreshes its residual at a full step, which the executed figure counts
    assert mild["attention_flops_kept"]["executed"] > mild["attention_flops_kept"]["plan"]


def test_figures_are_computed_from_independently_generated_images(pixart, plans):
    """Raw and planned images match runs written out here; PSNR and SSIM follow from them."""
    spec = ModelSpec("tiny", "unused", FAMILIES["PixArtSigmaPipeline"])
    plan = runtime.load_plan(plans["pixart-sigma-harsh"])
    inputs = eval_inputs(spec, plan, 3, None)
    result = evaluate(pixart, spec, plan, inputs, batch_size=2)

    def generate() -> np.ndarray:
        return pixart(
            prompt=list(inputs.prompts), negative_prompt="", height=8, width=8,
            num_inference_steps=STEPS, guidance_scale=4.5, output_type="np",
            generator=[torch.Generator().manual_seed(s) for s in inputs.seeds],
            use_resolution_binning=False, clean_caption=False,
        ).images  # fmt: skip

    raw = generate()
    with runtime.apply(plan, pixart):
        planned = generate()
    np.testing.assert_allclose(result.raw, raw, atol=1e-6)
    np.testing.assert_allclose(result.planned, planned, atol=1e-6)
    mse = np.mean((raw.astype(np.float64) - planned) ** 2)
    assert result.psnr == pytest.approx(10 * np.log10(1 / mse), abs=1e-3)
    assert result.ssim < 1.0
    assert result.seconds_raw > 0 and result.seconds_planned > 0
    assert result.stats.generations == 2  # batches of 2 and 1


def test_eval_takes_held_out_inputs_and_seeds(plans):
    facts = eval_json(plans["dit-full"])
    assert facts["prompts"] == list(EVAL_CLASS_IDS[:4])
    assert not set(facts["prompts"]) & set(CLASS_IDS)
    assert facts["seeds"] == [1000, 1001, 1002, 1003]
    spec = ModelSpec("tiny", "unused", FAMILIES["PixArtSigmaPipeline"])
    plan = runtime.load_plan(plans["pixart-sigma-full"])
    assert eval_inputs(spec, plan, 20, None).prompts[16:] == EVAL_CAPTIONS[:4]  # cycles


def test_seeds_that_repeat_the_calibration_seed_are_refused(plans):
    result = invoke("eval", plans["dit-full"], "-n", 4, "--seed", -2)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "calibration seed 0" in lines[0]


def test_table_and_grid(plans, tmp_path):
    png = tmp_path / "grid.png"
    result = invoke("eval", plans["dit-harsh"], "-n", 3, "--save-grid", png)
    assert result.exit_code == 0, result.output
    for label in ("attention FLOPs kept (plan)", "executed", "PSNR vs raw", "SSIM vs raw", "wall time", "25.0 %"):
        assert label in result.stdout
    assert "digit accuracy" not in result.stdout
    image = np.asarray(Image.open(png))
    scale, gap = 96 // 8, 2
    assert image.shape == (2 * 8 * scale + 3 * gap, 3 * 8 * scale + 4 * gap, 3)
    top = image[gap : gap + 8 * scale]
    bottom = image[2 * gap + 8 * scale : 2 * gap + 16 * scale]
    assert not np.array_equal(top, bottom)  # the harsh plan changed the samples


def test_plan_for_another_model_is_refused(plans, folders):
    result = invoke("eval", plans["pixart-sigma-full"], "--model", folders["dit"], "-n", 2)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "$.model.class_name" in lines[0]


@pytest.mark.skipif(
    not (EMBEDDED_MODELS["pixart-digits"].folder / "model_index.json").is_file(),
    reason="models/pixart-digits is not trained yet",
)
def test_embedded_model_reports_digit_accuracy(tmp_path):
    from planner.loading import load_pipeline
    from planner.settings import build_request, load_settings

    spec = resolve_model("pixart-digits")
    pipe = load_pipeline(spec, torch.device("cpu"), torch.float32)
    settings = load_settings({"model": "pixart-digits", "delta": 0.9, "output": tmp_path / "p.json"})
    draft = draft_plan(pipe, build_request(settings, spec))
    layers, steps = draft.model.num_layers, draft.sampling.num_steps
    harsh = [["full"] * layers] + [["ast"] * layers for _ in range(steps - 1)]
    for kind, methods in (("full", draft.methods), ("harsh", harsh)):
        write_plan(with_methods(draft, methods), tmp_path / f"{kind}.json")
    full = eval_json(tmp_path / "full.json")
    harsh = eval_json(tmp_path / "harsh.json")
    assert full["prompts"] == list(EMBEDDED_MODELS["pixart-digits"].eval_prompts[:4])
    assert full["psnr_db"] == "inf" and full["accuracy"]["raw"] == full["accuracy"]["planned"]
    assert math.isfinite(harsh["psnr_db"]) and harsh["ssim"] < 0.99
    assert 0.0 <= harsh["accuracy"]["planned"] <= 1.0
