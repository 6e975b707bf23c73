"""An independent float64 reference of DESIGN §1 and §6 on MMDiTs (SD3, FLUX), for the tests.

Its own projections of each processor family (diffusers' code read, not the runtime's
adapters), explicit softmax with a dense arrow mask built from the definition (image
queries: the window over the image keys, plus every text key; text queries: every key),
and naive caches per CFG call: the residual refreshed at every ``full``/``asc`` step, the
``ast`` output at every computed step. With CFG in ``separate`` calls the second call of a
step returns the first call's output at ``asc``/``wars_asc`` (and takes its residual at
``asc``); with ``batched`` CFG the conditional half is the second (``uncond_cond``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb

from runtime.windows import mask as image_window_mask

Finish = Callable[[torch.Tensor], Any]


def arrow_reference_mask(window: Any, image: int, text: int, text_first: bool) -> torch.Tensor:
    """``[N + T, N + T]``: all True but the image-to-image block, which is the window's mask."""
    allowed = torch.ones(image + text, image + text, dtype=torch.bool)
    start = text if text_first else 0
    allowed[start:start + image, start:start + image] = image_window_mask(window, image)
    return allowed


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(o: torch.Tensor) -> torch.Tensor:
    b, h, n, d = o.shape
    return o.transpose(1, 2).reshape(b, n, h * d)


def sd3_joint(attn: Any, x: torch.Tensor, context: torch.Tensor | None) -> tuple[Any, Any, Any, int, bool, Finish]:
    h = attn.heads
    q, k, v = (_split(f(x), h) for f in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if context is None:
        return q, k, v, 0, False, lambda o: attn.to_out[0](_merge(o))
    cq, ck, cv = (_split(f(context), h) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
    n = x.shape[1]

    def finish(o: torch.Tensor) -> Any:
        flat = _merge(o)
        text = flat[:, n:] if attn.context_pre_only else attn.to_add_out(flat[:, n:])
        return attn.to_out[0](flat[:, :n]), text

    return torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2), context.shape[1], False, finish


def flux(attn: Any, x: torch.Tensor, context: torch.Tensor | None, rotary: Any, text: int) -> tuple:
    h = attn.heads

    def heads(t: torch.Tensor) -> torch.Tensor:  # [b, n, heads, d]
        return t.view(t.shape[0], t.shape[1], h, -1)

    q, k, v = (heads(f(x)) for f in (attn.to_q, attn.to_k, attn.to_v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if context is not None:
        cq, ck, cv = (heads(f(context)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        text = context.shape[1]
    q = apply_rotary_emb(q, rotary, sequence_dim=1)
    k = apply_rotary_emb(k, rotary, sequence_dim=1)

    def finish(o: torch.Tensor) -> Any:
        flat = _merge(o)
        if context is None:
            return flat
        return attn.to_out[0](flat[:, text:]), attn.to_add_out(flat[:, :text])

    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), text, True, finish


class JointReference:
    """Plays a method grid on a tiny SD3 or FLUX through plain processors.

    ``windows[i]``: layer ``i``'s window; ``texts[i]``: its text tokens (FLUX single-stream
    layers are told theirs, as the plan tells the runtime).
    """

    def __init__(
        self, methods: list[list[str]], windows: list[Any], texts: list[int], cfg_mode: str,
        heads: dict[tuple[int, int], str] | None = None,
    ) -> None:
        self.methods, self.windows, self.texts, self.cfg_mode = methods, windows, texts, cfg_mode
        self.heads = heads or {}  # per-head cells: (step, layer) -> f/w/a per head
        self.head_output: dict[tuple[int, int], torch.Tensor] = {}  # per call: the last computed o
        self.step = self.call = 0
        self.residual: dict[tuple[int, int], torch.Tensor] = {}
        self.output: dict[tuple[int, int], Any] = {}
        self.shared: dict[int, Any] = {}

    @staticmethod
    def layers(model: torch.nn.Module) -> list[Any]:
        found = []
        for block in model.transformer_blocks:
            found.append(block.attn)
            if getattr(block, "attn2", None) is not None:
                found.append(block.attn2)
        return found + [block.attn for block in getattr(model, "single_transformer_blocks", ())]

    def outputs(self, model: torch.nn.Module, calls: Callable[[int], list[dict]]) -> list[torch.Tensor]:
        """Every call's output, ``calls(t)`` being step ``t``'s calls."""
        layers = self.layers(model)
        originals = [attn.processor for attn in layers]
        for i, attn in enumerate(layers):
            attn.set_processor(_Processor(self, i))
        try:
            outs = []
            with torch.no_grad():
                for t in range(len(self.methods)):
                    self.step = t
                    for c, inputs in enumerate(calls(t)):
                        self.call = c
                        outs.append(model(**inputs).sample)
            return outs
        finally:
            for attn, original in zip(layers, originals):
                attn.set_processor(original)

    def run(self, layer: int, project: Callable[[torch.Tensor | None], tuple]) -> Any:
        method, call = self.methods[self.step][layer], self.call
        if method == "ast":
            return self.output[call, layer]
        separate, batched = self.cfg_mode == "separate", self.cfg_mode == "batched"
        if separate and call == 1 and method in ("asc", "wars_asc"):
            out = self.output[1, layer] = self.shared[layer]
            if method == "asc":
                self.residual[1, layer] = self.residual[0, layer]
            self.head_output[1, layer] = self.head_output[0, layer]
            return out
        q, k, v, text, text_first, finish = project(None)
        image = q.shape[-2] - text
        window = arrow_reference_mask(self.windows[layer], image, text, text_first)
        full, win = attention(q, k, v, None), attention(q, k, v, window)

        def cond(x: torch.Tensor) -> torch.Tensor:  # [uncond, cond]
            return x[x.shape[0] // 2:]

        def both(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x])

        if method == "full" or (method == "asc" and not batched):
            o = full
            self.residual[call, layer] = full - win
        elif method == "asc":
            o = both(cond(full))
            self.residual[call, layer] = both(cond(full - win))
        elif method == "wars" or not batched:
            o = win + self.residual[call, layer]
            for head, letter in enumerate(self.heads.get((self.step, layer), "")):
                if letter == "f":
                    o[:, head] = full[:, head]
                elif letter == "a":
                    o[:, head] = self.head_output[call, layer][:, head]
        else:
            o = both(cond(win) + cond(self.residual[call, layer]))
        self.head_output[call, layer] = o
        out = finish(o)
        self.output[call, layer] = out
        if separate and method in ("asc", "wars_asc"):
            self.shared[layer] = out
        return out


class _Processor:
    def __init__(self, run: JointReference, layer: int) -> None:
        self.run, self.layer = run, layer

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, image_rotary_emb: Any = None, **kwargs: Any) -> Any:
        if type(attn).__name__ == "FluxAttention":
            text = self.run.texts[self.layer]
            return self.run.run(self.layer, lambda _: flux(attn, hidden_states, encoder_hidden_states, image_rotary_emb, text))
        return self.run.run(self.layer, lambda _: sd3_joint(attn, hidden_states, encoder_hidden_states))
