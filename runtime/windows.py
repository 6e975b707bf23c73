"""Window shapes: one registry of index functions, exact pair counts and kernels.

Every shape is one function of (query index, key index), ``mask``; its kernels compute
exactly ``softmax(q k^T / sqrt(d) + mask) v`` restricted to it, and its pair count is the
mask's (``schemas.window_pairs``). A window is a plan's value (``schemas.WindowShape``):
an integer is the band ``|i - j| <= w`` (today's kernels, ``runtime/kernels.py``), an
object one of the tiled shapes (``schemas/windows.py``), which run as one batched,
unmasked fused-attention call over gathered key/value tiles (``tiled_window_attention``).

``bind_window(window, num_tokens, kernel)`` resolves a layer's kernel once: the callable
it returns takes ``(q, k, v)`` in ``[batch, heads, tokens, head_dim]`` and holds
everything the window needs (for tiles: the gather indices), checked to fit the layer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from runtime.kernels import KERNELS, full_attention, resolve_window_kernel, window_mask
from schemas import PlanError, Tiles1d, Tiles2d, Tiles3d, WindowShape, window_name, window_pairs
from schemas.windows import TILED, dims, tile_span, tile_start, tiles_problem

BoundKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Mask = Callable[[torch.Tensor, torch.Tensor, WindowShape, int], torch.Tensor]


# ---------------------------------------------------------------------------
# index functions


def band_mask(q_idx: torch.Tensor, k_idx: torch.Tensor, window: int, num_tokens: int) -> torch.Tensor:
    """True where query ``i`` may see key ``j``: ``|i - j| <= window``."""
    return window_mask(q_idx, k_idx, window)


def _coords(idx: torch.Tensor, grid: tuple[int, ...]) -> list[torch.Tensor]:
    """Row-major coordinates of flat token indices on ``grid``, one tensor per axis."""
    coords, rest = [], idx
    for size in reversed(grid):
        coords.append(rest % size)
        rest = rest // size
    return coords[::-1]


def tiles_mask(
    q_idx: torch.Tensor, k_idx: torch.Tensor, window: Tiles1d | Tiles2d | Tiles3d, num_tokens: int
) -> torch.Tensor:
    """True where query ``i`` may see key ``j``: along every axis, ``j``'s tile is one of the
    ``2k + 1`` tiles around ``i``'s, the neighbourhood shifted inward at the borders."""
    grid, tile = dims(window, num_tokens)
    inside = torch.ones(len(q_idx), len(k_idx), dtype=torch.bool, device=q_idx.device)
    for qc, kc, g, t in zip(_coords(q_idx, grid), _coords(k_idx, grid), grid, tile):
        tiles, span = g // t, tile_span(g // t, window.k)
        start = (qc // t - window.k).clamp(0, tiles - span)  # tile_start, elementwise
        key_tile = kc // t
        inside &= (key_tile[None, :] >= start[:, None]) & (key_tile[None, :] < start[:, None] + span)
    return inside


# ---------------------------------------------------------------------------
# kernels


@dataclass(frozen=True)
class TileIndex:
    """Gather indices of a tiled window over ``num_tokens`` tokens.

    ``order``: the tokens in tile order (``None`` when that is the token order, ``tiles1d``);
    ``keys``: per query tile, the tokens of the tiles it sees (``tiles × seen × tile``), in
    tile order (``None`` when every tile sees only itself: the keys are the queries' tiles);
    ``inverse``: where each token sits in tile order; ``text``: keys every tile sees besides
    its tiles (an arrow window's text tokens, at the end of each tile's ``keys``).
    """

    tiles: int  # query tiles
    tile: int  # tokens per tile
    seen: int  # key tiles per query tile
    order: torch.Tensor | None
    keys: torch.Tensor | None
    inverse: torch.Tensor | None
    text: int = 0

    @property
    def device(self) -> torch.device:
        return next((t.device for t in (self.order, self.keys) if t is not None), torch.device("cpu"))

    def to(self, device: torch.device) -> TileIndex:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TileIndex(
            self.tiles, self.tile, self.seen, move(self.order), move(self.keys), move(self.inverse), self.text
        )


@functools.lru_cache(maxsize=64)
def tile_index(window: Tiles1d | Tiles2d | Tiles3d, num_tokens: int, device: torch.device | None = None) -> TileIndex:
    """The gather indices of ``window`` on ``device`` (cached per geometry and device), built
    from the per-axis rule of ``schemas.windows`` (``tile_start``/``tile_span``)."""
    if device is not None and device != torch.device("cpu"):
        return tile_index(window, num_tokens).to(device)
    grid, tile = dims(window, num_tokens)
    counts = [g // t for g, t in zip(grid, tile)]
    # token id of (tile coordinates..., offset coordinates...) on the row-major grid
    axes = len(grid)
    ids = torch.arange(num_tokens).view(*(x for g, t in zip(grid, tile) for x in (g // t, t)))
    ids = ids.permute(*range(0, 2 * axes, 2), *range(1, 2 * axes, 2)).reshape(*counts, math.prod(tile))
    # per axis, the key tiles each query tile sees
    seen_axis = [
        torch.tensor([[tile_start(a, n, window.k) + s for s in range(tile_span(n, window.k))] for a in range(n)])
        for n in counts
    ]
    grids = torch.meshgrid(*[torch.arange(n) for n in counts], indexing="ij")  # query tile coordinates
    spans = [len(s[0]) for s in seen_axis]
    key_tiles = []  # per axis: [query tiles..., seen tiles...] key tile coordinate
    for axis, (coords, seen) in enumerate(zip(grids, seen_axis)):
        picked = seen[coords]  # [*counts, span_axis]
        shape = [1] * axes
        shape[axis] = spans[axis]
        key_tiles.append(picked.reshape(*counts, *shape).expand(*counts, *spans))
    keys = ids[tuple(key_tiles)]  # [*counts, *spans, tile tokens]
    tiles, seen_count = math.prod(counts), math.prod(spans)
    order = ids.reshape(-1)
    key_ids = None if seen_count == 1 else keys.reshape(-1)  # one tile: its own tokens
    if isinstance(window, Tiles1d):
        return TileIndex(tiles, math.prod(tile), seen_count, None, key_ids, None)
    return TileIndex(tiles, math.prod(tile), seen_count, order, key_ids, torch.argsort(order))


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, tokens, dim]`` as ``[batch, tokens, heads * dim]``: a view in the layout
    the processor makes q/k/v in (``[batch, tokens, heads, dim]`` transposed), else a copy."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


Scratch = Callable[[str, tuple[int, ...], torch.Tensor], torch.Tensor]


def _gather(rows: torch.Tensor, index: torch.Tensor | None, role: str, scratch: Scratch | None) -> torch.Tensor:
    """``rows[:, index]`` (``rows`` itself for ``None``), into ``scratch``'s buffer when given."""
    if index is None:
        return rows
    if scratch is None:
        return rows.index_select(1, index)
    out = scratch(role, (rows.shape[0], index.numel(), rows.shape[2]), rows)
    return torch.index_select(rows, 1, index, out=out)


def tiled_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: TileIndex, scratch: Scratch | None = None
) -> torch.Tensor:
    """Exact tiled window attention: queries in tile order, each tile's keys and values
    gathered into one slab, one unmasked SDPA call with the tiles folded into the batch.
    ``k`` and ``v`` may hold more tokens than ``q`` (an arrow's joint sequence): the
    index's ``keys`` say which of them each tile sees.

    Tokens are gathered as whole rows of ``heads * dim`` values, and every tensor SDPA
    sees is in the processor's ``[batch, tokens, heads, dim]`` layout, as full attention's.
    ``scratch(role, shape, like)``, when given, provides the buffers of the gathered
    queries, keys and values (never the output).
    """
    b, h, n, d = q.shape
    dv = v.shape[-1]
    t, tiles, keys = index.tile, index.tiles, index.tile * index.seen + index.text
    q_tiles = _gather(_token_rows(q), index.order, "q", scratch)
    key_index = index.order if index.keys is None else index.keys
    k_tiles = _gather(_token_rows(k), key_index, "k", scratch)
    v_tiles = _gather(_token_rows(v), key_index, "v", scratch)
    q_tiles = q_tiles.reshape(b * tiles, t, h, d).transpose(1, 2)
    k_tiles = k_tiles.view(b * tiles, keys, h, d).transpose(1, 2)
    v_tiles = v_tiles.view(b * tiles, keys, h, dv).transpose(1, 2)
    out = full_attention(q_tiles, k_tiles, v_tiles).transpose(1, 2).reshape(b, n, h * dv)
    if index.inverse is not None:
        out = out.index_select(1, index.inverse)
    return out.view(b, n, h, dv).transpose(1, 2)


class TiledKernel:
    """A tiled window bound to a layer: its gather indices, moved to the inputs' device once.

    On the CPU (eager, without autograd) the gathered queries, keys and values go into
    buffers kept between calls: a fresh allocation of that size costs more in page faults
    than the gather itself (``bench/RESULTS.md``). The output is always a new tensor.
    """

    def __init__(self, window: Tiles1d | Tiles2d | Tiles3d, num_tokens: int) -> None:
        self.window, self.num_tokens = window, num_tokens
        self.index = self.index_on(None)
        self._buffers: dict[str, torch.Tensor] = {}

    def index_on(self, device: torch.device | None) -> TileIndex:
        """The gather indices on ``device``."""
        return tile_index(self.window, self.num_tokens, device)

    def _scratch(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        need = math.prod(shape)
        buffer = self._buffers.get(role)
        if buffer is None or buffer.numel() < need or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffers[role] = torch.empty(need, dtype=like.dtype, device=like.device)
        return buffer[:need].view(shape)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[-2] != self.num_tokens:
            raise PlanError(
                f"window {window_name(self.window)}: fits {self.num_tokens} tokens, the layer runs {q.shape[-2]}"
            )
        if self.index.device != q.device:
            self.index = self.index_on(q.device)
        reuse = (
            q.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
        )
        return tiled_window_attention(q, k, v, self.index, self._scratch if reuse else None)


class DenseKernel:
    """Any window as one dense N x N mask (cached per device): the plain, O(N^2) kernel."""

    def __init__(self, window: WindowShape, num_tokens: int) -> None:
        self.window, self.num_tokens = window, num_tokens
        self.mask: torch.Tensor | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = q.shape[-2]
        if self.mask is None or self.mask.shape[0] != n or self.mask.device != q.device:
            idx = torch.arange(n, device=q.device)
            self.mask = shape_of(self.window).mask(idx, idx, self.window, n)
        return full_attention(q, k, v, self.mask)


# ---------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class Shape:
    """One window shape: its index function, its exact pair count and its bound kernels."""

    name: str
    mask: Mask
    bind: Callable[[WindowShape, int, str], BoundKernel]

    @staticmethod
    def pairs(window: WindowShape, num_tokens: int) -> int:
        return window_pairs(num_tokens, window)


def _bind_band(window: int, num_tokens: int, kernel: str) -> BoundKernel:
    return functools.partial(resolve_window_kernel(kernel), window=window)


def _bind_tiles(window: Tiles1d | Tiles2d | Tiles3d, num_tokens: int, kernel: str) -> BoundKernel:
    resolve_window_kernel(kernel)  # refuses unknown names
    return DenseKernel(window, num_tokens) if kernel == "dense" else TiledKernel(window, num_tokens)


SHAPES: dict[str, Shape] = {
    "band": Shape("band", band_mask, _bind_band),
    "tiles1d": Shape("tiles1d", tiles_mask, _bind_tiles),
    "tiles2d": Shape("tiles2d", tiles_mask, _bind_tiles),
    "tiles3d": Shape("tiles3d", tiles_mask, _bind_tiles),
}


def shape_of(window: WindowShape) -> Shape:
    """The registry entry of ``window``: ``band`` for an integer, else its ``kind``."""
    return SHAPES[window.__struct_config__.tag if isinstance(window, TILED) else "band"]


def mask(window: WindowShape, num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The dense ``[N, N]`` boolean mask of ``window`` over ``num_tokens`` tokens."""
    idx = torch.arange(num_tokens, device=device)
    return shape_of(window).mask(idx, idx, window, num_tokens)


def bind_window(
    window: WindowShape, num_tokens: int | None, kernel: str = "auto", field: str = "$.window"
) -> BoundKernel:
    """The kernel of ``window`` on a layer of ``num_tokens`` tokens, resolved once.

    ``kernel`` names the band's kernel (``KERNELS``); a tiled window runs its gathered
    kernel for every name but ``dense`` (one masked call). A tiled window that does not
    fit the layer is a ``PlanError`` naming ``field``.
    """
    check_fits(window, num_tokens, kernel, field)
    return shape_of(window).bind(window, num_tokens or 0, kernel)


def check_fits(window: WindowShape, num_tokens: int | None, kernel: str, field: str) -> None:
    """Refuse an unknown kernel name (``ValueError``) or a tiled window that does not fit
    a layer of ``num_tokens`` tokens (``PlanError`` naming ``field``)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: unknown window kernel {kernel!r}; choose from {KERNELS}")
    if isinstance(window, TILED):
        if num_tokens is None:
            raise PlanError(f"{field}: a tiled window needs the layer's token count")
        problem = tiles_problem(window, num_tokens)
        if problem is not None:
            raise PlanError(f"{field}.{problem}")
