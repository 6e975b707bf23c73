"""Per-family adapters: how an attention processor family makes q/k/v and its outputs.

The executor (``runtime/processor.py``) owns every method, cache and CFG rule; an adapter
only says, for one family of diffusers attention processors, how a call's inputs become
per-head ``q, k, v`` (``[batch, heads, tokens, head_dim]``) over the layer's attention
sequence, and how the per-head output ``o`` becomes what the processor returns. Adapters
are stateless and registered by the class name of the processor they stand in for
(``ADAPTERS``), so the executor never asks which family it runs.

Joint (MMDiT) layers attend over image and text tokens together; ``text_first`` says
where the text sits in that sequence: after the image tokens (SD3) or before (FLUX).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from schemas import PlanError

Outputs = torch.Tensor | tuple[torch.Tensor, ...]
QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class AttnCall:
    """One call of an attention module, with the inputs its block passed."""

    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    rotary: Any = None  # FLUX's ``image_rotary_emb``


def map_outputs(fn: Callable[[torch.Tensor], torch.Tensor], out: Outputs) -> Outputs:
    """``fn`` applied to an output, or to each of a joint layer's outputs."""
    return tuple(fn(x) for x in out) if isinstance(out, tuple) else fn(out)


def extrapolate(last: Outputs, before: Outputs, c: torch.Tensor) -> Outputs:
    """``last + (last - before) × c``, per output of a joint layer (``None`` outputs stay ``None``)."""
    if isinstance(last, tuple):
        return tuple(None if a is None else a + (a - b) * c for a, b in zip(last, before))
    return last + (last - before) * c


def joined(out: Outputs) -> torch.Tensor:
    """A layer's outputs as one tensor (a joint layer's along the tokens) for measurements."""
    return torch.cat(out, dim=1) if isinstance(out, tuple) else out


class Adapter:
    """One processor family. ``text`` is the plan's text-token count of the layer."""

    text_first = False
    uses_mask = True  # applies an attention mask (which only ``full`` may run with)

    def check(self, attn: Any, layer: int) -> None:
        """Refuse (``PlanError``) a module this family's executor path would not reproduce."""

    def sizes(self, call: AttnCall, text: int) -> tuple[int, int, int]:
        """(rows, image tokens, text tokens) of the call."""
        raise NotImplementedError

    def project(self, attn: Any, call: AttnCall, rows: slice, text: int) -> QKV:
        """q, k, v of the batch rows ``rows`` over the layer's attention sequence."""
        raise NotImplementedError

    def mask(self, attn: Any, call: AttnCall, q: torch.Tensor) -> torch.Tensor | None:
        """The attention mask full attention applies, as the family applies it."""
        return None

    def output(self, attn: Any, o: torch.Tensor, call: AttnCall, text: int, dtype: torch.dtype) -> Outputs:
        """What the processor returns for the per-head output ``o``."""
        raise NotImplementedError


def _heads(attn: Any, x: torch.Tensor) -> QKV:
    """q, k, v of ``x`` as ``[batch, heads, tokens, head_dim]``, with the module's q/k norms."""
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


class SelfAttention(Adapter):
    """diffusers' ``AttnProcessor2_0`` on a plain self-attention module (PixArt, DiT, Latte ``attn1``)."""


    def check(self, attn: Any, layer: int) -> None:
        if attn.is_cross_attention or attn.residual_connection or attn.spatial_norm is not None:
            raise PlanError(f"layer {layer}: attn1 is not a plain self-attention module")
        if attn.group_norm is not None:
            raise PlanError(f"layer {layer}: attn1 with group norm is not supported")

    def sizes(self, call: AttnCall, text: int) -> tuple[int, int, int]:
        x = call.hidden_states
        if call.encoder_hidden_states is not None or x.ndim != 3:
            raise RuntimeError(
                "FastAttnProcessor handles self-attention on [batch, tokens, channels] inputs only"
            )
        return x.shape[0], x.shape[1], 0

    def project(self, attn: Any, call: AttnCall, rows: slice, text: int) -> QKV:
        return _heads(attn, call.hidden_states[rows])

    def mask(self, attn: Any, call: AttnCall, q: torch.Tensor) -> torch.Tensor | None:
        mask = call.attention_mask
        if mask is None:
            return None
        batch, tokens = q.shape[0], q.shape[2]
        mask = attn.prepare_attention_mask(mask, tokens, batch)
        return mask.view(batch, attn.heads, -1, mask.shape[-1])

    def output(self, attn: Any, o: torch.Tensor, call: AttnCall, text: int, dtype: torch.dtype) -> Outputs:
        batch = o.shape[0]
        out = o.transpose(1, 2).reshape(batch, -1, attn.heads * o.shape[-1]).to(dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


class JointAttention(Adapter):
    """diffusers' ``JointAttnProcessor2_0`` (SD3/SD3.5 blocks): image tokens, then text tokens.

    With ``encoder_hidden_states`` it returns (image output, text output), the text one
    through ``to_add_out`` unless the module is ``context_pre_only``; without them (the
    MMDiT-X ``attn2``) it is plain self-attention over the image tokens. Like diffusers'
    processor, it ignores an attention mask.
    """

    uses_mask = False

    def sizes(self, call: AttnCall, text: int) -> tuple[int, int, int]:
        x, context = call.hidden_states, call.encoder_hidden_states
        return x.shape[0], x.shape[1], 0 if context is None else context.shape[1]

    def project(self, attn: Any, call: AttnCall, rows: slice, text: int) -> QKV:
        q, k, v = _heads(attn, call.hidden_states[rows])
        context = call.encoder_hidden_states
        if context is None:
            return q, k, v
        context = context[rows]
        batch, heads, head_dim = q.shape[0], attn.heads, q.shape[-1]
        cq, ck, cv = (
            proj(context).view(batch, -1, heads, head_dim).transpose(1, 2)
            for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        return torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)

    def output(self, attn: Any, o: torch.Tensor, call: AttnCall, text: int, dtype: torch.dtype) -> Outputs:
        batch = o.shape[0]
        out = o.transpose(1, 2).reshape(batch, -1, attn.heads * o.shape[-1]).to(dtype)
        if call.encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        image_tokens = call.hidden_states.shape[1]
        image, context = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


def rotate_pairs(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """FLUX's rotary embedding on ``x`` ``[batch, tokens, heads, head_dim]``: each channel pair
    (2i, 2i+1) turned by the angle whose cosine and sine ``rotary`` holds per token and channel
    (``[tokens, head_dim]``, each value repeated for both channels of its pair), in float32."""
    cos, sin = (r.to(x.device)[None, :, None, :] for r in rotary)
    even, odd = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    turned = torch.stack([-odd, even], dim=-1).flatten(-2)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


class FluxAttention(Adapter):
    """diffusers' ``FluxAttnProcessor``: text tokens, then image tokens, rotary embedding on q/k.

    Double-stream blocks pass the text as ``encoder_hidden_states`` and get (image output,
    text output); single-stream blocks pass the joint sequence as ``hidden_states`` (its
    first ``text`` tokens are the text, from the plan) and get the per-head output with
    the heads flattened: that module has no output projection.
    """

    text_first = True

    def sizes(self, call: AttnCall, text: int) -> tuple[int, int, int]:
        x, context = call.hidden_states, call.encoder_hidden_states
        if context is not None:
            return x.shape[0], x.shape[1], context.shape[1]
        return x.shape[0], x.shape[1] - text, text

    def project(self, attn: Any, call: AttnCall, rows: slice, text: int) -> QKV:
        x = call.hidden_states[rows]
        q, k, v = _flux_qkv(attn, x, attn.to_qkv if attn.fused_projections else None, attn.to_q, attn.to_k, attn.to_v)
        q, k = attn.norm_q(q), attn.norm_k(k)
        context = call.encoder_hidden_states
        if attn.added_kv_proj_dim is not None and context is not None:
            fused = getattr(attn, "to_added_qkv", None) if attn.fused_projections else None
            cq, ck, cv = _flux_qkv(attn, context[rows], fused, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
        if call.rotary is not None:
            q, k = rotate_pairs(q, call.rotary), rotate_pairs(k, call.rotary)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def mask(self, attn: Any, call: AttnCall, q: torch.Tensor) -> torch.Tensor | None:
        mask = call.attention_mask
        if mask is not None and mask.ndim == 2 and mask.shape[0] == q.shape[0] and mask.shape[1] == q.shape[2]:
            mask = mask[:, None, None, :]  # [batch, keys], as diffusers' native backend reads it
        return mask

    def output(self, attn: Any, o: torch.Tensor, call: AttnCall, text: int, dtype: torch.dtype) -> Outputs:
        out = o.transpose(1, 2).flatten(2, 3).to(dtype)
        context = call.encoder_hidden_states
        if context is None:
            return out
        context_out, image = out.split_with_sizes([context.shape[1], out.shape[1] - context.shape[1]], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(context_out.contiguous())


def _flux_qkv(attn: Any, x: torch.Tensor, fused: Any, to_q: Any, to_k: Any, to_v: Any) -> QKV:
    """q, k, v as ``[batch, tokens, heads, head_dim]``, from the fused projection when there is one."""
    q, k, v = fused(x).chunk(3, dim=-1) if fused is not None else (to_q(x), to_k(x), to_v(x))
    return tuple(t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))  # type: ignore[return-value]


SELF, JOINT, FLUX = SelfAttention(), JointAttention(), FluxAttention()

ADAPTERS: dict[str, Adapter] = {
    "AttnProcessor2_0": SELF,
    "AttnProcessor": SELF,
    "JointAttnProcessor2_0": JOINT,
    "FluxAttnProcessor": FLUX,
}


def adapter_for(attn: Any, layer: int) -> Adapter:
    """The adapter of ``attn``'s processor family, checked against the module."""
    name = type(attn.processor).__name__
    adapter = ADAPTERS.get(name)
    if adapter is None:
        known = ", ".join(ADAPTERS)
        raise PlanError(f"layer {layer}: no adapter for the attention processor {name}; supported: {known}")
    adapter.check(attn, layer)
    return adapter
