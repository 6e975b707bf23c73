"""The plans shipped in ``plans/``: one per embedded model and setting D1…D6, each valid and fitting its model."""

from __future__ import annotations

from pathlib import Path

import pytest

import runtime
from planner.calibration import inputs_hash
from planner.embedded import embedded_model
from planner.loading import load_transformer_skeleton
from planner.registry import resolve_model

PLANS = Path(__file__).resolve().parents[2] / "plans"
DELTAS = {1: 0.975, 2: 0.95, 3: 0.925, 4: 0.9, 5: 0.875, 6: 0.85}
MODELS = ["dit-digits", "pixart-digits", "latte-digits", "sd3-digits", "flux-digits"]
SHIPPED = [(name, d) for name in MODELS for d in DELTAS]


def path_of(name: str, d: int) -> Path:
    return PLANS / name / f"d{d}.json"


@pytest.mark.parametrize("name, d", SHIPPED, ids=[f"{n}-d{d}" for n, d in SHIPPED])
def test_shipped_plan_records_its_model_and_setting(name: str, d: int) -> None:
    plan = runtime.load_plan(path_of(name, d))  # decodes and checks every cross-field rule
    model = embedded_model(name)
    assert plan.model.name == name
    assert plan.calibration is not None and plan.calibration.delta == DELTAS[d]
    assert plan.calibration.prompts_hash == inputs_hash(list(model.calibration_prompts))
    assert plan.calibration.num_prompts == len(model.calibration_prompts)
    assert plan.sampling.num_steps == model.steps and plan.sampling.guidance_scale == model.guidance
    assert plan.sampling.cfg and plan.sampling.cfg_order == model.cfg_order
    assert plan.sampling.cfg_mode in (None, model.cfg_mode)  # absent in plans older than version 3
    assert (plan.tokens.num_tokens, plan.tokens.height, plan.tokens.width) == (model.tokens, model.height, model.width)
    assert plan.window == model.window and plan.model.num_layers == model.layers


@pytest.mark.parametrize("name, d", SHIPPED, ids=[f"{n}-d{d}" for n, d in SHIPPED])
def test_shipped_plan_fits_its_model(name: str, d: int) -> None:
    spec = resolve_model(name)
    if not (Path(spec.source) / "model_index.json").is_file():
        pytest.skip(f"models/{name} is not on this machine")
    plan = runtime.load_plan(path_of(name, d))
    assert plan.sampling.cfg_order == spec.family.cfg_order
    runtime.apply(plan, load_transformer_skeleton(spec), strict=True).remove()


@pytest.mark.parametrize("name", MODELS)
def test_lower_delta_keeps_no_more_attention(name: str) -> None:
    kept = [runtime.load_plan(path_of(name, d)).summary.attention_flops_fraction for d in DELTAS]
    assert kept == sorted(kept, reverse=True), kept
    assert kept[-1] < 1.0


TARGETS = {"a25": 0.25, "a35": 0.35, "a45": 0.45, "f40": 0.40}
TARGETED = [(name, plan) for name in ("dit-digits", "pixart-digits", "sd3-digits") for plan in TARGETS]
TARGETED += [("flux-digits", plan) for plan in ("a25", "a35", "a45")]  # its single-stream blocks keep f40 out of reach


@pytest.mark.parametrize("name, target", TARGETED, ids=[f"{n}-{t}" for n, t in TARGETED])
def test_target_plans_keep_their_share_and_fit_their_model(name: str, target: str) -> None:
    """``plans/targets.py``: attention plans at about 25/35/45 %, a feed-forward plan at 40 % of the FLOPs."""
    plan = runtime.load_plan(PLANS / name / f"{target}.json")
    model = embedded_model(name)
    assert plan.calibration.prompts_hash == inputs_hash(list(model.calibration_prompts))
    assert plan.calibration.search.startswith(("profile", "uniform"))  # the compiled plans or a uniform schedule
    figure = plan.summary.transformer_flops_fraction if target == "f40" else plan.summary.attention_flops_fraction
    assert TARGETS[target] - 0.1 < figure <= TARGETS[target]  # a25-a45: executed, refreshes included, at most the target
    assert (plan.ffn is not None) == (target == "f40")
    assert plan.summary.transformer_flops_fraction < 1.0
    spec = resolve_model(name)
    if (Path(spec.source) / "model_index.json").is_file():
        runtime.apply(plan, load_transformer_skeleton(spec), strict=True).remove()
