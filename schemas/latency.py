"""Measured method latencies and the time a plan is predicted to take with them.

A ``full`` or ``asc`` step that refreshes a layer's residual for a later ``wars`` step
also runs the window attention: its own variant (``full_refresh``, ``asc_refresh``).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from msgspec import Meta, Struct

LatencyVariant = Literal["full", "full_refresh", "asc", "asc_refresh", "wars", "wars_asc", "ast", "forecast"]
LATENCY_VARIANTS: tuple[str, ...] = (
    "full", "full_refresh", "asc", "asc_refresh", "wars", "wars_asc", "ast", "forecast",
)  # fmt: skip
CFG_VARIANTS = ("asc", "asc_refresh", "wars_asc")
# per-head cells (schema version 5): one letter per head, the method that head runs
HEAD_LETTERS = {"f": "full", "w": "wars", "a": "ast"}
Heads = dict[tuple[int, int], str]  # (step, layer) -> one method letter per head
COMPUTES_FULL = ("full", "asc")
USES_RESIDUAL = ("wars", "wars_asc")


class Latency(Struct, forbid_unknown_fields=True, frozen=True):
    """Seconds per layer-step of each method variant, measured on ``device``.

    Measured as whole transformer forwards at ``rows`` batch rows, with the runtime's
    ``kernel``, in ``dtype``; variants that need CFG are absent without it.
    """

    device: Annotated[str, Meta(min_length=1, max_length=200)]
    dtype: Annotated[str, Meta(min_length=1, max_length=40)]
    kernel: Annotated[str, Meta(min_length=1, max_length=40)]
    rows: Annotated[int, Meta(ge=1, le=2**20)]
    seconds: dict[LatencyVariant, Annotated[float, Meta(gt=0.0, le=3600.0)]]


def reads_residual(method: str, letters: str | None = None) -> bool:
    """Whether a layer-step reads the layer's residual: ``wars``/``wars_asc``, but a per-head
    cell only when some of its heads (``letters``) run ``w``."""
    return method in USES_RESIDUAL and (letters is None or "w" in letters)


def refreshed_cells(methods: list[list[str]], heads: Heads | None = None) -> set[tuple[int, int]]:
    """(step, layer) of every ``full``/``asc`` step whose residual a later ``wars`` step
    (or per-head cell with ``w`` heads, of ``heads``) reads."""
    heads = heads or {}
    cells: set[tuple[int, int]] = set()
    for i in range(len(methods[0]) if methods else 0):
        source = None  # the step whose residual is current
        for t, row in enumerate(methods):
            if row[i] in COMPUTES_FULL:
                source = t
            elif reads_residual(row[i], heads.get((t, i))) and source is not None:
                cells.add((source, i))
    return cells


def variant_grid(methods: list[list[str]], heads: Heads | None = None) -> list[list[str]]:
    """Each cell's latency variant: its method, with ``_refresh`` where it refreshes a residual."""
    refreshed = refreshed_cells(methods, heads)
    return [
        [f"{m}_refresh" if (t, i) in refreshed else m for i, m in enumerate(row)]
        for t, row in enumerate(methods)
    ]


def time_fraction(methods: list[list[str]], latency: Latency, heads: Heads | None = None) -> float:
    """Predicted time of the grid's attention layers, over the same grid all ``full``.

    Each layer-step costs its variant's seconds, which include the layer's other work
    (``planner/latency.py``), so the fraction is that of the whole transformer. A per-head
    cell of ``heads`` costs the mean of its heads' methods' seconds (heads' shares).
    """
    seconds = latency.seconds
    total = 0.0
    for t, row in enumerate(variant_grid(methods, heads)):
        for i, v in enumerate(row):
            letters = heads.get((t, i)) if heads else None
            total += seconds[v] if letters is None else sum(seconds[HEAD_LETTERS[c]] for c in letters) / len(letters)
    base = seconds["full"] * sum(len(row) for row in methods)
    return total / base if base else 1.0


def check_latency(
    latency: Latency, methods: list[list[str]], cfg: bool, heads: Heads | None = None
) -> str | None:
    """The first problem of ``latency`` for this grid, as ``field: reason``; ``None`` if none."""
    for variant, value in latency.seconds.items():
        if not math.isfinite(value):
            return f"seconds.{variant}: must be finite (got {value!r})"
    needed = {v for row in variant_grid(methods, heads) for v in row} | {"full"}
    needed |= {HEAD_LETTERS[c] for letters in (heads or {}).values() for c in letters}
    missing = sorted(needed - set(latency.seconds), key=LATENCY_VARIANTS.index)
    if missing:
        return f"seconds: no figure for {missing[0]!r}, which the grid runs"
    if not cfg and set(latency.seconds) & set(CFG_VARIANTS):
        return "seconds: CFG-sharing variants measured but sampling.cfg is false"
    return None


def effective_seconds(latency: Latency, method: str) -> float | None:
    """Seconds per layer-step of ``method``, a ``wars`` step paying for its residual's refresh.

    The refresh is charged in full to each ``wars`` step (an upper bound: several steps
    may share one refresh). ``None`` where the method was not measured.
    """
    seconds = latency.seconds
    if method not in seconds:
        return None
    cost = seconds[method]
    if method in USES_RESIDUAL:
        cost += max(0.0, seconds.get("full_refresh", seconds["full"]) - seconds["full"])
    return cost


def faster_than_full(latency: Latency, methods: tuple[str, ...]) -> tuple[str, ...]:
    """The ``methods`` (in their order) that take less time than ``full`` on the measured device."""
    full = latency.seconds["full"]
    return tuple(m for m in methods if (cost := effective_seconds(latency, m)) is not None and cost < full)
