"""Feed-forward reuse: each feed-forward layer computes, reuses or forecasts its output per step.

A plan's ``ffn[t][j]`` is the method of feed-forward layer ``j`` at step ``t``:
``compute`` runs the module; ``reuse`` returns its last computed output; ``forecast``
extrapolates its last two computed outputs to this step's timestep, first order, exactly
as an attention ``forecast`` does (``Runner.forecast_coefficient``). Outputs are kept only
where a later step reads them (the attention caching rules, ``Schedule``, applied to the
grid read as ``full``/``ast``/``forecast``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from runtime.adapters import extrapolate
from schemas import PlanError

if TYPE_CHECKING:
    from runtime.runner import Runner


def feed_forward_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks' feed-forward modules in the order the model runs them: each block's ``ff``
    and then, on MMDiT blocks, its text stream's ``ff_context``; Latte alternates spatial and
    temporal blocks. FLUX's single-stream blocks have none (their MLP runs fused with attention).
    """
    temporal = getattr(model, "temporal_transformer_blocks", None)
    if temporal is not None:
        blocks = [b for pair in zip(model.transformer_blocks, temporal) for b in pair]
    else:
        blocks = list(model.transformer_blocks)
    found = []
    for block in blocks:
        for name in ("ff", "ff_context"):
            module = getattr(block, name, None)
            if isinstance(module, torch.nn.Module):
                found.append(module)
    return found


class FeedForwardStep:
    """Stands in for one feed-forward module's ``forward`` while a plan with ``$.ffn`` is applied."""

    def __init__(self, runner: Runner, index: int, original: Any) -> None:
        self.runner = runner
        self.index = index
        self.original = original

    @torch.compiler.disable
    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        runner, j = self.runner, self.index
        state = runner.state
        step = state.step
        method = runner.ffn_method(j)
        cache = state.ffn_cache(j)
        if not runner.trial:
            state.stats.count_ffn(method, hidden_states.shape[:-1].numel(), first_call=state.call == 0)
        if method == "compute":
            out = self.original(hidden_states, *args, **kwargs)
            if not runner.trial and runner.ffn_schedule.keeps_output(step, j):
                cache.keep(out, step)
            if not runner.trial and runner.recorder is not None:
                runner.recorder.record_ffn(runner, j, out)
            return out
        last = cache.output
        c = runner.forecast_coefficient(step, cache) if method == "forecast" else None
        if last is None or (method == "forecast" and c is None):
            raise PlanError(f"$.ffn[{step}][{j}]: {method!r} has no earlier computed output to read")
        return last if method == "reuse" else extrapolate(last, cache.previous, c)


def install_feed_forwards(runner: Runner, model: torch.nn.Module, width: int) -> list[tuple[torch.nn.Module, Any]]:
    """Put a ``FeedForwardStep`` on each feed-forward module; ``(module, previous forward)`` pairs to undo it."""
    modules = feed_forward_layers(model)
    if len(modules) != width:
        raise PlanError(f"$.ffn[0]: plan has {width} feed-forward layers, the model has {len(modules)}")
    undo = []
    for j, module in enumerate(modules):
        undo.append((module, vars(module).get("forward")))
        module.forward = FeedForwardStep(runner, j, module.forward)
    return undo


def remove_feed_forwards(undo: list[tuple[torch.nn.Module, Any]]) -> None:
    for module, previous in undo:
        if previous is None:
            vars(module).pop("forward", None)
        else:
            module.forward = previous
