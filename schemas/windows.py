"""Window shapes of ``wars``: the tiled ones, their exact pair counts and their fit rules.

A window is one function of (query index, key index) (DESIGN §6). The band, the
paper's window, is a plain integer in a plan (its half-width ``w``: query ``i`` sees
keys ``|i - j| <= w``). The tiled shapes cut the layer's tokens into whole tiles;
query tile ``a`` sees, along each axis, the ``2k + 1`` key tiles ``c - k … c + k``
around ``c = clamp(a, k, n_tiles - 1 - k)``: the neighbourhood is shifted inward at
the borders so that every tile sees the same number of tiles (all of them when the
axis has fewer than ``2k + 1``), as in Sliding Tile Attention.

- ``tiles1d``: the flattened tokens in tiles of ``tile`` tokens.
- ``tiles2d``: the row-major patch grid ``grid = (rows, cols)`` in tiles of
  ``tile = (tile_rows, tile_cols)`` patches.
- ``tiles3d``: a video layer's ``grid = (frames, rows, cols)`` in tiles of
  ``(tile_frames, tile_rows, tile_cols)``.

Every tile of a plan divides its grid (no partial tiles, no padding). Imports msgspec
only; the kernels and the index functions are in ``runtime/windows.py``.
"""

from __future__ import annotations

import math
from typing import Annotated

from msgspec import Meta, Struct

MAX_GRID = 2**22  # a grid side or a tile side, in patches (at most the token limit)
MAX_REACH = 2**22  # k, tiles on each side

GridSide = Annotated[int, Meta(ge=1, le=MAX_GRID)]
Reach = Annotated[int, Meta(ge=0, le=MAX_REACH)]


class Tiles1d(Struct, tag="tiles1d", tag_field="kind", forbid_unknown_fields=True, frozen=True):
    """The flattened tokens in tiles of ``tile``; each query tile sees ``2k + 1`` key tiles."""

    tile: GridSide
    k: Reach


class Tiles2d(Struct, tag="tiles2d", tag_field="kind", forbid_unknown_fields=True, frozen=True):
    """The ``grid`` (rows, cols) of patches in ``tile`` (rows, cols) tiles; a query tile sees
    its ``(2k + 1) x (2k + 1)`` neighbourhood of tiles, shifted inward at the borders."""

    grid: tuple[GridSide, GridSide]
    tile: tuple[GridSide, GridSide]
    k: Reach


class Tiles3d(Struct, tag="tiles3d", tag_field="kind", forbid_unknown_fields=True, frozen=True):
    """The ``grid`` (frames, rows, cols) of a video layer in ``tile`` tiles; a query tile sees
    its ``(2k + 1)^3`` neighbourhood of tiles, shifted inward at the borders."""

    grid: tuple[GridSide, GridSide, GridSide]
    tile: tuple[GridSide, GridSide, GridSide]
    k: Reach


Tiles = Tiles1d | Tiles2d | Tiles3d
TILED: tuple[type, ...] = (Tiles1d, Tiles2d, Tiles3d)
TILED_KINDS: tuple[str, ...] = ("tiles1d", "tiles2d", "tiles3d")


def tile_span(num_tiles: int, k: int) -> int:
    """Tiles each query tile sees along one axis of ``num_tiles`` tiles: ``2k + 1``, or all."""
    return min(2 * k + 1, num_tiles)


def tile_start(tile: int, num_tiles: int, k: int) -> int:
    """First key tile seen by query tile ``tile`` along one axis: ``clamp(tile, k, n - 1 - k) - k``."""
    return min(max(tile - k, 0), num_tiles - tile_span(num_tiles, k))


def dims(shape: Tiles, num_tokens: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(grid, tile) of ``shape`` per axis; ``tiles1d`` is one axis of ``num_tokens``."""
    if isinstance(shape, Tiles1d):
        return (num_tokens,), (shape.tile,)
    return tuple(shape.grid), tuple(shape.tile)


def keys_per_query(shape: Tiles, num_tokens: int) -> int:
    """Keys every query sees: the product over the axes of ``tile_span × tile``."""
    grid, tile = dims(shape, num_tokens)
    return math.prod(tile_span(g // t, shape.k) * t for g, t in zip(grid, tile))


def tiled_pairs(shape: Tiles, num_tokens: int) -> int:
    """Exact (query, key) pairs of a fitting tiled shape over ``num_tokens`` tokens."""
    return num_tokens * keys_per_query(shape, num_tokens)


def _sizes(values: tuple[int, ...]) -> str:
    return "x".join(map(str, values))


def tiled_name(shape: Tiles) -> str:
    """``tiles1d:T:K``, ``tiles2d:THxTW:K`` or ``tiles3d:TFxTHxTW:K``, as ``--window`` takes it."""
    tile = (shape.tile,) if isinstance(shape, Tiles1d) else tuple(shape.tile)
    return f"{shape.__struct_config__.tag}:{_sizes(tile)}:{shape.k}"


def tiles_problem(
    shape: Tiles, num_tokens: int, height: int | None = None, width: int | None = None
) -> str | None:
    """Why ``shape`` does not fit a layer of ``num_tokens`` tokens, as ``field: reason``
    (``None`` when it fits). ``height``/``width`` (pixels), when given, fix the patch grid's
    aspect: a ``tiles2d`` grid must have the image's proportions."""
    grid, tile = dims(shape, num_tokens)
    if not isinstance(shape, Tiles1d) and math.prod(grid) != num_tokens:
        return f"grid: {_sizes(grid)} = {math.prod(grid)} tokens, the layer has {num_tokens}"
    if any(g % t for g, t in zip(grid, tile)):
        return f"tile: tiles of {_sizes(tile)} do not divide the {_sizes(grid)} grid"
    if isinstance(shape, Tiles2d) and height and width and grid[0] * width != grid[1] * height:
        return f"grid: {_sizes(grid)} patches do not have the proportions of {height}x{width} pixels"
    return None
