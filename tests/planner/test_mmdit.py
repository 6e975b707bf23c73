"""Planning the MMDiTs: the shipped sd3-digits (CFG batched) and flux-digits (CFG in separate calls)."""

from __future__ import annotations

import math

import pytest
import torch

import runtime
from planner.build import BuildRequest, build_plan
from planner.compile import compile_plans
from planner.embedded import embedded_model, load_embedded
from planner.profile import profile_model
from runtime.apply import self_attention_layers
from tests.planner.pipelines import embedded_request
from schemas import decode_plan, encode_plan

STEPS = 4
MODELS = ("sd3-digits", "flux-digits")


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {name: load_embedded(name) for name in MODELS}


def request(name: str, **changes) -> BuildRequest:
    return embedded_request(name, steps=STEPS, **changes)


def fresh_generation(pipe, name: str, req: BuildRequest) -> torch.Tensor:
    """The calibration batch generated again, written out independently of the planner."""
    model = embedded_model(name)
    kwargs = {"negative_prompt": "", **model.call_kwargs, model.guidance_arg: req.guidance}
    return pipe(
        prompt=list(req.inputs),
        num_inference_steps=req.steps,
        generator=torch.Generator("cpu").manual_seed(req.seed),
        height=req.height,
        width=req.width,
        output_type="latent",
        **kwargs,
    ).images


@pytest.mark.parametrize("name", MODELS)
def test_delta_one_keeps_every_layer_full_and_records_the_joint_layers(pipes, name):
    plan = build_plan(pipes[name], request(name, delta=1.0)).plan
    assert {m for row in plan.methods for m in row} == {"full"}
    model = embedded_model(name)
    assert plan.sampling.cfg and plan.sampling.cfg_mode == model.cfg_mode
    assert plan.sampling.cfg_order == model.cfg_order
    kinds = [layer.kind for layer in plan.layers]
    assert len(kinds) == model.layers and kinds.count("joint") >= 1
    text = plan.tokens.text_tokens
    assert text == model.call_kwargs["max_sequence_length"] * (2 if name == "sd3-digits" else 1)  # SD3: CLIP then T5
    assert all(layer.text_tokens == (text if layer.kind == "joint" else 0) for layer in plan.layers)
    assert plan.tokens.num_tokens == model.tokens


@pytest.mark.parametrize("name", MODELS)
def test_calibration_trajectory_is_what_the_runtime_runs(pipes, name):
    pipe = pipes[name]
    req = request(name, delta=0.8)
    result = build_plan(pipe, req)
    methods = {m for row in result.plan.methods for m in row}
    assert result.plan.summary.attention_flops_fraction < 1.0
    assert methods & {"asc", "wars_asc"}, methods  # the CFG sharing path was taken
    with runtime.apply(result.plan, pipe) as handle:
        again = fresh_generation(pipe, name, req)
        counts = handle.stats().method_counts
    assert torch.equal(again, result.images)
    assert counts == result.plan.summary.method_counts


def test_split_calibration_batches_give_the_same_decisions_with_separate_cfg(pipes):
    whole = build_plan(pipes["flux-digits"], request("flux-digits", delta=0.8)).plan
    split = build_plan(pipes["flux-digits"], request("flux-digits", delta=0.8, calib_batch=1)).plan
    assert split.methods == whole.methods
    for row_split, row_whole in zip(split.losses[1:], whole.losses[1:]):
        assert row_split == pytest.approx(row_whole, rel=1e-2, abs=1e-6)


def _layer_outputs(pipe, name: str, req: BuildRequest) -> list[list[torch.Tensor]]:
    """Every self-attention layer's output at every transformer call of a plain generation,
    each output's tensors flattened and joined."""
    calls: list[list[torch.Tensor]] = []
    layers = self_attention_layers(pipe.transformer)

    def starts(*_):
        calls.append([None] * len(layers))

    def keep(i):
        def hook(module, args, output):
            parts = output if isinstance(output, tuple) else (output,)
            calls[-1][i] = torch.cat([p.reshape(p.shape[0], -1) for p in parts if p is not None], dim=1)
        return hook

    hooks = [pipe.transformer.register_forward_pre_hook(starts)]
    hooks += [attn.register_forward_hook(keep(i)) for i, attn in enumerate(layers)]
    try:
        fresh_generation(pipe, name, req)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def test_separate_cfg_profile_measures_each_call_against_its_own_history(pipes):
    """``asc``: the unconditional call given the conditional call's output; ``ast``: each
    call given its own previous output; both over the rows of the two calls together."""
    pipe = pipes["flux-digits"]
    req = request("flux-digits")
    measured = profile_model(pipe, req, lags=2).profile.measurements
    calls = _layer_outputs(pipe, "flux-digits", req)
    assert len(calls) == 2 * STEPS
    sq = lambda x: float(x.double().pow(2).sum())  # noqa: E731
    for t in range(1, STEPS):
        cond, uncond = calls[2 * t], calls[2 * t + 1]
        for i in range(len(cond)):
            norm = sq(cond[i]) + sq(uncond[i])
            asc = math.sqrt(sq(uncond[i] - cond[i]) / norm)
            ast = math.sqrt((sq(cond[i] - calls[2 * t - 2][i]) + sq(uncond[i] - calls[2 * t - 1][i])) / norm)
            assert measured.asc[t][i] == pytest.approx(asc, rel=1e-3)
            assert measured.ast[t][i][0] == pytest.approx(ast, rel=1e-3)
            assert measured.wars_asc[t][i][0] is not None and measured.wars_after_asc[t][i][0] is not None


@pytest.mark.parametrize("name", MODELS)
def test_compiled_plans_validate_and_run_under_the_runtime(pipes, name):
    pipe = pipes[name]
    req = request(name)
    profile = profile_model(pipe, req, lags=2).profile
    plans = compile_plans(profile, (1.0, 0.95, 0.8, 0.5))
    assert plans[-1].summary.attention_flops_fraction < 1.0
    for plan in plans:
        assert decode_plan(encode_plan(plan)) == plan
        with runtime.apply(plan, pipe) as handle:
            fresh_generation(pipe, name, req)
        assert handle.stats().method_counts == plan.summary.method_counts
