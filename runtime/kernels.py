"""Exact attention kernels: full attention and the band's (window) kernels.

The band is one function of (query, key) indices, ``window_mask``; every band kernel
computes exactly ``softmax(q k^T / sqrt(d) + mask) v`` restricted to it. The registry of
window shapes, the tiled ones and their kernel included, is ``runtime/windows.py``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

KERNELS = ("auto", "chunked", "flex", "dense")


def window_mask(q_idx: torch.Tensor, k_idx: torch.Tensor, window: int) -> torch.Tensor:
    """Boolean mask, True where query ``i`` may see key ``j``: ``|i - j| <= window``."""
    return (q_idx[:, None] - k_idx[None, :]).abs() <= window


def full_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Ordinary attention over ``[batch, heads, tokens, head_dim]`` tensors."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0)


def dense_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
) -> torch.Tensor:
    """Window attention with one dense N x N mask: simple, O(N^2) work."""
    n = q.shape[-2]
    if window >= n - 1:
        return full_attention(q, k, v)
    idx = torch.arange(n, device=q.device)
    return full_attention(q, k, v, window_mask(idx, idx, window))


def chunk_size(num_tokens: int, window: int) -> int:
    """Query-chunk length for the banded kernel: a chunk of c queries reads c + 2w keys.

    Half the window keeps the wasted pairs near a quarter of the band's while chunks stay
    long enough for SDPA to run at full speed (measured in ``bench/RESULTS.md``).
    """
    return min(num_tokens, max(64, window // 2))


def chunked_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Window attention in query chunks, each over the key slab its band needs.

    Work is about ``N * (c + 2w)`` pairs instead of ``N^2``; the result is exact.
    ``extra`` (keys, values), when given, are seen by every query besides its band: they
    are appended to each slab (the text keys of an arrow window, ``runtime/arrow.py``).
    """
    n = q.shape[-2]
    if window >= n - 1:
        if extra is not None:
            k, v = torch.cat([k, extra[0]], dim=-2), torch.cat([v, extra[1]], dim=-2)
        return full_attention(q, k, v)
    c = chunk_size(n, window)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    masks: dict[tuple[int, int, int], torch.Tensor] = {}
    seen = 0 if extra is None else extra[0].shape[-2]
    for start in range(0, n, c):
        stop = min(n, start + c)
        k_start, k_stop = max(0, start - window), min(n, stop + window)
        key = (start - k_start, stop - start, k_stop - k_start)
        mask = masks.get(key)
        if mask is None:
            q_idx = torch.arange(start, stop, device=q.device)
            k_idx = torch.arange(k_start, k_stop, device=q.device)
            mask = window_mask(q_idx, k_idx, window)
            if seen:
                mask = torch.cat([mask, mask.new_ones(stop - start, seen)], dim=-1)
            masks[key] = mask
        k_slab, v_slab = k[..., k_start:k_stop, :], v[..., k_start:k_stop, :]
        if extra is not None:
            k_slab, v_slab = torch.cat([k_slab, extra[0]], dim=-2), torch.cat([v_slab, extra[1]], dim=-2)
        out[..., start:stop, :] = full_attention(q[..., start:stop, :], k_slab, v_slab, mask)
    return out


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _window_block_mask(num_tokens: int, window: int, device: torch.device, compiled: bool) -> object:
    from torch.nn.attention.flex_attention import create_block_mask

    bound = torch.tensor(window, device=device)  # data, not a constant, so a new window need not recompile

    def inside(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (q_idx - kv_idx).abs() <= bound

    return create_block_mask(inside, None, None, num_tokens, num_tokens, device=device, _compile=compiled)


def flex_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
) -> torch.Tensor:
    """Window attention with FlexAttention: blocks outside the band are skipped.

    Compiled on CUDA (the block mask is cached per token count, window and device);
    elsewhere it runs eagerly, which is exact but slow, so ``auto`` never picks it there.
    """
    n = q.shape[-2]
    if window >= n - 1:
        return full_attention(q, k, v)
    compiled = q.device.type == "cuda"
    block_mask = _window_block_mask(n, window, q.device, compiled)
    if compiled:
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask)
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask)


def auto_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
) -> torch.Tensor:
    """The fastest exact window kernel measured for ``q``'s device (``bench/RESULTS.md``):
    compiled FlexAttention on CUDA, banded chunks elsewhere."""
    kernel = flex_window_attention if q.device.type == "cuda" else chunked_window_attention
    return kernel(q, k, v, window)


WindowKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

_WINDOW_KERNELS: dict[str, WindowKernel] = {
    "auto": auto_window_attention,
    "chunked": chunked_window_attention,
    "flex": flex_window_attention,
    "dense": dense_window_attention,
}


def resolve_window_kernel(name: str) -> WindowKernel:
    """The window kernel called ``name``; ``auto`` picks the fastest exact one for the device."""
    try:
        return _WINDOW_KERNELS[name]
    except KeyError:
        raise ValueError(f"kernel: unknown window kernel {name!r}; choose from {KERNELS}") from None
