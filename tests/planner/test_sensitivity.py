"""Step weights: the replayed, perturbed generations against plain ones written out independently."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from planner.embedded import load_embedded
from planner.sensitivity import DEFAULT_SCALE, step_weights
from tests.planner import test_mmdit
from tests.planner.pipelines import fresh_generation, request

STEPS = 4


def _sample(output):
    return output.sample if hasattr(output, "sample") else output[0]


def hooked(pipe, generate: Callable[[], torch.Tensor], hook) -> torch.Tensor:
    handle = pipe.transformer.register_forward_hook(hook)
    try:
        return generate()
    finally:
        handle.remove()


def norm(xs: list[torch.Tensor]) -> float:
    return sum(float(x.double().pow(2).sum()) for x in xs) ** 0.5


def independent_weights(pipe, generate: Callable[[], torch.Tensor], per_step: int) -> list[float]:
    """Each step's weight by plain generations: every transformer call's output recorded, then
    one generation per step with that step's calls moved by forward hooks (nothing replayed)."""
    outputs: list[torch.Tensor] = []
    reference = hooked(pipe, generate, lambda m, a, out: outputs.append(_sample(out).clone()))
    raw = []
    for t in range(1, len(outputs) // per_step):
        mine = range(t * per_step, (t + 1) * per_step)
        deltas = {c: DEFAULT_SCALE * (outputs[c - per_step] - outputs[c]) for c in mine}
        calls = iter(range(len(outputs)))

        def move(module, args, output, deltas=deltas, calls=calls):
            index = next(calls)
            if index not in deltas:
                return None
            moved = _sample(output) + deltas[index]
            return type(output)(sample=moved) if hasattr(output, "sample") else (moved, *output[1:])

        moved = hooked(pipe, generate, move)
        assert norm([moved - reference]) > 0
        raw.append(norm([moved - reference]) / norm(list(deltas.values())) * norm([outputs[c] for c in mine]))
    mean = sum(raw) / len(raw)
    return [w / mean for w in raw]


@pytest.mark.parametrize("name", ["pixart-sigma", "dit"])
def test_weights_are_the_final_change_per_relative_output_error(pipelines, name):
    pipe = pipelines[name]
    req = request(pipe, steps=STEPS)
    weights = step_weights(pipe, req)
    assert weights[0] is None and len(weights) == STEPS
    assert sum(weights[1:]) / (STEPS - 1) == pytest.approx(1.0)
    expected = independent_weights(pipe, lambda: fresh_generation(pipe, req), 1)
    assert weights[1:] == pytest.approx(expected, rel=1e-6)


def test_with_cfg_in_separate_calls_both_calls_of_a_step_move():
    """flux-digits (true CFG, two calls a step): each call's output moves along its own previous one."""
    pipe = load_embedded("flux-digits")
    req = test_mmdit.request("flux-digits")
    weights = step_weights(pipe, req)
    assert len(weights) == test_mmdit.STEPS and weights[0] is None
    expected = independent_weights(pipe, lambda: test_mmdit.fresh_generation(pipe, "flux-digits", req), 2)
    assert weights[1:] == pytest.approx(expected, rel=1e-6)
