"""The attention processor that executes every DiTFastAttn method."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from runtime.kernels import full_attention
from schemas import PlanError

if TYPE_CHECKING:
    from runtime.runner import Runner


class FastAttnProcessor:
    """Self-attention processor of one layer (``attn1`` of block ``layer``).

    Methods, per DESIGN: ``full`` ordinary attention; ``wars`` window attention plus
    the layer's cached residual; ``ast`` the layer's most recent computed output,
    skipping q/k/v; ``asc`` full attention on the conditional rows, copied to the
    unconditional ones; ``wars_asc`` window plus residual on the conditional rows,
    copied. What to run and which caches to touch comes from the shared ``Runner``.

    Under ``torch.compile`` the processor runs eagerly (a graph break), so choosing a
    method per step never triggers a recompile of the surrounding transformer.
    """

    def __init__(self, runner: Runner, layer: int) -> None:
        self.runner = runner
        self.layer = layer

    @torch.compiler.disable
    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        runner, layer = self.runner, self.layer
        if encoder_hidden_states is not None or hidden_states.ndim != 3:
            raise RuntimeError(
                f"layer {layer}: FastAttnProcessor handles self-attention on [batch, tokens, "
                "channels] inputs only"
            )
        step = runner.state.step
        method = runner.method(layer)
        num_tokens = hidden_states.shape[1]
        runner.check_tokens(layer, num_tokens)
        if attention_mask is not None and method != "full":
            raise PlanError(
                f"$.methods[{step}][{layer}]: {method!r} cannot run with a self-attention mask"
            )
        state, writes = runner.state, not runner.trial
        refresh = runner.schedule.refreshes_residual(step, layer)
        rows_all, window = hidden_states.shape[0], runner.window_of(layer)

        if method == "ast":
            out = state.outputs.get(layer)
            if out is None:
                raise PlanError(f"$.methods[{step}][{layer}]: 'ast' has no earlier output to reuse")
            if writes:
                state.count("ast", rows_all, num_tokens, window, False)
            return out

        shared = method in ("asc", "wars_asc")
        rows = runner.cond_rows(hidden_states.shape[0]) if shared else slice(None)
        q, k, v = _project(attn, hidden_states[rows])
        if method in ("full", "asc"):
            o = full_attention(q, k, v, _prepare_mask(attn, attention_mask, q))
            if refresh and writes:
                residual = o - runner.window_attention(q, k, v, layer)
                runner.store_residual(layer, residual, cond_only=shared)
        else:
            residual = runner.residual_for(layer, rows, o_rows=q.shape[0])
            o = runner.window_attention(q, k, v, layer) + residual
        out = _output(attn, o, q.dtype)
        if shared:
            out = runner.copy_to_both_halves(out)
        if writes:
            if method == "full" and runner.recorder is not None and attention_mask is None:
                runner.recorder.record(runner, layer, q, k, v, o, out, lambda x: _output(attn, x, q.dtype))
            refreshed = refresh and method in ("full", "asc")
            state.count(method, rows_all, num_tokens, window, refreshed)
            if runner.schedule.keeps_output(step, layer):
                state.outputs[layer] = out
                state.note_cache()
        return out


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
