"""The greedy search on real (tiny) diffusers pipelines."""

from __future__ import annotations

import pytest
import torch

import planner.search
import runtime
from planner.build import build_plan
from planner.search import Chunks, rel_l1
from runtime.runner import Runner
from tests.planner.pipelines import PIPELINES, fresh_generation, request


@pytest.mark.parametrize("name", PIPELINES)
def test_delta_one_keeps_every_layer_full(pipelines, name):
    plan = build_plan(pipelines[name], request(pipelines[name], delta=1.0)).plan
    assert {m for row in plan.methods for m in row} == {"full"}
    assert plan.summary.attention_flops_fraction == 1.0


@pytest.mark.parametrize("name", ["pixart-sigma", "dit"])
def test_lower_delta_never_keeps_more_attention_flops(pipelines, name):
    pipe = pipelines[name]
    deltas = (1.0, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8)
    kept = [build_plan(pipe, request(pipe, delta=d)).plan.summary.attention_flops_fraction for d in deltas]
    assert all(later <= earlier for earlier, later in zip(kept, kept[1:])), kept
    assert kept[-1] < kept[0]


@pytest.mark.parametrize("name", PIPELINES)
def test_calibration_trajectory_is_what_the_runtime_runs(pipelines, name):
    pipe = pipelines[name]
    req = request(pipe, delta=0.97)
    result = build_plan(pipe, req)
    assert result.plan.summary.attention_flops_fraction < 1.0  # something was compressed
    with runtime.apply(result.plan, pipe) as handle:
        again = fresh_generation(pipe, req)
        counts = handle.stats().method_counts
    assert torch.equal(again, result.images)
    assert counts == result.plan.summary.method_counts


@pytest.mark.parametrize("name", ["pixart-sigma", "dit"])
def test_same_settings_and_seed_give_the_same_decisions(name):
    plans = [build_plan(pipe, request(pipe)).plan for pipe in (PIPELINES[name](), PIPELINES[name]())]
    assert plans[0].methods == plans[1].methods
    assert plans[0].losses == plans[1].losses


@pytest.mark.parametrize("name", ["pixart-sigma", "dit"])
def test_split_calibration_batches_give_the_same_decisions(pipelines, name):
    """Smaller transformer batches round differently, so losses agree only closely."""
    pipe = pipelines[name]
    whole = build_plan(pipe, request(pipe)).plan
    for size in (1, 2):
        split = build_plan(pipe, request(pipe, calib_batch=size)).plan
        assert split.methods == whole.methods
        for row_split, row_whole in zip(split.losses[1:], whole.losses[1:]):
            assert row_split == pytest.approx(row_whole, rel=1e-2, abs=1e-6)


@pytest.mark.parametrize("delta", [0.99, 0.9])
def test_kept_losses_stay_within_the_layer_budget(pixart, delta):
    plan = build_plan(pixart, request(pixart, delta=delta)).plan
    layers = plan.model.num_layers
    assert plan.losses[0] == [None] * layers
    for row, losses in zip(plan.methods[1:], plan.losses[1:]):
        previous = 0.0
        for i, (method, loss) in enumerate(zip(row, losses)):
            if method == "full":  # nothing changed: the loss of the choices so far
                assert loss == previous
            assert loss <= (i + 1) / layers * (1 - delta)
            previous = loss


def test_without_cfg_nothing_shares_across_cfg_halves(pipelines):
    for pipe in pipelines.values():
        plan = build_plan(pipe, request(pipe, guidance=1.0, delta=0.8)).plan
        assert not plan.sampling.cfg and plan.sampling.cfg_order is None
        assert not {"asc", "wars_asc"} & {m for row in plan.methods for m in row}
        assert plan.summary.attention_flops_fraction < 1.0


def test_progress_reports_every_cell_once_in_order(dit):
    seen = []
    plan = build_plan(dit, request(dit), progress=lambda t, i, m, loss: seen.append((t, i, m))).plan
    expected = [(t, i, m) for t, row in enumerate(plan.methods) for i, m in enumerate(row)]
    assert seen == expected


def test_search_leaves_the_pipeline_as_it_found_it(pixart):
    req = request(pixart)
    processors = [block.attn1.processor for block in pixart.transformer.transformer_blocks]
    before = fresh_generation(pixart, req)
    build_plan(pixart, req)
    assert "forward" not in vars(pixart.transformer)
    assert "set_timesteps" not in vars(pixart.scheduler)
    assert [block.attn1.processor for block in pixart.transformer.transformer_blocks] == processors
    assert torch.equal(fresh_generation(pixart, req), before)


def test_relative_l1_matches_a_hand_computed_value():
    a = torch.tensor([[1.0, -2.0, 0.0, 30.0]])
    b = torch.tensor([[2.0, 2.0, 0.0, -1e-9]])
    # |1-2|/2, |-2-2|/2, 0/1e-6, about 30/30
    expected = (0.5 + 2.0 + 0.0 + 1.0) / 4
    assert rel_l1([a], [b]) == pytest.approx(expected, rel=1e-5)
    assert rel_l1([a[:, :1], a[:, 1:]], [b[:, :1], b[:, 1:]]) == pytest.approx(expected, rel=1e-5)


def test_chunks_keep_both_cfg_halves_of_their_prompts():
    chunks = Chunks(rows=6, cfg=True, size=2)
    assert [idx.tolist() for idx in chunks.index] == [[0, 1, 3, 4], [2, 5]]
    batch = torch.arange(6.0)[:, None] * torch.ones(6, 3)
    parts = chunks.split((batch,), {"timestep": torch.arange(6), "scale": 2.0})
    assert [p[1]["timestep"].tolist() for p in parts] == [[0, 1, 3, 4], [2, 5]]
    assert all(p[1]["scale"] == 2.0 for p in parts)
    assert torch.equal(chunks.join([p[0][0] for p in parts]), batch)
    assert [idx.tolist() for idx in Chunks(rows=3, cfg=False, size=2).index] == [[0, 1], [2]]


@pytest.mark.parametrize("name, delta", [("pixart-sigma", 0.99), ("dit", 0.95)])
def test_first_candidate_within_budget_is_kept_in_paper_order(pipelines, monkeypatch, name, delta):
    pipe = pipelines[name]
    trials, losses = [], []
    trying, measure = Runner.trying, planner.search.rel_l1

    def logged_trying(self, overrides, ffn=None):
        trials.append(dict(overrides))
        return trying(self, overrides, ffn)

    def logged_measure(outputs, references):
        losses.append(measure(outputs, references))
        return losses[-1]

    monkeypatch.setattr(Runner, "trying", logged_trying)
    monkeypatch.setattr(planner.search, "rel_l1", logged_measure)
    plan = build_plan(pipe, request(pipe, delta=delta)).plan
    candidate_trials = iter(zip([t for t in trials if len(t) == 1], losses, strict=True))
    layers = plan.model.num_layers
    for t in range(1, plan.sampling.num_steps):
        for i in range(layers):
            kept = "full"
            for candidate in ("ast", "wars_asc", "wars", "asc"):
                overrides, loss = next(candidate_trials)
                assert overrides == {i: candidate}
                if loss <= (i + 1) / layers * (1 - delta):
                    kept = candidate
                    break
            assert plan.methods[t][i] == kept
    assert next(candidate_trials, None) is None
    assert {m for row in plan.methods for m in row} - {"full", "ast"}  # later candidates were reached


def step_outputs(pipe, req) -> list[torch.Tensor]:
    outputs = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
    try:
        fresh_generation(pipe, req)
    finally:
        hook.remove()
    return outputs


@pytest.mark.parametrize("name", ["pixart-sigma", "dit"])
def test_recorded_loss_is_the_relative_l1_against_full_attention(pipelines, name):
    pipe = pipelines[name]
    req = request(pipe, delta=0.95)
    plan = build_plan(pipe, req).plan
    full = step_outputs(pipe, req)[1]
    with runtime.apply(plan, pipe):
        planned = step_outputs(pipe, req)[1]
    # step 0 is full in both runs, so step 1 sees the same input: the loss of its last
    # decision compares the plan's step-1 output with full attention's.
    a, b = planned.double(), full.double()
    expected = ((a - b).abs() / (torch.maximum(a.abs(), b.abs()) + 1e-6)).mean().item()
    assert plan.methods[1] != ["full"] * plan.model.num_layers
    assert plan.losses[1][-1] == pytest.approx(expected, rel=1e-4)
