"""The attention processor that executes every DiTFastAttn method."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from runtime.adapters import SELF, Adapter, AttnCall, Outputs, extrapolate, joined
from runtime.kernels import full_attention
from runtime.schedule import COMPUTES_FULL
from schemas import PlanError
from schemas.plan import REUSES_OUTPUT

if TYPE_CHECKING:
    from runtime.runner import LayerStep, Runner

SHARED = ("asc", "wars_asc")


class FastAttnProcessor:
    """Self-attention processor of one layer (e.g. ``attn1`` of block ``layer``).

    Methods, per DESIGN: ``full`` ordinary attention; ``wars`` window attention plus
    the layer's cached residual; ``ast`` the layer's most recent computed output,
    skipping q/k/v; ``asc`` full attention on the conditional rows, copied to the
    unconditional ones; ``wars_asc`` window plus residual on the conditional rows,
    copied; ``forecast`` the layer's last two computed outputs extrapolated, first order
    in the timestep, to this step, skipping q/k/v. What to run and which caches to touch
    is a ``LayerStep`` made by the shared ``Runner`` (``Runner.layer_step``); ``execute`` runs it. ``adapter`` says how
    the layer's processor family makes q/k/v and its outputs (``runtime/adapters.py``).

    Under ``torch.compile`` the processor is traced with its block: it reads only
    ``bound``, the ``LayerStep`` the transformer's (eager) pre-forward hook made for
    this step, whose method, cache policy and window are guards of the compiled graph,
    and whose ``LayerCache`` holds this layer's tensors. It never reads ``layer``
    there, so every layer with the same method and window runs the same graph. Run
    eagerly, it makes its ``LayerStep`` at call time, which is what the planner's trials
    and per-chunk states need. A per-head cell (a ``wars`` cell with ``LayerStep.heads``)
    runs each group of heads with its method (``_per_head``).
    """

    def __init__(self, runner: Runner, layer: int, adapter: Adapter = SELF) -> None:
        self.runner = runner
        self.layer = layer
        self.adapter = adapter
        self.bound: LayerStep | None = None

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        **kwargs: Any,
    ) -> Outputs:
        todo = self.bound
        if not torch.compiler.is_compiling() or todo is None:
            todo = self.runner.layer_step(self.layer)
        call = AttnCall(hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return execute(self.runner, todo, self.adapter, attn, call)


# Devices where a refresh runs as one merged pass (``runtime/merge.py``: the window and its
# complement, merged by log-sum-exp) rather than full attention plus the window: where it was
# measured faster (``python -m bench.attention --refresh``; on an H200 it was 1.9-8x slower).
MERGED_REFRESH = ("cpu",)


def execute(runner: Runner, todo: LayerStep, adapter: Adapter, attn: Any, call: AttnCall) -> Outputs:
    """Run one layer-step: the single implementation of the six methods and their caches.

    With CFG batched, ``asc``/``wars_asc`` compute the conditional rows and copy them to
    both halves; with CFG in separate calls the conditional call computes its rows and
    keeps its output, which the unconditional call of the same step returns.
    """
    method, cache = todo.method, todo.cache
    try:
        rows_all, num_tokens, text = adapter.sizes(call, todo.text_tokens)
    except RuntimeError as exc:
        raise RuntimeError(f"layer {todo.layer}: {exc}") from None
    if (todo.num_tokens is not None and num_tokens != todo.num_tokens) or text != todo.text_tokens:
        runner.check_tokens(todo.layer, num_tokens, text)
    if call.attention_mask is not None and method != "full" and adapter.uses_mask:
        raise PlanError(
            f"$.methods[{todo.step}][{todo.layer}]: {method!r} cannot run with a self-attention mask"
        )
    if todo.writes:
        cache.rows, cache.tokens = rows_all, num_tokens

    if method in REUSES_OUTPUT:
        out = cache.output
        if out is None:
            raise PlanError(f"$.methods[{todo.step}][{todo.layer}]: {method!r} has no earlier output to reuse")
        return out if method == "ast" else _forecast(todo, out, cache.previous)
    shared = method in SHARED
    if shared and todo.second:
        return _from_conditional_call(todo)

    batched = shared and runner.cfg_mode == "batched"
    rows = runner.cond_rows(rows_all) if batched else slice(None)
    q, k, v = adapter.project(attn, call, rows, text)
    if method in COMPUTES_FULL:
        refresh = todo.refresh and todo.writes
        mask = adapter.mask(attn, call, q)
        merged = (
            refresh
            and mask is None
            and todo.merged_refresh is not None
            and q.device.type in MERGED_REFRESH
            and not torch.compiler.is_compiling()  # its gathers and buffers would break the graph
        )
        if merged:
            o, window = todo.merged_refresh(q, k, v)
        else:
            o = full_attention(q, k, v, mask)
            window = todo.window(q, k, v) if refresh else None
        if refresh:
            cache.residual = o - window
            cache.residual_cond_only = batched
            cache.merged_refresh = merged
    elif todo.heads is not None:
        o = _per_head(runner, todo, q, k, v)
    else:
        residual = runner.residual_for(todo, rows, o_rows=q.shape[0])
        o = todo.window(q, k, v) + residual
    if todo.writes and todo.keep_heads:
        cache.head_output = runner.copy_to_both_halves(o) if batched else o
    out = adapter.output(attn, o, call, text, q.dtype)
    if batched:
        out = runner.copy_to_both_halves(out)
    if todo.writes:
        if todo.recorder is not None and method == "full" and call.attention_mask is None:
            _record(runner, todo, adapter, attn, call, q, k, v, o, out)
        if todo.keep:
            cache.keep(out, todo.step)
    if shared and runner.cfg_mode == "separate":  # this step's unconditional call (or trial) returns it
        cache.shared = out
    return out


def _heads_index(heads: tuple[int, ...]) -> slice | list[int]:
    """A group of heads as a slice where contiguous (a view, no copy), else a list."""
    if heads[-1] - heads[0] == len(heads) - 1:
        return slice(heads[0], heads[-1] + 1)
    return list(heads)


def _per_head(runner: Runner, todo: LayerStep, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A per-head cell's per-head output: each group of heads runs its method together,
    ``full`` heads full attention, ``wars`` heads the window plus their part of the layer's
    residual, ``ast`` heads their part of the layer's last computed per-head output."""
    full, wars, ast = todo.heads
    o = q.new_empty(*q.shape[:3], v.shape[-1])
    if full:
        h = _heads_index(full)
        o[:, h] = full_attention(q[:, h], k[:, h], v[:, h], None)
    if wars:
        h = _heads_index(wars)
        residual = runner.residual_for(todo, slice(None), o_rows=q.shape[0])
        o[:, h] = todo.window(q[:, h], k[:, h], v[:, h]) + residual[:, h]
    if ast:
        prior = todo.cache.head_output
        if prior is None:
            raise PlanError(f"$.heads: step {todo.step}, layer {todo.layer} has no earlier per-head output for its 'a' heads")
        h = _heads_index(ast)
        o[:, h] = prior[:, h]
    return o


def _from_conditional_call(todo: LayerStep) -> Outputs:
    """``asc``/``wars_asc`` in the unconditional call of a separate-CFG step: the conditional
    call's output; an ``asc`` refresh makes the conditional residual this call's too."""
    partner = todo.partner
    out = partner.shared if partner is not None else None
    if out is None:
        raise PlanError(
            f"$.methods[{todo.step}][{todo.layer}]: {todo.method!r} has no conditional call's output "
            "at this step to share"
        )
    if todo.writes:
        cache = todo.cache
        partner.shared = None
        if todo.refresh:
            cache.residual, cache.residual_cond_only = partner.residual, False
        if todo.keep_heads:
            cache.head_output = partner.head_output
        if todo.keep:
            cache.keep(out, todo.step)
    return out


def _forecast(todo: LayerStep, last: Outputs, before: Outputs | None) -> Outputs:
    """The first-order extrapolation of the layer's two kept outputs (``Runner.forecast_coefficient``)."""
    if before is None or todo.coefficient is None:
        raise PlanError(
            f"$.methods[{todo.step}][{todo.layer}]: 'forecast' needs the layer's two earlier computed outputs"
        )
    return extrapolate(last, before, todo.coefficient)


@torch.compiler.disable
def _record(
    runner: Runner, todo: LayerStep, adapter: Adapter, attn: Any, call: AttnCall,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, out: Outputs,
) -> None:
    """Hand a full layer-step to the recorder (always eager: recording is a calibration tool)."""
    project = lambda x: joined(adapter.output(attn, x, call, todo.text_tokens, q.dtype))  # noqa: E731
    todo.recorder.record(runner, todo.layer, q, k, v, o, joined(out), project)
