"""Exact attention kernels: full attention and banded (window) attention.

The window is one function of (query, key) indices, ``window_mask``; every window
kernel computes exactly ``softmax(q k^T / sqrt(d) + mask) v`` restricted to it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

KERNELS = ("auto", "chunked", "dense")


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
    """Query-chunk length for the banded kernel: a chunk of c queries reads c + 2w keys."""
    return max(64, min(num_tokens, window))


def chunked_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
) -> torch.Tensor:
    """Window attention in query chunks, each over the key slab its band needs.

    Work is about ``N * (c + 2w)`` pairs instead of ``N^2``; the result is exact.
    """
    n = q.shape[-2]
    if window >= n - 1:
        return full_attention(q, k, v)
    c = chunk_size(n, window)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    masks: dict[tuple[int, int, int], torch.Tensor] = {}
    for start in range(0, n, c):
        stop = min(n, start + c)
        k_start, k_stop = max(0, start - window), min(n, stop + window)
        key = (start - k_start, stop - start, k_stop - k_start)
        mask = masks.get(key)
        if mask is None:
            q_idx = torch.arange(start, stop, device=q.device)
            k_idx = torch.arange(k_start, k_stop, device=q.device)
            mask = masks[key] = window_mask(q_idx, k_idx, window)
        out[..., start:stop, :] = full_attention(
            q[..., start:stop, :], k[..., k_start:k_stop, :], v[..., k_start:k_stop, :], mask
        )
    return out


WindowKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

_WINDOW_KERNELS: dict[str, WindowKernel] = {
    "chunked": chunked_window_attention,
    "dense": dense_window_attention,
}


def resolve_window_kernel(name: str, device: torch.device | None = None) -> WindowKernel:
    """The window kernel called ``name``; ``auto`` picks the fastest exact one for the device."""
    if name == "auto":
        name = "chunked"
    try:
        return _WINDOW_KERNELS[name]
    except KeyError:
        raise ValueError(f"kernel: unknown window kernel {name!r}; choose from {KERNELS}") from None
