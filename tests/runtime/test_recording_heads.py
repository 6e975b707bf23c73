"""Recording the per-head measures: ``head_ast`` and ``head_wars`` (schemas/profile.py, version 5)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import runtime
from runtime import Recorder
from tests.plans import all_full, plan_for
from tests.runtime.conftest import float64_model, run_steps

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH, HEADS, TOKENS, DIM, STEPS = 4, 3, 5, 2, 4


class FakeRunner:
    """What ``Recorder.record`` reads of a runner: the step and call, the CFG mode and the window."""

    def __init__(self, cfg_mode: str = "none") -> None:
        self.cfg_mode = cfg_mode
        self.state = SimpleNamespace(step=0, call=0)

    @staticmethod
    def window_attention(q, k, v, layer):
        return torch.tanh(q) * v + 0.1 * k  # any function of q/k/v stands for the window here

    @staticmethod
    def coefficient(step: int, a: int, b: int) -> float:
        return (step - a) / (a - b)

    @staticmethod
    def cond_rows(batch: int) -> slice:
        return slice(batch // 2, batch)

    @staticmethod
    def copy_to_both_halves(x):
        return torch.cat([x, x], dim=0)


def projection(seed: int):
    """An affine output projection that joins the heads, as the adapters do."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(HEADS * DIM, 7, generator=generator, dtype=torch.float64)
    bias = torch.randn(7, generator=generator, dtype=torch.float64)
    return lambda o: o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1) @ weight + bias


def inputs(steps: int, rows: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """q, k, v and the per-head output of every step (the output need not be attention here)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (rows, HEADS, TOKENS, DIM)
    return [tuple(torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(4)) for _ in range(steps)]


def expected(steps: list, project, layer_calls: list[list]) -> dict[tuple[str, int, int], float]:
    """Float64 direct definitions, summed over calls/chunks: ``(measure, step, head) -> distance``."""
    squared: dict[tuple[str, int, int], float] = {}
    reference = [0.0] * len(steps)
    for data in layer_calls:
        for t, (q, k, v, o) in enumerate(data):
            out = project(o)
            reference[t] += float((out**2).sum())
            if t == 0:
                continue
            q0, k0, v0, o0 = data[t - 1]
            residual = o0 - FakeRunner.window_attention(q0, k0, v0, 0)
            window = FakeRunner.window_attention(q, k, v, 0)
            for h in range(HEADS):
                for measure, value in (("head_ast", o0[:, h]), ("head_wars", window[:, h] + residual[:, h])):
                    mixed = o.clone()
                    mixed[:, h] = value
                    key = (measure, t, h)
                    squared[key] = squared.get(key, 0.0) + float(((project(mixed) - out) ** 2).sum())
    return {key: math.sqrt(value / reference[key[1]]) for key, value in squared.items()}


def record(recorder: Recorder, runner: FakeRunner, layer: int, data: list, project, call: int = 0) -> None:
    for t, (q, k, v, o) in enumerate(data):
        runner.state.step, runner.state.call = t, call
        recorder.record(runner, layer, q, k, v, o, project(o), project)


def assert_layer_matches(grids: dict, want: dict, layer: int) -> None:
    """``head_ast`` and ``head_wars`` of ``layer`` at every step after the first equal ``want``."""
    for measure in ("head_ast", "head_wars"):
        for t in range(1, STEPS):
            assert grids[measure][t][layer] == pytest.approx([want[measure, t, h] for h in range(HEADS)], rel=1e-12)


@pytest.mark.parametrize("cfg_mode", ["none", "batched"])
def test_head_measures_are_their_definitions(cfg_mode):
    project = projection(0)
    data = inputs(STEPS, BATCH, 1)
    recorder = Recorder(lags=2, heads=True)
    runner = FakeRunner(cfg_mode)
    record(recorder, runner, 1, data, project)
    want = expected(list(range(STEPS)), project, [data])
    grids = recorder.grids(STEPS, 2)
    assert recorder.num_heads == HEADS
    for measure in ("head_ast", "head_wars"):
        assert len(grids[measure]) == STEPS and all(len(row) == 2 for row in grids[measure])
        assert grids[measure][0] == [[None] * HEADS] * 2  # step 0: nothing earlier
        assert grids[measure][2][0] == [None] * HEADS  # layer 0 was not recorded
        assert all(x > 0 for t in range(1, STEPS) for x in grids[measure][t][1])
    assert_layer_matches(grids, want, 1)


def test_chunks_merge_and_ranks_reduce_to_the_whole_batch():
    project = projection(2)
    chunks = [inputs(STEPS, 2, seed) for seed in (3, 4)]
    recorders = []
    for data in chunks:
        recorders.append(Recorder(lags=1, heads=True))
        record(recorders[-1], FakeRunner(), 0, data, project)
    total = Recorder(lags=1, heads=True)
    for recorder in recorders:
        total.merge(recorder)
    total.reduce(lambda values: list(values))
    whole = [tuple(torch.cat([a, b]) for a, b in zip(x, y)) for x, y in zip(*chunks)]
    want = expected(list(range(STEPS)), project, [whole])
    grids = total.grids(STEPS, 1)
    assert_layer_matches(grids, want, 0)


def test_separate_cfg_calls_keep_their_own_history():
    project = projection(5)
    calls = [inputs(STEPS, 2, seed) for seed in (6, 7)]
    recorder = Recorder(lags=1, heads=True)
    runner = FakeRunner("separate")
    for t in range(STEPS):  # interleaved as a separate-CFG generation runs them
        for call, data in enumerate(calls):
            q, k, v, o = data[t]
            runner.state.step, runner.state.call = t, call
            recorder.record(runner, 0, q, k, v, o, project(o), project)
    want = expected(list(range(STEPS)), project, calls)
    grids = recorder.grids(STEPS, 1)
    assert_layer_matches(grids, want, 0)


def test_a_step_not_recorded_just_before_gives_no_head_measure_and_a_new_generation_restarts():
    project = projection(8)
    data = inputs(STEPS, 2, 9)
    recorder = Recorder(lags=3, heads=True)
    runner = FakeRunner()
    for t in (0, 2, 3):
        q, k, v, o = data[t]
        runner.state.step = t
        recorder.record(runner, 0, q, k, v, o, project(o), project)
    assert recorder.distance("head_ast", 2, 0, 0) is None
    assert recorder.distance("head_ast", 3, 0, 0) is not None
    assert recorder.distance("ast", 2, 0, 2) is not None  # the lag measures still see step 0
    before = recorder.squared[("head_ast", 3, 0, 0)]
    for t in (0, 1):  # a second generation: step 1 reads its own step 0
        q, k, v, o = data[t]
        runner.state.step = t
        recorder.record(runner, 0, q, k, v, o, project(o), project)
    assert recorder.squared[("head_ast", 3, 0, 0)] == before
    assert recorder.distance("head_ast", 1, 0, 0) is not None


def test_a_recorder_measures_heads_only_when_asked():
    project = projection(10)
    recorder = Recorder(lags=1)
    record(recorder, FakeRunner(), 0, inputs(2, 2, 11), project)
    assert recorder.distance("ast", 1, 0, 1) is not None
    assert recorder.grids(2, 1)["head_ast"] is None and recorder.num_heads is None


def test_without_any_recorded_layer_there_are_no_head_grids():
    grids = Recorder(lags=1, heads=True).grids(2, 1)
    assert grids["head_ast"] is None and grids["head_wars"] is None


# ---------------------------------------------------------------------------
# on a tiny model: what a per-head cell gives as the runtime executes it

ORDERS = {"pixart": "uncond_cond", "dit": "cond_uncond"}
LAYERS, MODEL_STEPS, WINDOW = 3, 4, 8


def layer_outputs(model, kind, methods, heads=None, recorder=None) -> list[list[torch.Tensor]]:
    plan = plan_for(model, methods, window=WINDOW, cfg_order=ORDERS[kind], heads=heads)
    seen: list[torch.Tensor] = []
    modules = [block.attn1 for block in model.transformer_blocks]
    hooks = [m.register_forward_hook(lambda module, args, out: seen.append(out.clone())) for m in modules]
    try:
        with runtime.apply(plan, model) as handle:
            handle.runner.recorder = recorder
            run_steps(model, kind, len(methods), order=ORDERS[kind])
    finally:
        for hook in hooks:
            hook.remove()
    return [seen[t * LAYERS : (t + 1) * LAYERS] for t in range(len(methods))]


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_head_distances_are_those_of_per_head_cells_as_the_runtime_executes_them(kind):
    """``head_ast``/``head_wars`` of head ``h`` at ``(t, i)`` equal the distance of a plan whose
    cell ``(t, i)`` runs head ``h`` with ``a``/``w`` and the others ``f``, after all-full steps."""
    model = float64_model(kind)
    heads = model.transformer_blocks[0].attn1.heads
    t, layer = MODEL_STEPS - 1, 1
    recorder = Recorder(lags=2, heads=True)
    reference = layer_outputs(model, kind, all_full(MODEL_STEPS, LAYERS), recorder=recorder)[t][layer]
    assert recorder.num_heads == heads
    grids = recorder.grids(MODEL_STEPS, LAYERS)
    for letter, measure in (("a", "head_ast"), ("w", "head_wars")):
        for h in range(heads):
            letters = "".join(letter if g == h else "f" for g in range(heads))
            methods = all_full(MODEL_STEPS, LAYERS)
            methods[t][layer] = "wars"
            got = layer_outputs(model, kind, methods, heads={(t, layer): letters})[t][layer]
            distance = math.sqrt(float(((got - reference) ** 2).sum()) / float((reference**2).sum()))
            assert distance > 0
            assert grids[measure][t][layer][h] == pytest.approx(distance, rel=1e-9, abs=1e-12)
