"""apply / remove, generations, interruptions, statistics and cache release."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from msgspec.structs import replace

import runtime
from runtime.apply import self_attention_layers
from runtime.processor import FastAttnProcessor
from schemas import PlanError
from tests.plans import all_full, plan_for
from tests.runtime.conftest import float64_model, generate_dit, generate_pixart, run_steps, step_inputs

MIXED = [
    ["full", "full", "full"],
    ["wars", "ast", "asc"],
    ["wars_asc", "ast", "wars"],
    ["ast", "full", "wars_asc"],
]


def test_remove_restores_outputs_bit_for_bit(pixart_pipe):
    raw = generate_pixart(pixart_pipe)
    handle = runtime.apply(plan_for(pixart_pipe.transformer, MIXED), pixart_pipe)
    planned = generate_pixart(pixart_pipe)
    handle.remove()
    handle.remove()  # idempotent
    assert not torch.equal(raw, planned)
    assert torch.equal(generate_pixart(pixart_pipe), raw)
    assert "set_timesteps" not in vars(pixart_pipe.scheduler)


def test_two_generations_with_same_seed_are_identical(dit_pipe):
    plan = plan_for(dit_pipe.transformer, MIXED, cfg_order="cond_uncond")
    with runtime.apply(plan, dit_pipe) as handle:
        first = generate_dit(dit_pipe)
        second = generate_dit(dit_pipe)
    assert torch.equal(first, second)
    assert handle.stats().generations == 2


def test_exception_between_steps_then_clean_generation(pixart_pipe):
    plan = plan_for(pixart_pipe.transformer, MIXED)
    with runtime.apply(plan, pixart_pipe):
        clean = generate_pixart(pixart_pipe)

        def interrupt(step, timestep, latents):
            if step == 1:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            generate_pixart(pixart_pipe, callback=interrupt, callback_steps=1)
        again = generate_pixart(pixart_pipe)
    assert torch.equal(clean, again)


def test_exception_inside_forward_ends_the_generation_on_a_bare_transformer():
    model = float64_model("pixart")
    plan = plan_for(model, MIXED)
    with runtime.apply(plan, model) as handle:
        clean = run_steps(model, "pixart", 4)
        handle.reset()
        run_steps(model, "pixart", 2)
        boom = model.transformer_blocks[1].register_forward_hook(lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError), torch.no_grad():
            model(**step_inputs("pixart", 2, cfg=True, order="uncond_cond"))
        boom.remove()
        again = run_steps(model, "pixart", 4)  # starts at step 0 by itself
    for a, b in zip(clean, again):
        assert torch.equal(a, b)


def test_bare_transformer_needs_reset_between_generations():
    model = float64_model("dit")
    plan = plan_for(model, MIXED, cfg_order="cond_uncond")
    with runtime.apply(plan, model) as handle:
        first = run_steps(model, "dit", 4, order="cond_uncond")
        with pytest.raises(PlanError, match=r"\$\.sampling\.num_steps"):
            run_steps(model, "dit", 1, order="cond_uncond")
        handle.reset()
        assert handle.step == 0
        second = run_steps(model, "dit", 4, order="cond_uncond")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_stats_count_what_ran_and_caches_are_released():
    model = float64_model("pixart")
    plan = plan_for(model, MIXED, window=8)
    with runtime.apply(plan, model) as handle:
        run_steps(model, "pixart", 4)
        stats = handle.stats()
        state = handle.runner.state
        assert state.residuals == {} and state.outputs == {}
    assert stats.method_counts == plan.summary.method_counts
    assert stats.steps == 4 and stats.generations == 1
    # layer 0 refreshes at step 0 for wars/wars_asc; layer 2 at its asc step
    assert stats.residual_refreshes == 2
    # peak during step 2: residual of layer 0 (4 rows x 2 heads x 64 x 8, float64),
    # layer 2's conditional-only residual (2 rows), the outputs kept for ast of layer 1
    # (from step 0) and of layer 0 (from step 2), each 4 rows x 64 x 16
    residual, output = 4 * 2 * 64 * 8 * 8, 4 * 64 * 16 * 8
    assert stats.peak_cache_bytes == residual + residual // 2 + 2 * output
    band = plan.summary.attention_flops_fraction
    assert stats.attention_flops_fraction > band  # refresh windows are counted as executed


def test_merged_refresh_runs_the_same_plan_within_rounding_and_counts_no_extra_window():
    model = float64_model("pixart")
    plan = plan_for(model, MIXED, window=8)
    results = {}
    for merged in (False, True):
        with runtime.apply(plan, model, merged_refresh=merged) as handle:
            results[merged] = run_steps(model, "pixart", 4), handle.stats()
    (plain, plain_stats), (merged, merged_stats) = results[False], results[True]
    for a, b in zip(plain, merged, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert merged_stats.residual_refreshes == plain_stats.residual_refreshes == 2
    assert merged_stats.attention_flops_fraction == pytest.approx(plan.summary.attention_flops_fraction)
    assert plain_stats.attention_flops_fraction > merged_stats.attention_flops_fraction


def test_all_full_plan_holds_no_cache():
    model = float64_model("dit")
    with runtime.apply(plan_for(model, all_full(3, 3), cfg_order="cond_uncond"), model) as handle:
        run_steps(model, "dit", 3, order="cond_uncond")
    assert handle.stats().peak_cache_bytes == 0
    assert handle.stats().attention_flops_fraction == 1.0


def test_caches_kept_only_for_layers_that_need_them():
    model = float64_model("pixart")
    methods = [["full"] * 3, ["full", "ast", "full"], ["full", "full", "full"]]
    with runtime.apply(plan_for(model, methods), model) as handle:
        inputs = [step_inputs("pixart", t, cfg=True, order="uncond_cond") for t in range(3)]
        with torch.no_grad():
            model(**inputs[0])
            assert set(handle.runner.state.outputs) == {1}
            assert handle.runner.state.residuals == {}
            model(**inputs[1])
            assert handle.runner.state.outputs == {}
            model(**inputs[2])
    one_output = 4 * 64 * 16 * 8  # rows x tokens x channels x float64 bytes
    assert handle.stats().peak_cache_bytes == one_output


# -- one live plan per transformer; remove() puts back exactly what was there ---------


class FakeScheduler:
    """The part of a diffusers scheduler the runtime touches."""

    timesteps: tuple[int, ...] = ()

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.timesteps = tuple(range(num_inference_steps))


class FrozenScheduler(FakeScheduler):
    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{name} is read-only")


def snapshot(model: torch.nn.Module) -> tuple:
    """Processor objects, forward hooks and instance attributes of ``model``."""
    processors = [attn.processor for attn in self_attention_layers(model)]
    return processors, dict(model._forward_pre_hooks), dict(model._forward_hooks), set(vars(model))


def assert_untouched(model: torch.nn.Module, before: tuple) -> None:
    after = snapshot(model)
    assert all(a is b for a, b in zip(after[0], before[0], strict=True))
    assert after[1:] == before[1:]


def test_second_apply_is_refused_and_the_live_plan_keeps_running():
    model = float64_model("pixart")
    plan = plan_for(model, MIXED)
    with runtime.apply(plan, model):
        expected = run_steps(model, "pixart", 4)
    refused = "target: a plan is already applied to this transformer; remove its handle first"
    with runtime.apply(plan, model) as first:
        installed = snapshot(model)
        with pytest.raises(RuntimeError, match=refused):
            runtime.apply(plan, model)
        with pytest.raises(RuntimeError, match=refused):  # through a pipeline holding it
            runtime.apply(plan, SimpleNamespace(transformer=model, scheduler=FakeScheduler()))
        assert_untouched(model, installed)
        got = run_steps(model, "pixart", 4)
        assert first.stats().steps == 4
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_remove_puts_back_the_original_processor_objects_then_apply_works_again():
    model = float64_model("dit")
    plan = plan_for(model, MIXED, cfg_order="cond_uncond")
    before = snapshot(model)
    raw = run_steps(model, "dit", 4, order="cond_uncond")
    first = runtime.apply(plan, model)
    first.remove()
    assert_untouched(model, before)
    second = runtime.apply(plan, model)  # accepted again
    try:
        first.remove()  # a stale handle takes nothing off the live one
        assert isinstance(model.transformer_blocks[0].attn1.processor, FastAttnProcessor)
        with pytest.raises(RuntimeError, match="already applied"):
            runtime.apply(plan, model)
        run_steps(model, "dit", 4, order="cond_uncond")
    finally:
        second.remove()
    assert_untouched(model, before)
    for a, b in zip(raw, run_steps(model, "dit", 4, order="cond_uncond")):
        assert torch.equal(a, b)


def test_remove_on_a_pipeline_restores_processors_and_scheduler(pixart_pipe):
    model, scheduler = pixart_pipe.transformer, pixart_pipe.scheduler
    before, method = snapshot(model), scheduler.set_timesteps
    with runtime.apply(plan_for(model, MIXED), pixart_pipe):
        assert "set_timesteps" in vars(scheduler)
        with pytest.raises(RuntimeError, match="already applied"):
            runtime.apply(plan_for(model, MIXED), model)  # the bare transformer of a live pipeline
    assert_untouched(model, before)
    assert "set_timesteps" not in vars(scheduler) and scheduler.set_timesteps == method


@pytest.mark.parametrize(
    "break_plan",
    [
        lambda p: replace(p, model=replace(p.model, num_heads=4)),
        lambda p: replace(p, sampling=replace(p.sampling, cfg_order="cond_uncond")),
    ],
    ids=["heads", "cfg_order"],
)
def test_refused_apply_leaves_nothing_installed(break_plan):
    model = float64_model("pixart")
    plan = plan_for(model, MIXED)
    before = snapshot(model)
    with pytest.raises(PlanError):
        runtime.apply(break_plan(plan), model)
    assert_untouched(model, before)
    runtime.apply(plan, model).remove()  # no mark was left


def test_failure_after_install_rolls_back():
    model = float64_model("pixart")
    plan = plan_for(model, MIXED)
    before = snapshot(model)
    with pytest.raises(AttributeError, match="read-only"):
        runtime.apply(plan, SimpleNamespace(transformer=model, scheduler=FrozenScheduler()))
    assert_untouched(model, before)
    runtime.apply(plan, model).remove()


@pytest.mark.parametrize("first_out", [0, 1])
def test_handles_sharing_a_scheduler_come_off_in_any_order(first_out):
    scheduler = FakeScheduler()
    prior = scheduler.set_timesteps
    scheduler.set_timesteps = prior  # a wrapper the user put there: it must come back
    models = [float64_model("pixart"), float64_model("dit")]
    plans = [plan_for(models[0], MIXED), plan_for(models[1], MIXED, cfg_order="cond_uncond")]
    before = [snapshot(m) for m in models]
    targets = [SimpleNamespace(transformer=m, scheduler=scheduler) for m in models]
    handles = [runtime.apply(p, t) for p, t in zip(plans, targets)]
    try:
        run_steps(models[0], "pixart", 1)
        assert handles[0].step == 1
        scheduler.set_timesteps(4)
        assert handles[0].step == 0
        handles[first_out].remove()
        assert_untouched(models[first_out], before[first_out])
        with pytest.raises(PlanError, match=r"\$\.sampling\.num_steps: plan has 4 steps, .* runs 5"):
            scheduler.set_timesteps(5)  # the other plan still counts the steps
    finally:
        for handle in handles:
            handle.remove()
    for model, snap in zip(models, before):
        assert_untouched(model, snap)
    assert vars(scheduler)["set_timesteps"] is prior
    scheduler.set_timesteps(5)
