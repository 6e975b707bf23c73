"""Window shapes (DESIGN §6): index functions, pair counts and kernels against float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import runtime
from runtime.kernels import full_attention
from runtime.windows import bind_window, mask, tile_index
from schemas import Layer, PlanError, Tiles1d, Tiles2d, Tiles3d, window_pairs
from tests.plans import plan_for
from tests.runtime.conftest import float64_model
from tests.runtime.test_methods import LAYERS, TOKENS, grids, reference_outputs, runtime_outputs
from tests.runtime.test_video import FRAMES, inputs, model, run
from tests.runtime.test_video import TOKENS as FRAME_TOKENS
from tests.runtime.reference import ReferenceRun


def brute_mask(shape, n: int) -> list[list[bool]]:
    """DESIGN §6 read literally: along each axis, query tile ``a`` sees key tiles ``c - k … c + k``
    with ``c = clamp(a, k, n_tiles - 1 - k)``, or every tile when there are fewer than ``2k + 1``."""
    if isinstance(shape, Tiles1d):
        grid, tile = (n,), (shape.tile,)
    else:
        grid, tile = shape.grid, shape.tile

    def coords(i):
        out = []
        for size in reversed(grid):
            out.append(i % size)
            i //= size
        return out[::-1]

    def sees(a, b, tiles):
        if tiles < 2 * shape.k + 1:
            return True
        c = min(max(a, shape.k), tiles - 1 - shape.k)
        return abs(b - c) <= shape.k

    return [
        [
            all(sees(qc // t, kc // t, g // t) for qc, kc, g, t in zip(coords(i), coords(j), grid, tile))
            for j in range(n)
        ]
        for i in range(n)
    ]


@st.composite
def tiled_shapes(draw, max_tokens: int = 200):
    """A tiled shape and its token count: 1 to 5 tiles of 1 to 4 per axis, 0 <= k <= 3."""
    kind = draw(st.sampled_from(["tiles1d", "tiles2d", "tiles3d"]))
    axes = {"tiles1d": 1, "tiles2d": 2, "tiles3d": 3}[kind]
    counts = [draw(st.integers(1, 5)) for _ in range(axes)]
    tile = tuple(draw(st.integers(1, 4)) for _ in range(axes))
    grid = tuple(c * t for c, t in zip(counts, tile))
    n = math.prod(grid)
    assume(n <= max_tokens)
    k = draw(st.integers(0, 3))
    if kind == "tiles1d":
        return Tiles1d(tile[0], k), n
    return (Tiles2d if axes == 2 else Tiles3d)(grid, tile, k), n


def reference(q, k, v, allowed):
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


@settings(max_examples=60, deadline=None)
@given(case=tiled_shapes(max_tokens=120))
def test_tiles_mask_is_the_clamped_neighbourhood(case):
    shape, n = case
    assert mask(shape, n).tolist() == brute_mask(shape, n)


@settings(max_examples=60, deadline=None)
@given(case=tiled_shapes(max_tokens=120))
def test_pair_count_is_the_mask_count(case):
    shape, n = case
    assert window_pairs(n, shape) == sum(map(sum, brute_mask(shape, n)))


@pytest.mark.parametrize(("n", "w"), [(1, 0), (7, 2), (64, 8), (50, 100)])
def test_band_pair_count_is_its_mask_count(n, w):
    assert window_pairs(n, w) == int(mask(w, n).sum())


@pytest.mark.parametrize("kernel", ["auto", "dense"])
@settings(max_examples=40, deadline=None)
@given(
    case=tiled_shapes(),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    dim=st.sampled_from([9, 12]),
    seed=st.integers(0, 2**16),
)
def test_tiled_kernel_matches_dense_reference(kernel, case, batch, heads, dim, seed):
    shape, n = case
    g = torch.Generator().manual_seed(seed)
    # the processor's layout: [batch, tokens, heads, dim] viewed as [batch, heads, tokens, dim]
    q, k, v = (torch.randn(batch, n, heads, dim, generator=g, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    allowed = torch.tensor(brute_mask(shape, n))
    got = bind_window(shape, n, kernel)(q, k, v)
    torch.testing.assert_close(got, reference(q, k, v, allowed), rtol=1e-10, atol=1e-10)


def test_tiled_kernel_in_float32_with_head_dim_72():
    shape, n = Tiles2d((16, 16), (4, 4), 1), 256
    q, k, v = (torch.randn(2, n, 4, 72).transpose(1, 2) for _ in range(3))
    got = bind_window(shape, n)(q, k, v)
    want = reference(q.double(), k.double(), v.double(), mask(shape, n))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_tiles_seeing_every_tile_are_full_attention():
    q, k, v = (torch.randn(2, 2, 48, 8, dtype=torch.float64) for _ in range(3))
    shape = Tiles2d((6, 8), (2, 4), 1)  # 3 x 2 tiles: k = 1 sees them all
    assert window_pairs(48, shape) == 48 * 48
    torch.testing.assert_close(bind_window(shape, 48)(q, k, v), full_attention(q, k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [Tiles2d((8, 8), (4, 2), 1), Tiles1d(16, 0), Tiles2d((8, 8), (4, 4), 0)])
def test_reused_buffers_never_alias_an_output(shape):
    kernel = bind_window(shape, 64)
    first = [torch.randn(2, 64, 3, 8).transpose(1, 2) for _ in range(3)]
    out = kernel(*first)
    kept = out.clone()
    again = kernel(*(torch.randn(1, 64, 3, 8).transpose(1, 2) for _ in range(3)))  # CFG-shared rows: smaller
    assert torch.equal(out, kept) and again.shape == (1, 3, 64, 8)
    torch.testing.assert_close(kernel(*first), kept, rtol=0, atol=0)
    assert not any(out.data_ptr() == b.data_ptr() for b in kernel._buffers.values())


def test_gather_index_is_cached_per_geometry():
    shape = Tiles2d((8, 8), (2, 4), 1)
    assert tile_index(shape, 64) is tile_index(Tiles2d((8, 8), (2, 4), 1), 64)
    index = tile_index(shape, 64)
    assert (index.tiles, index.tile, index.seen) == (8, 8, 6)  # 4 x 2 tiles, 3 x 2 seen
    assert sorted(index.order.tolist()) == list(range(64))


# ---------------------------------------------------------------------------
# end to end: every method with a tiled window, against the float64 reference

IMAGE_SHAPES = [
    Tiles1d(8, 1), Tiles1d(16, 0), Tiles1d(4, 2),
    Tiles2d((8, 8), (2, 2), 1), Tiles2d((8, 8), (4, 2), 1), Tiles2d((8, 8), (2, 4), 0), Tiles2d((8, 8), (4, 4), 0),
]  # fmt: skip


@pytest.mark.parametrize("kind", ["pixart", "dit"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(methods=grids(), shape=st.sampled_from(IMAGE_SHAPES), kernel=st.sampled_from(["auto", "dense"]))
def test_every_method_with_tiles_matches_float64_reference(kind, methods, shape, kernel):
    model_ = float64_model(kind)
    expected = reference_outputs(model_, kind, methods, shape)
    got = runtime_outputs(model_, kind, methods, shape, kernel)
    for t, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"step {t} of {methods} with {shape}")


@pytest.mark.parametrize("kind", ["pixart", "dit"])
def test_wars_and_wars_asc_with_tiles_change_the_output(kind):
    """Guards the test above against vacuity: a tiled window is not full attention here."""
    model_ = float64_model(kind)
    shape = Tiles2d((8, 8), (4, 4), 0)
    full = runtime_outputs(model_, kind, [["full"] * LAYERS] * 2, shape)
    for method in ("wars", "wars_asc"):
        methods = [["full"] * LAYERS, [method] * LAYERS]
        got = runtime_outputs(model_, kind, methods, shape)
        torch.testing.assert_close(got[1], reference_outputs(model_, kind, methods, shape)[1], rtol=1e-9, atol=1e-10)
        assert (got[1] - full[1]).abs().max() > 1e-6


def test_spatial_tiles_and_temporal_band_on_a_video_model():
    spatial = Tiles2d((4, 4), (2, 2), 0)  # a frame's 16 tokens in 4 tiles of 2 x 2
    entries = [Layer("spatial", FRAME_TOKENS, spatial, FRAMES), Layer("temporal", FRAMES, 1, FRAME_TOKENS)] * 2
    methods = [["full"] * 4, ["wars", "wars", "wars_asc", "wars_asc"], ["wars_asc", "full", "wars", "ast"]]
    m = model()
    ref = ReferenceRun(methods, [spatial, 1] * 2, cond_first=False)
    expected = ref.outputs(m, lambda t: [m(**inputs(t)).sample])
    plan = plan_for(m, methods, num_tokens=FRAME_TOKENS, window=spatial, layers=entries, frames=FRAMES)
    with runtime.apply(plan, m) as handle:
        got = run(m, len(methods))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert handle.runner.window_kernel(0) is handle.runner.window_kernel(2)  # bound once per window


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (Tiles2d((8, 8), (3, 3), 1), r"\$\.window\.tile: tiles of 3x3 do not divide the 8x8 grid"),
        (Tiles2d((4, 4), (2, 2), 0), r"\$\.window\.grid: 4x4 = 16 tokens, the layer has 64"),
        (Tiles1d(5, 1), r"\$\.window\.tile: tiles of 5 do not divide the 64 grid"),
    ],
)
def test_tiles_that_do_not_fit_are_refused_at_apply(shape, message):
    m = float64_model("dit")
    plan = plan_for(m, [["full"] * LAYERS, ["wars"] * LAYERS], num_tokens=TOKENS, window=shape, cfg_order="cond_uncond")
    processors = [block.attn1.processor for block in m.transformer_blocks]
    with pytest.raises(PlanError, match=message):
        runtime.apply(plan, m)
    assert [block.attn1.processor for block in m.transformer_blocks] == processors


@pytest.mark.parametrize("merged", [True, False])
def test_executed_flops_count_the_tiles_pairs(merged):
    m = float64_model("dit")
    shape = Tiles2d((8, 8), (4, 4), 0)
    methods = [["full"] * LAYERS, ["wars"] * LAYERS]
    plan = plan_for(m, methods, num_tokens=TOKENS, window=shape, cfg_order="cond_uncond")
    assert plan.summary.attention_flops_fraction == pytest.approx((1 + 16 / 64) / 2)
    with runtime.apply(plan, m, merged_refresh=merged) as handle, torch.no_grad():
        for t in range(2):
            m(**_dit_inputs(t))
    # step 0 refreshes every residual, merged (window and complement: the full pairs) or with a
    # second pass over the window (16 of 64 keys); step 1 runs the window
    refresh = 0.0 if merged else 0.25
    assert handle.stats().attention_flops_fraction == pytest.approx((1 + refresh + 0.25) / 2)
    assert handle.stats().residual_refreshes == LAYERS


def _dit_inputs(t: int) -> dict:
    from tests.runtime.conftest import step_inputs

    return step_inputs("dit", t, cfg=True, order="cond_uncond")
