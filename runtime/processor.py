"""The attention processor that executes every DiTFastAttn method."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from runtime.kernels import full_attention
from runtime.schedule import COMPUTES_FULL
from schemas import PlanError

if TYPE_CHECKING:
    from runtime.runner import LayerStep, Runner


class FastAttnProcessor:
    """Self-attention processor of one layer (``attn1`` of block ``layer``).

    Methods, per DESIGN: ``full`` ordinary attention; ``wars`` window attention plus
    the layer's cached residual; ``ast`` the layer's most recent computed output,
    skipping q/k/v; ``asc`` full attention on the conditional rows, copied to the
    unconditional ones; ``wars_asc`` window plus residual on the conditional rows,
    copied. What to run and which caches to touch is a ``LayerStep`` made by the
    shared ``Runner`` (``Runner.layer_step``); ``execute`` runs it.

    Under ``torch.compile`` the processor is traced with its block: it reads only
    ``bound``, the ``LayerStep`` the transformer's (eager) pre-forward hook made for
    this step, whose method, cache policy and window are guards of the compiled graph,
    and whose ``LayerCache`` holds this layer's tensors. It never reads ``layer``
    there, so every layer with the same method and window runs the same graph. Run
    eagerly, it makes its ``LayerStep`` at call time, which is what the planner's trials
    and per-chunk states need.
    """

    def __init__(self, runner: Runner, layer: int) -> None:
        self.runner = runner
        self.layer = layer
        self.bound: LayerStep | None = None

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or hidden_states.ndim != 3:
            raise RuntimeError(
                f"layer {self.layer}: FastAttnProcessor handles self-attention on [batch, tokens, "
                "channels] inputs only"
            )
        todo = self.bound
        if not torch.compiler.is_compiling() or todo is None:
            todo = self.runner.layer_step(self.layer)
        return execute(self.runner, todo, attn, hidden_states, attention_mask)


def execute(
    runner: Runner,
    todo: LayerStep,
    attn: Any,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Run one layer-step: the single implementation of the five methods and their caches."""
    method, cache = todo.method, todo.cache
    rows_all, num_tokens = hidden_states.shape[0], hidden_states.shape[1]
    if todo.num_tokens is not None and num_tokens != todo.num_tokens:
        runner.check_tokens(todo.layer, num_tokens)
    if attention_mask is not None and method != "full":
        raise PlanError(
            f"$.methods[{todo.step}][{todo.layer}]: {method!r} cannot run with a self-attention mask"
        )
    if todo.writes:
        cache.rows, cache.tokens = rows_all, num_tokens

    if method == "ast":
        out = cache.output
        if out is None:
            raise PlanError(f"$.methods[{todo.step}][{todo.layer}]: 'ast' has no earlier output to reuse")
        return out

    shared = method in ("asc", "wars_asc")
    rows = runner.cond_rows(rows_all) if shared else slice(None)
    q, k, v = _project(attn, hidden_states[rows])
    if method in COMPUTES_FULL:
        o = full_attention(q, k, v, _prepare_mask(attn, attention_mask, q))
        if todo.refresh and todo.writes:
            cache.residual = o - todo.window(q, k, v)
            cache.residual_cond_only = shared
    else:
        residual = runner.residual_for(todo, rows, o_rows=q.shape[0])
        o = todo.window(q, k, v) + residual
    out = _output(attn, o, q.dtype)
    if shared:
        out = runner.copy_to_both_halves(out)
    if todo.writes:
        if todo.recorder is not None and method == "full" and attention_mask is None:
            _record(runner, todo, attn, q, k, v, o, out)
        if todo.keep:
            cache.output = out
    return out


@torch.compiler.disable
def _record(
    runner: Runner, todo: LayerStep, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    o: torch.Tensor, out: torch.Tensor,
) -> None:
    """Hand a full layer-step to the recorder (always eager: recording is a calibration tool)."""
    todo.recorder.record(runner, todo.layer, q, k, v, o, out, lambda x: _output(attn, x, q.dtype))


def _project(attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as ``[batch, heads, tokens, head_dim]``, as diffusers' own processor makes them."""
    batch = x.shape[0]
    query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def _prepare_mask(attn: Any, mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    batch, tokens = q.shape[0], q.shape[2]
    mask = attn.prepare_attention_mask(mask, tokens, batch)
    return mask.view(batch, attn.heads, -1, mask.shape[-1])


def _output(attn: Any, o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    batch = o.shape[0]
    out = o.transpose(1, 2).reshape(batch, -1, attn.heads * o.shape[-1]).to(dtype)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    return out / attn.rescale_output_factor
