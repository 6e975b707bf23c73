"""Per-generation state: the step counter, the per-layer caches, and what ran."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from schemas import METHODS, method_cost


@dataclass
class RunStats:
    """What actually ran since the plan was applied (or since ``reset(stats=True)``).

    ``attention_flops_fraction`` is the executed self-attention FLOPs over what full
    attention would have cost for the same layer-steps (both counted in query-key
    pairs over the batch); it includes the window attention spent refreshing
    residuals, which the plan's own figure leaves out.
    """

    method_counts: dict[str, int] = field(default_factory=lambda: {m: 0 for m in METHODS})
    residual_refreshes: int = 0
    steps: int = 0
    generations: int = 0
    attention_flops: float = 0.0
    full_attention_flops: float = 0.0
    peak_cache_bytes: int = 0

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
            "residual_refreshes": self.residual_refreshes,
            "steps": self.steps,
            "generations": self.generations,
            "layer_steps": self.layer_steps,
            "attention_flops_fraction": self.attention_flops_fraction,
            "peak_cache_bytes": self.peak_cache_bytes,
        }


@dataclass
class Residual:
    """``R = full - window`` per head, ``[rows, heads, N, head_dim]``.

    ``cond_only``: computed at an ``asc`` step, it holds the conditional rows only,
    which stand for both CFG halves until the next refresh.
    """

    tensor: torch.Tensor
    cond_only: bool


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class LayerCache:
    """One layer's caches in one generation, as plain attributes.

    ``output``: the attention output kept for a later ``ast`` step; ``residual`` (and
    ``residual_cond_only``): the residual kept for later ``wars``/``wars_asc`` steps.
    ``rows``/``tokens``: the attention batch and sequence length of the layer's call at
    the current step (0 until it runs), which the statistics weigh it by.

    The processor reads and writes these attributes and never the layer index, so a
    compiled block runs the same graph for every layer (``runtime/processor.py``).
    """

    def __init__(self) -> None:
        self.output: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.residual_cond_only = False
        self.rows = 0
        self.tokens = 0

    def residual_bytes(self) -> int:
        return _nbytes(self.residual)

    def output_bytes(self) -> int:
        return _nbytes(self.output)


class GenerationState:
    """Caches and step counter of one generation; ``reset`` starts the next one."""

    def __init__(self) -> None:
        self.step = 0
        self.in_forward = False
        self.checked_inputs = False
        self.caches: list[LayerCache] = []
        self.stats = RunStats()
        self._bytes_before: list[tuple[int, int]] = []

    def reset(self) -> None:
        self.step = 0
        self.in_forward = False
        self.checked_inputs = False
        self.caches = []
        self._bytes_before = []

    def cache(self, layer: int) -> LayerCache:
        """The caches of ``layer`` (made on first use)."""
        while len(self.caches) <= layer:
            self.caches.append(LayerCache())
        return self.caches[layer]

    @property
    def outputs(self) -> dict[int, torch.Tensor]:
        """The kept ``ast`` outputs by layer (a view for inspection)."""
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
        return sum(c.residual_bytes() + c.output_bytes() for c in self.caches)

    def step_started(self, layers: int) -> None:
        """Before a step's forward: no layer has run yet; remember what the caches hold."""
        for layer in range(layers):
            self.cache(layer).rows = 0
        self._bytes_before = [(c.residual_bytes(), c.output_bytes()) for c in self.caches]

    def note_stores(self, stores: list[tuple[int, bool, bool]]) -> None:
        """After a step's forward: the peak cache bytes as the step's stores happened.

        ``stores`` is ``(layer, stored residual, stored output)`` in the order the layers
        ran; each store replaces what that layer held before, as it did during the step.
        """
        before = self._bytes_before
        total = sum(r + o for r, o in before)
        peak = total
        for layer, residual, output in stores:
            cache = self.caches[layer]
            old_residual, old_output = before[layer] if layer < len(before) else (0, 0)
            if residual:
                total += cache.residual_bytes() - old_residual
                peak = max(peak, total)
            if output:
                total += cache.output_bytes() - old_output
                peak = max(peak, total)
        if stores:
            self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, peak)

    def count(self, method: str, rows: int, num_tokens: int, window: int, refreshed: bool) -> None:
        """Record one layer-step: ``rows`` attention sequences of ``num_tokens`` tokens."""
        stats = self.stats
        full = rows * num_tokens * num_tokens
        stats.method_counts[method] += 1
        stats.full_attention_flops += full
        stats.attention_flops += full * method_cost(method, num_tokens, window)
        if refreshed:
            stats.residual_refreshes += 1
            share = 0.5 if method == "asc" else 1.0
            stats.attention_flops += full * share * method_cost("wars", num_tokens, window)
