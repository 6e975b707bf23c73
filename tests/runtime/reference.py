"""An independent float64 reference of DESIGN.md §1, used only by the tests.

It computes every candidate from scratch with explicit softmax and a dense window mask
(the band's, or a tiled shape's index function from ``runtime/windows.py``: DESIGN §6),
and keeps its caches naively: the residual is refreshed at every ``full``/``asc``
step and every computed output is kept, with its step (``forecast`` extrapolates the last
two to this step's timestep, ``times[step]``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from runtime.windows import mask as window_mask


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Any) -> torch.Tensor:
    """Explicit softmax attention; ``window`` ``None`` (all keys), a band half-width or a tiled shape."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    n = q.shape[-2]
    if isinstance(window, int):
        i = torch.arange(n).view(-1, 1)
        j = torch.arange(n).view(1, -1)
        scores = scores.masked_fill((i - j).abs() > window, float("-inf"))
    elif window is not None:
        scores = scores.masked_fill(~window_mask(window, n), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class ReferenceRun:
    """Plays a method grid on a model through plain attention processors."""

    def __init__(
        self,
        methods: list[list[str]],
        window: Any,
        cond_first: bool,
        times: list[float] | None = None,
        heads: dict[tuple[int, int], str] | None = None,
    ) -> None:
        layers = len(methods[0])
        self.times = times if times is not None else [900.0 - 200 * t for t in range(len(methods))]
        self.computed: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self.windows = window if isinstance(window, list) else [window] * layers
        self.methods, self.cond_first = methods, cond_first
        self.step = 0
        self.residual: dict[int, torch.Tensor] = {}  # [cond rows | all rows] per layer
        self.output: dict[int, torch.Tensor] = {}
        self.heads = heads or {}  # per-head cells: (step, layer) -> f/w/a per head
        self.head_output: dict[int, torch.Tensor] = {}  # the last computed per-head output

    def cond(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[0] // 2
        return x[:half] if self.cond_first else x[half:]

    def both(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.cat([cond, cond])

    def processor(self, layer: int) -> Any:
        return _Processor(self, layer)

    def install(self, model: torch.nn.Module) -> list[Any]:
        """Install on ``attn1`` of every block; video models alternate spatial, temporal."""
        layers = [block.attn1 for block in model.transformer_blocks]
        temporal = getattr(model, "temporal_transformer_blocks", None)
        if temporal is not None:
            layers = [a for pair in zip(layers, (b.attn1 for b in temporal)) for a in pair]
        originals = []
        for i, attn in enumerate(layers):
            originals.append(attn.processor)
            attn.set_processor(self.processor(i))
        self.layers = layers
        return originals

    def uninstall(self, originals: list[Any]) -> None:
        for attn, original in zip(self.layers, originals):
            attn.set_processor(original)

    def outputs(self, model: torch.nn.Module, step_outputs: Any) -> list[Any]:
        """Installed on ``model``: ``step_outputs(t)`` (a list) for every step, concatenated."""
        originals = self.install(model)
        try:
            outs = []
            for t in range(len(self.methods)):
                self.step = t
                with torch.no_grad():
                    outs.extend(step_outputs(t))
            return outs
        finally:
            self.uninstall(originals)


class _Processor:
    def __init__(self, run: ReferenceRun, layer: int) -> None:
        self.run, self.layer = run, layer

    def __call__(
        self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
        attention_mask: Any = None, temb: Any = None, **kwargs: Any,
    ) -> torch.Tensor:
        run, layer = self.run, self.layer
        method = run.methods[run.step][layer]
        if method == "ast":
            return run.output[layer]
        if method == "forecast":
            (b, out_b), (a, out_a) = run.computed[layer][-2:]
            tau = run.times
            return out_a + (out_a - out_b) * ((tau[run.step] - tau[a]) / (tau[a] - tau[b]))
        b, n, _ = hidden_states.shape
        h = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, -1).transpose(1, 2)

        q, k, v = (split(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        full = dense_attention(q, k, v, None)
        win = dense_attention(q, k, v, run.windows[layer])
        if method == "full":
            o = full
            run.residual[layer] = full - win
        elif method == "asc":
            o = run.both(run.cond(full))
            run.residual[layer] = run.both(run.cond(full - win))
        elif method == "wars":
            o = win + run.residual[layer]
            letters = run.heads.get((run.step, layer))
            for head, letter in enumerate(letters or ""):
                if letter == "f":
                    o[:, head] = full[:, head]
                elif letter == "a":
                    o[:, head] = run.head_output[layer][:, head]
        else:  # wars_asc: conditional rows' window plus the conditional rows' residual
            o = run.both(run.cond(win) + run.cond(run.residual[layer]))
        run.head_output[layer] = o
        out = attn.to_out[0](o.transpose(1, 2).reshape(b, n, -1))
        out = attn.to_out[1](out) / attn.rescale_output_factor
        run.output[layer] = out
        run.computed.setdefault(layer, []).append((run.step, out))
        return out
