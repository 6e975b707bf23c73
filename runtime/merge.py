"""Refresh attention: the full output and the window's, for about the cost of one full attention.

A ``wars`` residual is refreshed at a full step as ``R = full - window``. Computing the two
separately costs full attention plus the window. Here every (query, key) pair is computed
once: the window's keys give the window output ``o_w`` with its log-sum-exp ``lse_w``, the
keys outside the window (the complement) give ``o_c`` and ``lse_c``, and the full output is
their merge (``merge``)::

    full = (e^lse_w o_w + e^lse_c o_c) / (e^lse_w + e^lse_c) = o_w + sigmoid(lse_c - lse_w) (o_c - o_w)

accumulated in float32 (float64 for float64 inputs). A query with no key outside its window
has ``lse_c = -inf``: its full output is its window output.

Per window shape (``runtime/windows.py``'s registry names, ``REFRESH``):

- ``band`` w: queries in chunks of ``c`` (``refresh_chunk``), all chunks of a part in one
  batched call (``BandRefresh``): the window, each chunk over its ``c + 2w`` keys with the
  band's mask; the complement, which for query ``i`` is the cyclic run of keys
  ``i + w + 1 … i + N - w - 1`` plus, near the ends, the keys that run leaves for a clipped
  window. Pairs computed per query: about ``N + 2c``, in five calls.
- ``tiles1d/2d/3d`` (``TiledRefresh``): queries in tile order; the window, every tile over
  its gathered window keys (slices for ``tiles1d``); the complement (every key tile a
  query tile does not see: the same count for every tile) in two parts, the tiles outside
  the query's first-axis span, one run of the keys in tile order read cyclically and
  shared by the whole first-axis row, and the rest, gathered (none for ``tiles1d``)
  (``ComplementIndex``).

The log-sum-exp comes from the fused kernels (``attention_lse``): on the CPU
``aten._scaled_dot_product_flash_attention_for_cpu``, on CUDA
``aten._scaled_dot_product_flash_attention`` (float16/bfloat16 without a mask) or
``aten._scaled_dot_product_efficient_attention(compute_log_sumexp=True)``, elsewhere a
plain math path. A window that covers every key is one full attention call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.kernels import full_attention
from runtime.windows import TileIndex, shape_of, tile_index
from schemas import PlanError, Tiles1d, Tiles2d, Tiles3d, WindowShape, window_name
from schemas.windows import TILED, dims, tile_span, tile_start, tiles_problem

Part = tuple[torch.Tensor, torch.Tensor]  # (output [..., L, Dv] in q's dtype, lse [..., L] float32/64)
RefreshKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

GROUP_ELEMENTS = {"cpu": 2**25, "cuda": 2**28}  # gathered keys of one group of tiles, in elements
_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------
# attention with its log-sum-exp


def merge_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where outputs are merged: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _math_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, causal: bool) -> Part:
    """Plain attention with its log-sum-exp, in ``merge_dtype``; a row that sees no key has
    output 0 and log-sum-exp ``-inf``."""
    acc = merge_dtype(q.dtype)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.to(acc)
    if causal:
        lq, lk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)
    weights = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # -inf rows: 0
    return (weights @ v.to(acc)).to(q.dtype), lse


def _cuda_bias(bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """An additive mask as the efficient kernel reads it: 4D, its rows 16-element aligned."""
    lq, lk = bias.shape[-2:]
    pad = -lk % 16
    if pad:
        bias = F.pad(bias, (0, pad))[..., :lk]
    return bias.expand(q.shape[0], q.shape[1], lq, lk)


def _fused_backend(q: torch.Tensor, masked: bool) -> str:
    """``cpu_flash``, ``cuda_flash``, ``cuda_efficient`` or ``math`` for ``q``'s device and dtype."""
    dim = q.shape[-1]
    if q.device.type == "cpu":
        return "cpu_flash" if q.dtype in (torch.float32, torch.float64, *_HALF) else "math"
    if q.device.type == "cuda" and dim % 8 == 0 and q.stride(-1) == 1:
        if q.dtype in _HALF and not masked and dim <= 256:
            return "cuda_flash"
        if q.dtype in (torch.float32, *_HALF):
            return "cuda_efficient"
    return "math"


def attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    backend: str = "auto",
) -> Part:
    """``softmax(q k^T / sqrt(d) + bias) v`` over ``[batch, heads, tokens, dim]`` and its
    log-sum-exp ``[batch, heads, queries]`` (float32, float64 for float64 inputs).

    ``bias``: an additive ``[queries, keys]`` mask (0 or ``-inf``), in ``q``'s dtype; ``causal``:
    query ``r`` sees keys ``0 … r`` (top-left aligned). ``k`` must hold at least one key, and
    every query must see one (the fused kernels report a wrong log-sum-exp otherwise).
    ``backend`` (``auto``: the fused kernel of the device) is ``math`` in tests.
    """
    if k.shape[-2] == 0:
        raise ValueError("attention_lse: no keys")
    if bias is not None and causal:
        raise ValueError("attention_lse: a mask or causal, not both")
    name = _fused_backend(q, bias is not None) if backend == "auto" else backend
    if name == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=None if bias is None else bias.to(q.dtype)
        )
    elif name == "cuda_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)[:2]
    elif name == "cuda_efficient":
        mask = None if bias is None else _cuda_bias(bias.to(q.dtype), q, k)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, mask, True, 0.0, causal)[:2]
        lse = lse[..., : q.shape[-2]]
    elif name == "math":
        return _math_lse(q, k, v, bias, causal)
    else:
        raise ValueError(f"attention_lse: unknown backend {name!r}")
    return out, lse.to(merge_dtype(q.dtype))


def merge(base: Part, other: Part) -> Part:
    """Two attentions of the same queries over disjoint keys, merged into the attention over
    their union, in ``merge_dtype`` (``base`` must see a key on every row; ``other`` may see
    none, ``lse = -inf``: the row is ``base``'s)."""
    o, lse = base[0].to(merge_dtype(base[0].dtype), copy=True), base[1].to(merge_dtype(base[0].dtype), copy=True)
    accumulate(o, lse, other)
    return o, lse


def accumulate(o: torch.Tensor, lse: torch.Tensor, part: Part) -> None:
    """``merge`` in place: ``(o, lse)`` (in ``merge_dtype``) becomes their merge with ``part``."""
    o2, l2 = part
    share = torch.sigmoid(l2.to(lse.dtype) - lse)  # e^l2 / (e^lse + e^l2), 0 where l2 = -inf
    o.lerp_(o2.to(o.dtype), share.unsqueeze(-1))
    lse.copy_(torch.logaddexp(lse, l2.to(lse.dtype)))


def _reuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether gather buffers may be kept between calls: the CPU, eager, without autograd."""
    return (
        q.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    )


class _Buffers:
    """Gather buffers kept between calls (on the CPU, eager, without autograd: ``_reuse``), as
    ``TiledKernel``'s: a fresh tensor of that size costs more in page faults than the gather
    itself (``bench/RESULTS.md``). Outputs never live in them."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def _scratch(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        need = math.prod(shape)
        buffer = self._buffers.get(role)
        if buffer is None or buffer.numel() < need or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffers[role] = torch.empty(need, dtype=like.dtype, device=like.device)
        return buffer[:need].view(shape)

    def _pick(self, x: torch.Tensor, index: torch.Tensor, role: str, reuse: bool) -> torch.Tensor:
        """``x[:, :, index]`` of ``[batch, heads, tokens, dim]``, each head's tokens contiguous,
        as ``[batch * heads, len(index), dim]`` (into ``role``'s buffer when ``reuse``)."""
        b, h, _, dim = x.shape
        if reuse:
            out = torch.index_select(x, 2, index, out=self._scratch(role, (b, h, len(index), dim), x))
        else:
            out = x.index_select(2, index)
        return out.view(b * h, len(index), dim)


def _full_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = full_attention(q, k, v)
    return out, out


# ---------------------------------------------------------------------------
# band


def refresh_chunk(num_tokens: int, window: int) -> int:
    """Query-chunk length of the band's refresh: ``N/16`` within 64 … 256 (at most ``N``).

    All chunks of a part run in one batched call, so short chunks cost no extra calls, but a
    chunk of ``c`` queries computes about ``2c`` pairs per query more than its band and its
    complement hold, and reads every key once per chunk: at 4096 tokens on the CPU, 64, 128
    and 256 ran within a few percent of each other, 256 ahead."""
    return min(num_tokens, max(64, min(256, num_tokens // 16)))


def _slabs(x: torch.Tensor, first: int, count: int, step: int, length: int) -> torch.Tensor:
    """``count`` overlapping slabs of ``length`` tokens of ``x`` (``[rows, tokens, dim]``,
    contiguous), the ``j``-th from token ``first + j * step``: ``[rows, count, length, dim]``."""
    rows, tokens, dim = x.shape
    offset = x.storage_offset() + first * dim
    return x.as_strided((rows, count, length, dim), (tokens * dim, step * dim, dim, 1), offset)


class BandRefresh(_Buffers):
    """The band ``|i - j| <= window``'s refresh on layers of ``num_tokens`` tokens.

    Every part is one batched call over query chunks of ``c`` (the chunks folded into the
    heads' axis; keys and values as overlapping slabs of one extended copy
    ``x[t] = x[(t - w) mod N]``, so chunk ``j``'s slab starts at ``t = j c + offset``):

    - window: each chunk over its ``c + 2w`` keys (``t`` from ``j c``) with the band's mask;
      the chunks whose keys leave ``[0, N)`` in a second and third call, those masked too.
    - complement: query ``i``'s keys outside the band are the cyclic run
      ``t = i + 2w + 1 … i + N - 1`` (``N - 2w - 1`` keys), so chunk ``j``'s are a run of
      ``N - 2w - 2 + c`` from ``j c + 2w + 1`` with a banded mask: one call, no boundary case.
    - near the ends a clipped window leaves keys that the cyclic run does not hold: those
      the extended copy puts in the window's place (``t < w``, ``t >= N + w``), outside the
      band; one call each over the chunks that have them.
    """

    def __init__(self, window: int, num_tokens: int | None, chunk: int | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.window, self.num_tokens, self.chunk, self.backend = window, num_tokens, chunk, backend
        self._masks: dict[tuple[str, int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def _bias(self, kind: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """Additive masks, cached: query ``r`` of a chunk sees slab keys ``r … r + 2w`` (``band``),
        ``r … r + cols - rows`` (``run``) or ``r …`` (``upper``)."""
        key = (kind, rows, cols, like.device, like.dtype)
        bias = self._masks.get(key)
        if bias is None:
            r = torch.arange(rows, device=like.device)[:, None]
            m = torch.arange(cols, device=like.device)[None, :]
            reach = {"band": 2 * self.window, "run": cols - rows, "upper": cols}[kind]
            inside = (m >= r) & (m <= r + reach)
            bias = torch.zeros(rows, cols, dtype=like.dtype, device=like.device).masked_fill(~inside, float("-inf"))
            self._masks[key] = bias
        return bias

    def _edge_bias(self, band: torch.Tensor, j0: int, j1: int, c: int, n: int) -> torch.Tensor:
        """``band`` for window chunks ``j0 … j1 - 1`` whose slabs leave ``[0, n)``, those keys
        masked too (padded queries, past ``n``, see every slab key): ``[1, chunks, c, c + 2w]``."""
        chunk = c * torch.arange(j0, j1, device=band.device)[:, None]
        key = chunk - self.window + torch.arange(band.shape[1], device=band.device)  # [chunks, c + 2w]
        row = chunk + torch.arange(c, device=band.device)  # [chunks, c]
        off = band.new_zeros(key.shape).masked_fill((key < 0) | (key >= n), float("-inf"))
        return (band + off[:, None, :]).masked_fill((row >= n)[:, :, None], 0.0)[None]

    def _wrap_bias(
        self, j0: int, j1: int, c: int, start: int, size: int, n: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask of window chunks ``j0 … j1 - 1`` over the wrapped keys ``kx[start : start + size]``
        (query ``i`` sees those of its cyclic window outside its band) and whether each query
        sees one: ``[1, chunks, c, size]``, ``[1, chunks, c]``."""
        i = c * torch.arange(j0, j1, device=like.device)[:, None, None] + torch.arange(c, device=like.device)[:, None]
        t = start + torch.arange(size, device=like.device)
        w = self.window
        # kx[t] is key t - w + n before the keys, t - w - n after; when 2w + 1 >= n the cyclic
        # window reaches past the band's other side, so keep only keys outside the band
        if start == 0:
            inside = (t >= i) & (t - w + n > i + w)
        else:
            inside = (t <= i + 2 * w) & (t - w - n < i - w)
        inside = inside & (i < n)
        bias = torch.zeros(inside.shape, dtype=like.dtype, device=like.device).masked_fill(~inside, float("-inf"))
        seen = inside.any(-1)
        return bias.masked_fill(~seen[..., None], 0.0)[None], seen[None]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, w = q.shape[-2], self.window
        if self.num_tokens is not None and n != self.num_tokens:
            raise PlanError(f"window {window_name(w)}: bound to {self.num_tokens} tokens, the layer runs {n}")
        if w >= n - 1:
            return _full_only(q, k, v)
        attend = functools.partial(attention_lse, backend=self.backend)
        b, h, _, d = q.shape
        dv, bh, acc = v.shape[-1], b * h, merge_dtype(q.dtype)
        outside = n - 2 * w - 1  # keys outside each query's window
        c = min(self.chunk or refresh_chunk(n, w), n)
        chunks = -(-n // c)
        # keys and values once, each head's tokens contiguous, extended cyclically: x[t] = x[(t - w) mod n]
        length = chunks * c + max(2 * w, n)
        cyclic = (torch.arange(length, device=q.device) - w) % n
        reuse = _reuse(q, k, v)
        kx, vx = self._pick(k, cyclic, "k", reuse), self._pick(v, cyclic, "v", reuse)

        # queries once, each head's tokens contiguous, in chunks (zeros past n): [bh, chunks, c, d]
        qp = self._scratch("q", (b, h, chunks * c, d), q) if reuse else q.new_empty((b, h, chunks * c, d))
        qp[..., :n, :] = q
        qp[..., n:, :] = 0
        qw = qp.view(bh, chunks, c, d)

        def tokens(x: torch.Tensor) -> torch.Tensor:  # [bh, chunks, c, ...] -> [b, h, n, ...]
            return x.reshape(b, h, -1, *x.shape[3:])[:, :, :n]

        # window
        o_w = q.new_empty((bh, chunks, c, dv))
        lse = torch.empty((bh, chunks, c), dtype=acc, device=q.device)
        band = self._bias("band", c, c + 2 * w, q)
        first, stop = -(-w // c), max(-(-w // c), (n - w) // c)  # chunks whose keys lie in [0, n)
        for j0, j1, inner in ((0, min(first, chunks), False), (first, stop, True), (stop, chunks, False)):
            if j1 <= j0:
                continue
            bias = band if inner else self._edge_bias(band, j0, j1, c, n)
            keys, values = _slabs(kx, j0 * c, j1 - j0, c, c + 2 * w), _slabs(vx, j0 * c, j1 - j0, c, c + 2 * w)
            part = attend(qw[:, j0:j1], keys, values, bias)
            o_w[:, j0:j1], lse[:, j0:j1] = part
        window = tokens(o_w)
        o, lse = tokens(o_w.to(acc, copy=True)), tokens(lse)

        # near the ends, the keys the cyclic frame puts where a clipped window would be
        # (kx[t] for t < w and t >= n + w): outside the window, so complement keys
        for j0, j1, start in ((0, min(first, chunks), 0), (max(0, (n - w) // c), chunks, n + w)):
            size = w if start == 0 else chunks * c + w - n
            if j1 <= j0 or w == 0 or size <= 0:
                continue
            bias, seen = self._wrap_bias(j0, j1, c, start, size, n, q)
            keys, values = _slabs(kx, start, j1 - j0, 0, size), _slabs(vx, start, j1 - j0, 0, size)
            o_x, lse_x = attend(qw[:, j0:j1], keys, values, bias)
            o_x, lse_x = o_x.masked_fill(~seen[..., None], 0.0), lse_x.to(acc).masked_fill(~seen, float("-inf"))
            rows = slice(j0 * c, min(n, j1 * c))
            part = (tokens(o_x)[..., : rows.stop - rows.start, :], tokens(lse_x)[..., : rows.stop - rows.start])
            accumulate(o[..., rows, :], lse[..., rows], part)

        # complement, in the cyclic frame: query i's keys are t = i + 2w + 1 … i + n - 1 of kx, so
        # chunk j's are a run from j * c + 2w + 1 with a banded mask
        # (every chunk query sees the run's middle: no mask there, the fused kernels run it faster)
        if outside - 1 >= c:
            upper = self._bias("upper", c, c, q)
            runs = [(0, c, dict(bias=upper)), (c, outside - 1 - c, {}), (outside - 1, c, dict(causal=True))]
        else:
            runs = [(0, outside - 1 + c, dict(bias=self._bias("run", c, outside - 1 + c, q)))] if outside > 0 else []
        for offset, size, how in runs:
            if size > 0:
                keys, values = (_slabs(x, 2 * w + 1 + offset, chunks, c, size) for x in (kx, vx))
                part = attend(qw, keys, values, **how)
                accumulate(o, lse, (tokens(part[0]), tokens(part[1])))
        full = o.to(q.dtype)
        return full, window


# ---------------------------------------------------------------------------
# tiles


@dataclass(frozen=True)
class ComplementIndex:
    """Where a tiled window's complement lies, for the query tiles in ``TileIndex``'s tile order.

    Tile order is row-major over tile coordinates, so the query tiles of one first-axis row
    ``r`` are the ``per_row`` consecutive tiles from ``r * per_row``. The key tiles a query
    tile does not see split along the first axis: ``far``, those outside its first-axis
    span, are one run of ``far_len`` tokens of the tile order read cyclically, shared by the
    whole row (it starts at ``far[r]`` in ``doubled``, the tile order twice); ``near``, those
    inside the span but outside along another axis, are ``[tiles, near_len]`` tokens to
    gather (``None`` when there are none: ``tiles1d``). ``windows``: per query tile, the
    token range of its window keys when that is contiguous for every tile (``tiles1d``).
    """

    rows: int
    per_row: int
    far: tuple[int, ...]
    far_len: int
    near: torch.Tensor | None
    doubled: torch.Tensor
    windows: tuple[tuple[int, int], ...] | None

    @property
    def near_len(self) -> int:
        return 0 if self.near is None else self.near.shape[1]

    def to(self, device: torch.device) -> ComplementIndex:
        near = None if self.near is None else self.near.to(device)
        return ComplementIndex(
            self.rows, self.per_row, self.far, self.far_len, near, self.doubled.to(device), self.windows
        )


@functools.lru_cache(maxsize=64)
def complement_index(
    window: Tiles1d | Tiles2d | Tiles3d, num_tokens: int, device: torch.device | None = None
) -> ComplementIndex | None:
    """The complement of ``window`` over ``num_tokens`` tokens (cached per geometry and
    device); ``None`` when every query tile sees every key."""
    if device is not None and device != torch.device("cpu"):
        found = complement_index(window, num_tokens)
        return None if found is None else found.to(device)
    index = tile_index(window, num_tokens)
    if index.seen * index.tile == num_tokens:
        return None
    n, t, tiles = num_tokens, index.tile, index.tiles
    grid, tile = dims(window, n)
    rows = grid[0] // tile[0]
    per_row, span = tiles // rows, tile_span(rows, window.k)
    starts = torch.tensor([tile_start(r, rows, window.k) for r in range(rows)])
    far = tuple(int(start + span) * per_row * t for start in starts)
    order = index.order if index.order is not None else torch.arange(n)
    keys = (index.keys if index.keys is not None else order).view(tiles, -1)
    outside = torch.ones(tiles, n, dtype=torch.bool)
    outside.scatter_(1, keys, False)
    token_row = torch.arange(n) // (n // grid[0]) // tile[0]  # first-axis tile of each token
    start = starts[torch.arange(tiles) // per_row, None]
    near_mask = outside & (token_row >= start) & (token_row < start + span)
    near_len = n - index.seen * t - (rows - span) * per_row * t
    near = near_mask.nonzero()[:, 1].view(tiles, near_len) if near_len else None
    contiguous = index.order is None and bool((keys.diff(dim=1) == 1).all())  # slices of the tile order
    windows = tuple((int(row[0]), int(row[-1]) + 1) for row in keys) if contiguous else None
    return ComplementIndex(rows, per_row, far, (rows - span) * per_row * t, near, torch.cat([order, order]), windows)


def _runs(starts: list[int]) -> list[tuple[int, int, int, int]]:
    """Consecutive rows whose slab starts step evenly, as ``(first row, stop row, start, step)``:
    clamped neighbourhoods give at most three (the borders' constant, the interior's)."""
    runs: list[tuple[int, int, int, int]] = []
    row = 0
    while row < len(starts):
        step = starts[row + 1] - starts[row] if row + 1 < len(starts) else 0
        stop = row + 1
        while stop < len(starts) and starts[stop] - starts[stop - 1] == step:
            stop += 1
        runs.append((row, stop, starts[row], step))
        row = stop
    return runs


class TiledRefresh(_Buffers):
    """A tiled window's refresh on layers of ``num_tokens`` tokens, in tile order with each
    head's tokens contiguous and the tiles (or first-axis rows) folded into the heads' axis:

    - window: the gathered window slabs of every tile, one call per group of tiles
      (``tiles1d``: slices of the keys, one call per run of evenly stepping starts);
    - far complement: per first-axis row, its run of the keys in tile order doubled, one call
      per run of rows (``_runs``: at most three);
    - near complement: the gathered ``near`` slabs, one call per group of tiles.

    ``group_elements`` bounds a group's gathered keys (default ``GROUP_ELEMENTS``).
    """

    def __init__(
        self,
        window: Tiles1d | Tiles2d | Tiles3d,
        num_tokens: int,
        group_elements: int | None = None,
        backend: str = "auto",
    ) -> None:
        problem = tiles_problem(window, num_tokens)
        if problem is not None:
            raise PlanError(f"window {window_name(window)}: {problem}")
        self.window, self.num_tokens = window, num_tokens
        self.group_elements, self.backend = group_elements, backend
        self.index: TileIndex = tile_index(window, num_tokens)
        self.complement: ComplementIndex | None = complement_index(window, num_tokens)
        super().__init__()

    def group(self, batch: int, row_elements: int, device: torch.device) -> int:
        """Query tiles per call: their gathered window and near keys within the budget."""
        budget = self.group_elements or GROUP_ELEMENTS.get(device.type, GROUP_ELEMENTS["cpu"])
        per_tile = batch * (self.index.seen * self.index.tile + self.complement.near_len) * row_elements
        return max(1, min(self.index.tiles, budget // max(1, per_tile)))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = q.shape[-2]
        if n != self.num_tokens:
            raise PlanError(f"window {window_name(self.window)}: fits {self.num_tokens} tokens, the layer runs {n}")
        if self.complement is None:
            return _full_only(q, k, v)
        if self.complement.doubled.device != q.device:
            self.index = tile_index(self.window, n, q.device)
            self.complement = complement_index(self.window, n, q.device)
        index, comp = self.index, self.complement
        reuse = _reuse(q, k, v)
        attend = functools.partial(attention_lse, backend=self.backend)
        b, h, _, d = q.shape
        dv, bh, acc = v.shape[-1], b * h, merge_dtype(q.dtype)
        t, tiles, seen = index.tile, index.tiles, index.seen

        pick = functools.partial(self._pick, reuse=reuse)
        # queries in tile order, keys and values in tile order twice
        qt = (q.contiguous() if index.order is None else pick(q, index.order, "q")).view(bh, n, d)
        k2, v2 = pick(k, comp.doubled, "k2"), pick(v, comp.doubled, "v2")
        o_w = q.new_empty((bh, tiles, t, dv))
        lse = torch.empty((bh, tiles, t), dtype=acc, device=q.device)
        q_tiles = qt.view(bh, tiles, t, d)
        per_call = self.group(b, h * max(d, dv), q.device)

        # window
        if comp.windows is not None:  # slices of the keys (in tile order = token order)
            for a0, a1, start, step in _runs([lo for lo, _ in comp.windows]):
                keys, values = (_slabs(x, start, a1 - a0, step, seen * t) for x in (k2, v2))
                o_w[:, a0:a1], lse[:, a0:a1] = attend(q_tiles[:, a0:a1], keys, values)
        else:
            keys = (index.keys if index.keys is not None else index.order).view(tiles, seen * t)
            for a0 in range(0, tiles, per_call):
                a1 = min(tiles, a0 + per_call)
                idx = keys[a0:a1].reshape(-1)
                kw = pick(k, idx, "kw").view(bh, a1 - a0, seen * t, d)
                vw = pick(v, idx, "vw").view(bh, a1 - a0, seen * t, dv)
                o_w[:, a0:a1], lse[:, a0:a1] = attend(q_tiles[:, a0:a1], kw, vw)
        o = o_w.to(acc, copy=True)

        # near complement (gathered)
        if comp.near is not None:
            for a0 in range(0, tiles, per_call):
                a1 = min(tiles, a0 + per_call)
                idx = comp.near[a0:a1].reshape(-1)
                kn = pick(k, idx, "kn").view(bh, a1 - a0, comp.near_len, d)
                vn = pick(v, idx, "vn").view(bh, a1 - a0, comp.near_len, dv)
                accumulate(o[:, a0:a1], lse[:, a0:a1], attend(q_tiles[:, a0:a1], kn, vn))

        # far complement: one run of the doubled keys per first-axis row
        if comp.far_len:
            rows_q = qt.view(bh, comp.rows, comp.per_row * t, d)
            o_rows, lse_rows = o.view(bh, comp.rows, comp.per_row * t, dv), lse.view(bh, comp.rows, comp.per_row * t)
            for r0, r1, start, step in _runs(list(comp.far)):
                keys, values = (_slabs(x, start, r1 - r0, step, comp.far_len) for x in (k2, v2))
                accumulate(o_rows[:, r0:r1], lse_rows[:, r0:r1], attend(rows_q[:, r0:r1], keys, values))

        # back to token order, [b, h, n, dv]
        full, window = o.view(b, h, n, dv).to(q.dtype), o_w.view(b, h, n, dv)
        if index.inverse is not None:
            full, window = full.index_select(2, index.inverse), window.index_select(2, index.inverse)
        return full, window


# ---------------------------------------------------------------------------
# the registry


def _bind_band(window: int, num_tokens: int | None) -> RefreshKernel:
    return BandRefresh(window, num_tokens)


def _bind_tiles(window: Tiles1d | Tiles2d | Tiles3d, num_tokens: int | None) -> RefreshKernel:
    if num_tokens is None:
        raise PlanError(f"window {window_name(window)}: a tiled window needs the layer's token count")
    return TiledRefresh(window, num_tokens)


REFRESH: dict[str, Callable[[WindowShape, int | None], RefreshKernel]] = {
    "band": _bind_band,
    "tiles1d": _bind_tiles,
    "tiles2d": _bind_tiles,
    "tiles3d": _bind_tiles,
}


def bind_refresh(window: WindowShape, num_tokens: int | None) -> RefreshKernel:
    """The refresh of ``window`` on a layer of ``num_tokens`` tokens, resolved once: the
    callable takes ``(q, k, v)`` in ``[batch, heads, tokens, head_dim]`` and returns
    ``(full, window)`` outputs (the same tensor twice when the window covers every key)."""
    return REFRESH[shape_of(window).name](window, num_tokens)


def refresh_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: WindowShape, num_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(full attention, window attention)`` of ``q, k, v`` for about the cost of full
    attention alone (``bind_refresh`` once per layer keeps the CPU's gather buffers)."""
    if isinstance(window, TILED) and num_tokens is None:
        num_tokens = q.shape[-2]
    return bind_refresh(window, num_tokens)(q, k, v)
