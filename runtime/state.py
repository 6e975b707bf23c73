"""Per-generation state: the step counter, the per-layer caches, and what ran."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from runtime.adapters import Outputs
from schemas import FFN_METHODS, METHODS, WindowShape, head_cost, method_cost


@dataclass
class RunStats:
    """What actually ran since the plan was applied (or since ``reset(stats=True)``).

    ``attention_flops_fraction`` is the executed self-attention FLOPs over what full
    attention would have cost for the same layer-steps (both counted in query-key
    pairs over the batch); it includes the window attention spent refreshing
    residuals, which the plan's own figure leaves out.
    """

    method_counts: dict[str, int] = field(default_factory=lambda: {m: 0 for m in METHODS})
    head_cells: int = 0  # per-head cells, counted under their grid method ``wars`` too
    residual_refreshes: int = 0
    steps: int = 0
    generations: int = 0
    attention_flops: float = 0.0
    full_attention_flops: float = 0.0
    peak_cache_bytes: int = 0
    ffn_counts: dict[str, int] = field(default_factory=lambda: {m: 0 for m in FFN_METHODS})
    ffn_tokens: int = 0
    full_ffn_tokens: int = 0

    @property
    def ffn_flops_fraction(self) -> float:
        """Tokens the feed-forward layers computed over the tokens they were given."""
        return self.ffn_tokens / self.full_ffn_tokens if self.full_ffn_tokens else 1.0

    def count_ffn(self, method: str, tokens: int, *, first_call: bool) -> None:
        """One feed-forward layer's call on ``tokens`` tokens (its method counted once a step)."""
        if first_call:
            self.ffn_counts[method] += 1
        self.full_ffn_tokens += tokens
        if method == "compute":
            self.ffn_tokens += tokens

    @property
    def layer_steps(self) -> int:
        return sum(self.method_counts.values())

    @property
    def attention_flops_fraction(self) -> float:
        if not self.full_attention_flops:
            return 1.0
        return self.attention_flops / self.full_attention_flops

    def as_dict(self) -> dict[str, object]:
        return {
            "method_counts": dict(self.method_counts),
            "head_cells": self.head_cells,
            "residual_refreshes": self.residual_refreshes,
            "steps": self.steps,
            "generations": self.generations,
            "layer_steps": self.layer_steps,
            "attention_flops_fraction": self.attention_flops_fraction,
            "peak_cache_bytes": self.peak_cache_bytes,
            "ffn_counts": dict(self.ffn_counts),
            "ffn_flops_fraction": self.ffn_flops_fraction,
        }


@dataclass
class Residual:
    """``R = full - window`` per head, ``[rows, heads, N, head_dim]``.

    ``cond_only``: computed at an ``asc`` step, it holds the conditional rows only,
    which stand for both CFG halves until the next refresh.
    """

    tensor: torch.Tensor
    cond_only: bool


def _nbytes(t: Outputs | None) -> int:
    if isinstance(t, tuple):
        return sum(map(_nbytes, t))
    return 0 if t is None else t.numel() * t.element_size()


class LayerCache:
    """One layer's caches in one generation, as plain attributes.

    ``output``: the attention output kept for a later ``ast``/``forecast`` step (a joint
    layer's outputs as a tuple), computed at step ``output_step``; ``previous`` (of step
    ``previous_step``): the output kept before it, which a ``forecast`` also reads;
    ``residual`` (and ``residual_cond_only``): the residual kept for
    later ``wars``/``wars_asc`` steps; ``head_output``: the per-head output (before the
    output projection, every row) kept for a later per-head cell's ``a`` heads; ``shared``: with CFG in separate calls, the
    conditional call's output of an ``asc``/``wars_asc`` step, which the unconditional
    call of the same step returns.
    ``rows``/``tokens``: the attention batch and sequence length of the layer's call at
    the current step (0 until it runs), which the statistics weigh it by.

    The processor reads and writes these attributes and never the layer index, so a
    compiled block runs the same graph for every layer (``runtime/processor.py``).
    """

    def __init__(self) -> None:
        self.output: Outputs | None = None
        self.output_step = -1
        self.previous: Outputs | None = None
        self.previous_step = -1
        self.residual: torch.Tensor | None = None
        self.residual_cond_only = False
        self.head_output: torch.Tensor | None = None
        self.shared: Outputs | None = None  # separate CFG: this conditional call's output for the next call
        self.rows = 0
        self.tokens = 0
        self.merged_refresh = False  # this step's refresh ran merged (about one full attention)

    def keep(self, out: Outputs, step: int) -> None:
        """Keep ``out`` (computed at ``step``) as the latest output; the one before becomes ``previous``."""
        self.previous, self.previous_step = self.output, self.output_step
        self.output, self.output_step = out, step

    def free_outputs(self) -> None:
        self.output = self.previous = None

    def residual_bytes(self) -> int:
        return _nbytes(self.residual)

    def output_bytes(self) -> int:
        return _nbytes(self.output) + _nbytes(self.previous) + _nbytes(self.shared) + _nbytes(self.head_output)


def _made(calls: list[list[LayerCache]], call: int, layer: int) -> LayerCache:
    """``calls[call][layer]``, growing the lists as needed."""
    while len(calls) <= call:
        calls.append([])
    caches = calls[call]
    while len(caches) <= layer:
        caches.append(LayerCache())
    return caches[layer]


class GenerationState:
    """Caches and step counter of one generation; ``reset`` starts the next one.

    With CFG in separate calls a step is two transformer calls, conditional first:
    ``call`` is the call of the current step (0 or 1), each with its own caches
    (``calls[call][layer]``); ``call_key`` is the timestep of the last conditional call,
    which tells a step's second call from the next step's first.
    """

    def __init__(self) -> None:
        self.stats = RunStats()
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.call = 0
        self.call_key: object = None
        self.in_forward = False
        self.checked_inputs = False
        self.calls: list[list[LayerCache]] = [[]]
        self.ffn_calls: list[list[LayerCache]] = [[]]
        self._bytes_before: list[tuple[int, int]] = []
        self._total_before = 0

    def cache(self, layer: int, call: int | None = None) -> LayerCache:
        """The caches of ``layer`` in ``call`` (default: the current call), made on first use."""
        return _made(self.calls, self.call if call is None else call, layer)

    def ffn_cache(self, layer: int, call: int | None = None) -> LayerCache:
        """The output caches of feed-forward layer ``layer`` in ``call`` (default: the current call)."""
        return _made(self.ffn_calls, self.call if call is None else call, layer)

    @property
    def caches(self) -> list[LayerCache]:
        """The first (or only) call's caches by layer."""
        return self.calls[0]

    @property
    def outputs(self) -> dict[int, Outputs]:
        """The latest kept outputs by layer (a view for inspection)."""
        return {i: c.output for i, c in enumerate(self.caches) if c.output is not None}

    @property
    def residuals(self) -> dict[int, Residual]:
        """The kept residuals by layer (a view for inspection)."""
        return {
            i: Residual(c.residual, c.residual_cond_only)
            for i, c in enumerate(self.caches)
            if c.residual is not None
        }

    def cache_bytes(self) -> int:
        attention = sum(c.residual_bytes() + c.output_bytes() for caches in self.calls for c in caches)
        return attention + sum(c.output_bytes() for caches in self.ffn_calls for c in caches)

    def step_started(self, layers: int) -> None:
        """Before a call's forward: no layer has run yet; remember what the caches hold."""
        for layer in range(layers):
            self.cache(layer).rows = 0
        self._bytes_before = [(c.residual_bytes(), c.output_bytes()) for c in self.calls[self.call]]
        self._total_before = self.cache_bytes()

    def note_stores(self, stores: list[tuple[int, bool, bool]]) -> None:
        """After a call's forward: the peak cache bytes as the call's stores happened.

        ``stores`` is ``(layer, stored residual, stored output)`` in the order the layers
        ran; each store replaces what that layer held before, as it did during the call.
        """
        before = self._bytes_before
        total = peak = self._total_before
        for layer, residual, output in stores:
            cache = self.cache(layer)
            old_residual, old_output = before[layer] if layer < len(before) else (0, 0)
            if residual:
                total += cache.residual_bytes() - old_residual
                peak = max(peak, total)
            if output:
                total += cache.output_bytes() - old_output
                peak = max(peak, total)
        if stores:
            self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, peak)

    def count(
        self,
        method: str,
        rows: int,
        num_tokens: int,
        window: WindowShape,
        refreshed: bool,
        text_tokens: int = 0,
        *,
        merged: bool = False,
        heads: str | None = None,
    ) -> None:
        """Record one layer-step: ``rows`` attention sequences of ``num_tokens`` image tokens
        (and ``text_tokens`` text tokens of a joint layer), per head by the letters ``heads``
        of a per-head cell. A refresh adds its window's pairs unless it ran ``merged``
        (window and complement: the full pairs, counted already)."""
        stats = self.stats
        total = num_tokens + text_tokens
        full = rows * total * total
        stats.method_counts[method] += 1
        stats.head_cells += heads is not None
        stats.full_attention_flops += full
        if heads is not None:
            stats.attention_flops += full * head_cost(heads, num_tokens, window, text_tokens)
        else:
            stats.attention_flops += full * method_cost(method, num_tokens, window, text_tokens)
        if refreshed:
            stats.residual_refreshes += 1
        if refreshed and not merged:
            share = 0.5 if method == "asc" else 1.0
            stats.attention_flops += full * share * method_cost("wars", num_tokens, window, text_tokens)
