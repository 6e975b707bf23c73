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


class GenerationState:
    """Caches and step counter of one generation; ``reset`` starts the next one."""

    def __init__(self) -> None:
        self.step = 0
        self.in_forward = False
        self.checked_inputs = False
        self.residuals: dict[int, Residual] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.stats = RunStats()

    def reset(self) -> None:
        self.step = 0
        self.in_forward = False
        self.checked_inputs = False
        self.residuals.clear()
        self.outputs.clear()

    def cache_bytes(self) -> int:
        tensors = [r.tensor for r in self.residuals.values()] + list(self.outputs.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def note_cache(self) -> None:
        self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes, self.cache_bytes())

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
