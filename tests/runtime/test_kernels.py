"""Window kernels against a dense float64 reference built from explicit indices."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.kernels import (
    auto_window_attention,
    chunk_size,
    chunked_window_attention,
    dense_window_attention,
    flex_window_attention,
    full_attention,
)

KERNELS = {
    "auto": auto_window_attention,
    "chunked": chunked_window_attention,
    "dense": dense_window_attention,
    "flex": flex_window_attention,
}


def reference(q, k, v, window):
    n = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    allowed = torch.tensor([[abs(i - j) <= window for j in range(n)] for i in range(n)])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("name", sorted(KERNELS))
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    window=st.integers(0, 320),
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    dim=st.sampled_from([4, 8, 16]),
    seed=st.integers(0, 2**16),
)
def test_window_kernel_matches_dense_reference(name, n, window, batch, heads, dim, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(KERNELS[name](q, k, v, window), reference(q, k, v, window), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_window_over_all_tokens_is_full_attention(name):
    q, k, v = (torch.randn(2, 2, 50, 8) for _ in range(3))
    assert torch.equal(KERNELS[name](q, k, v, 49), full_attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_kernel_in_lower_precision(dtype):
    q, k, v = (torch.randn(2, 4, 700, 16).to(dtype) for _ in range(3))
    got = chunked_window_attention(q, k, v, 87)
    want = reference(q.double(), k.double(), v.double(), 87)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize(("n", "window"), [(16384, 2048), (4096, 512), (1024, 128), (300, 37), (50, 3)])
def test_chunk_length_bounds_the_wasted_pairs(n, window):
    c = chunk_size(n, window)
    assert 1 <= c <= n
    if window >= 128:  # long windows: at most 40 % more query-key pairs than the band holds
        computed = n * (c + 2 * window)
        band = sum(min(n, i + window + 1) - max(0, i - window) for i in range(n))
        assert computed <= 1.4 * band
