"""Refresh attention (runtime/merge.py): full and window outputs from one pass over the keys,
against float64 references built from plain softmax and the windows' dense masks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.kernels import full_attention
from runtime.merge import (
    BandRefresh,
    TiledRefresh,
    attention_lse,
    bind_refresh,
    complement_index,
    merge,
    refresh_attention,
    refresh_chunk,
)
from runtime.windows import mask, tile_index
from schemas import PlanError, Tiles1d, Tiles2d, Tiles3d, window_pairs
from tests.runtime.test_windows import tiled_shapes


def reference(q, k, v, allowed=None):
    """Plain softmax attention in float64, keys outside ``allowed`` dropped."""
    q, k, v = q.double(), k.double(), v.double()
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


def processor_layout(batch, n, heads, dim, dtype=torch.float64, seed=0):
    """q, k, v as the processor makes them: ``[batch, tokens, heads, dim]`` seen as ``[batch, heads, tokens, dim]``."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, n, heads, dim)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2) for _ in range(3)]


def check_refresh(window, n, q, k, v, tol):
    full, win = refresh_attention(q, k, v, window, n)
    assert full.shape == win.shape == q.shape[:-1] + v.shape[-1:]
    assert full.dtype == win.dtype == q.dtype
    torch.testing.assert_close(full.double(), reference(q, k, v), rtol=tol, atol=tol)
    torch.testing.assert_close(win.double(), reference(q, k, v, mask(window, n)), rtol=tol, atol=tol)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    window=st.integers(0, 320),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    dim=st.sampled_from([8, 12, 72]),
    seed=st.integers(0, 2**16),
)
def test_band_refresh_is_full_and_window_attention(n, window, batch, heads, dim, seed):
    q, k, v = processor_layout(batch, n, heads, dim, seed=seed)
    check_refresh(window, n, q, k, v, 1e-10)


@settings(max_examples=60, deadline=None)
@given(
    case=tiled_shapes(),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    dim=st.sampled_from([8, 12, 72]),
    seed=st.integers(0, 2**16),
)
def test_tiled_refresh_is_full_and_window_attention(case, batch, heads, dim, seed):
    shape, n = case
    q, k, v = processor_layout(batch, n, heads, dim, seed=seed)
    check_refresh(shape, n, q, k, v, 1e-10)


@pytest.mark.parametrize(
    ("n", "window", "chunk"),
    [(700, 87, None), (700, 87, 64), (700, 87, 700), (300, 0, 1), (300, 5, 7), (50, 20, 8), (64, 31, 16)],
)
def test_band_refresh_with_any_chunk_is_exact(n, window, chunk):
    q, k, v = processor_layout(2, n, 2, 8)
    full, win = BandRefresh(window, n, chunk=chunk)(q, k, v)
    torch.testing.assert_close(full, reference(q, k, v), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(win, reference(q, k, v, mask(window, n)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [25, 26, 30, 40])  # 2w + 1 >= 50: some (or all) queries see every key
def test_band_rows_with_an_empty_complement_are_their_window(window):
    n = 50
    q, k, v = processor_layout(1, n, 2, 8)
    allowed = mask(window, n)
    assert allowed.all(-1).any()
    full, win = refresh_attention(q, k, v, window)
    torch.testing.assert_close(full, reference(q, k, v), rtol=1e-10, atol=1e-10)
    rows = allowed.all(-1)
    torch.testing.assert_close(win[..., rows, :], full[..., rows, :], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("window", "n"),
    [(49, 50), (1000, 50), (0, 1), (Tiles2d((6, 8), (2, 4), 1), 48), (Tiles1d(16, 2), 64), (Tiles1d(64, 0), 64)],
)
def test_window_over_every_key_is_one_full_attention(window, n):
    assert window_pairs(n, window) == n * n
    q, k, v = processor_layout(2, n, 2, 8)
    full, win = refresh_attention(q, k, v, window, n)
    assert full is win
    torch.testing.assert_close(full, full_attention(q, k, v), rtol=0, atol=0)


WINDOWS_256 = [
    32, 100, Tiles1d(32, 1), Tiles1d(16, 3), Tiles2d((16, 16), (4, 4), 1), Tiles2d((16, 16), (8, 4), 0),
    Tiles3d((4, 8, 8), (2, 4, 4), 1), Tiles3d((4, 8, 8), (1, 2, 8), 1),
]  # fmt: skip


@pytest.mark.parametrize("window", WINDOWS_256, ids=str)
def test_float32_with_head_dim_72(window):
    q, k, v = processor_layout(2, 256, 4, 72, torch.float32)
    check_refresh(window, 256, q, k, v, 1e-5)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("window", WINDOWS_256[:3] + WINDOWS_256[4:5] + WINDOWS_256[6:7], ids=str)
def test_half_precision_is_close_to_float64(window, dtype, tol):
    q, k, v = processor_layout(2, 256, 4, 72, dtype)
    check_refresh(window, 256, q, k, v, tol)
    full, win = refresh_attention(q, k, v, window, 256)
    # the merge runs in float32: the full output is as close as full attention in that dtype
    fused = (full_attention(q, k, v).double() - reference(q, k, v)).abs().max()
    assert (full.double() - reference(q, k, v)).abs().max() <= 2 * fused + 1e-3


@pytest.mark.parametrize("backend", ["auto", "math"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["plain", "causal", "mask"])
def test_attention_lse_is_attention_and_its_log_sum_exp(backend, dtype, kind):
    q, k, v = processor_layout(2, 40, 3, 72, dtype)
    allowed = None
    bias = None
    if kind == "causal":
        allowed = torch.ones(40, 40, dtype=torch.bool).tril()
    elif kind == "mask":
        allowed = torch.rand(40, 40, generator=torch.Generator().manual_seed(3)) < 0.3
        allowed.fill_diagonal_(True)
        bias = torch.zeros(40, 40, dtype=dtype).masked_fill(~allowed, float("-inf"))
    out, lse = attention_lse(q, k, v, bias, causal=kind == "causal", backend=backend)
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(72)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), rtol=tol, atol=tol)
    torch.testing.assert_close(out.double(), reference(q, k, v, allowed), rtol=tol, atol=tol)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), split=st.data(), seed=st.integers(0, 2**16))
def test_merging_attention_over_split_keys_is_attention_over_all(n, split, seed):
    q, k, v = processor_layout(1, n, 2, 8, seed=seed)
    cut = split.draw(st.integers(1, n - 1))
    a = attention_lse(q, k[..., :cut, :], v[..., :cut, :])
    b = attention_lse(q, k[..., cut:, :], v[..., cut:, :])
    out, lse = merge(a, b)
    torch.testing.assert_close(out, full_attention(q, k, v), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, attention_lse(q, k, v)[1], rtol=1e-10, atol=1e-10)


def test_merging_an_empty_part_keeps_the_base():
    q, k, v = processor_layout(1, 10, 2, 8)
    base = attention_lse(q, k, v)
    empty = (torch.zeros_like(base[0]), torch.full_like(base[1], float("-inf")))
    out, lse = merge(base, empty)
    assert torch.equal(out, base[0]) and torch.equal(lse, base[1])


@pytest.mark.parametrize(
    ("shape", "n"), [(Tiles3d((4, 8, 6), (1, 2, 2), 1), 192), (Tiles2d((8, 12), (2, 3), 1), 96), (Tiles1d(8, 2), 96)]
)
def test_complement_index_holds_every_unseen_key_once(shape, n):
    index, comp = tile_index(shape, n), complement_index(shape, n)
    order = index.order if index.order is not None else torch.arange(n)
    allowed = mask(shape, n)
    doubled = comp.doubled.tolist()
    for i in range(index.tiles):
        queries = order[i * index.tile : (i + 1) * index.tile]
        far = comp.far[i // comp.per_row]
        keys = doubled[far : far + comp.far_len] + ([] if comp.near is None else comp.near[i].tolist())
        assert len(keys) == len(set(keys)) == n - index.seen * index.tile
        unseen = set((~allowed[queries[0]]).nonzero().flatten().tolist())
        assert set(keys) == unseen
        assert (allowed[queries] == allowed[queries[0]]).all()  # a tile's queries see the same keys


@pytest.mark.parametrize("group_elements", [1, 10**4, None])
def test_tile_groups_of_any_size_are_exact(group_elements):
    shape, n = Tiles2d((8, 12), (2, 3), 1), 96
    q, k, v = processor_layout(2, n, 3, 8)
    full, win = TiledRefresh(shape, n, group_elements=group_elements)(q, k, v)
    torch.testing.assert_close(full, reference(q, k, v), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(win, reference(q, k, v, mask(shape, n)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [Tiles2d((8, 8), (2, 4), 1), Tiles1d(8, 1), 5])
def test_bound_refresh_reuses_buffers_never_outputs(window):
    refresh = bind_refresh(window, 64)
    first = processor_layout(2, 64, 3, 8, torch.float32)
    full, win = refresh(*first)
    kept = full.clone(), win.clone()
    again = refresh(*processor_layout(1, 64, 3, 8, torch.float32, seed=1))  # CFG-shared rows: smaller
    assert again[0].shape == (1, 3, 64, 8)
    assert torch.equal(full, kept[0]) and torch.equal(win, kept[1])
    torch.testing.assert_close(refresh(*first), kept, rtol=0, atol=0)
    buffers = getattr(refresh, "_buffers", {}).values()
    assert not any(out.data_ptr() == b.data_ptr() for out in (full, win) for b in buffers)


def test_refresh_with_autograd_inputs_gathers_into_fresh_tensors():
    shape, n = Tiles2d((8, 8), (2, 4), 1), 64
    q, k, v = (x.float().requires_grad_() for x in processor_layout(1, n, 2, 8))
    refresh = bind_refresh(shape, n)
    full, win = refresh(q, k, v)
    assert not refresh._buffers
    torch.testing.assert_close(full.double(), reference(q.detach(), k.detach(), v.detach()), rtol=1e-5, atol=1e-5)


def test_a_layer_of_another_token_count_is_refused():
    q, k, v = processor_layout(1, 48, 2, 8)
    with pytest.raises(PlanError, match="fits 64 tokens, the layer runs 48"):
        bind_refresh(Tiles1d(8, 1), 64)(q, k, v)
    with pytest.raises(PlanError, match="tiles of 5 do not divide"):
        bind_refresh(Tiles1d(5, 1), 64)


@pytest.mark.parametrize(("n", "window"), [(16384, 2048), (4096, 512), (1024, 128), (300, 37), (50, 3)])
def test_refresh_chunk_keeps_the_extra_pairs_within_an_eighth(n, window):
    c = refresh_chunk(n, window)
    assert 1 <= c <= n
    if n >= 1024:  # a chunk of c computes about 2c pairs per query more than N
        assert 2 * c <= n / 8
