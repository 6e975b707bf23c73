"""A plan under ``torch.compile``: eager's outputs, one graph per distinct layer-step, no recompiles.

The graphs run on dynamo's ``eager`` backend: dynamo traces, guards and replays the cache
writes exactly as with inductor, without inductor's code generation (``bench.compile``,
run by ``tests/bench``, compiles with inductor).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import runtime
from runtime.apply import repeated_blocks, self_attention_layers
from runtime.schedule import Schedule
from runtime.state import RunStats
from schemas import Layer, method_cost
from tests.plans import plan_for
from tests.runtime.conftest import step_inputs
from tests.tiny import FRAMES, tiny_dit_transformer, tiny_latte_transformer, tiny_pixart_transformer

BACKEND = "eager"
ORDERS = {"pixart": "uncond_cond", "dit": "cond_uncond"}
MIXED = [  # all five methods; layer 2 reads a residual refreshed at an asc step
    ["full", "full", "full"],
    ["wars", "ast", "asc"],
    ["wars_asc", "ast", "wars"],
    ["ast", "full", "wars_asc"],
]


pytestmark = pytest.mark.usefixtures("one_thread")


class Compiles:
    """Dynamo's compilations while active (compile ids ``frame/attempt``), on fresh caches."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    @property
    def graphs(self) -> int:
        return counters["stats"]["unique_graphs"]


@contextmanager
def compiles() -> Iterator[Compiles]:
    torch._dynamo.reset()
    counters.clear()
    seen = Compiles()
    torch._dynamo.callback_handler.register_start_callback(lambda args: seen.ids.append(args.compile_id))
    try:
        yield seen
    finally:
        torch._dynamo.reset()


def model_of(kind: str, layers: int = 3) -> torch.nn.Module:
    build = tiny_pixart_transformer if kind == "pixart" else tiny_dit_transformer
    return build(seed=1, layers=layers)


def generation(model, kind: str, steps: int) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            model(**step_inputs(kind, t, cfg=True, order=ORDERS[kind], dtype=torch.float32)).sample
            for t in range(steps)
        ]


def assert_close_all(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for t, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {t}")


@dataclass
class Runs:
    """A plan run eagerly, then compiled for two generations: outputs, stats and compilations."""

    eager: list[torch.Tensor]
    eager_stats: RunStats
    first: list[torch.Tensor]
    second: list[torch.Tensor]
    stats: RunStats  # compiled, both generations
    graphs: int
    compiled_second: int  # compilations during the second compiled generation

    def assert_like_eager_without_recompiling(self) -> None:
        assert_close_all(self.first, self.eager)
        assert_close_all(self.second, self.eager)
        assert self.compiled_second == 0


def eager_then_compiled(model, kind: str, plan, steps: int) -> Runs:
    with runtime.apply(plan, model) as handle:
        eager = generation(model, kind, steps)
        eager_stats = handle.stats()
    with compiles() as seen, runtime.apply(plan, model, compile={"backend": BACKEND}) as handle:
        first = generation(model, kind, steps)
        compiled_first = len(seen.ids)
        handle.reset()
        second = generation(model, kind, steps)
        return Runs(eager, eager_stats, first, second, handle.stats(), seen.graphs, len(seen.ids) - compiled_first)


def widen(methods: list[list[str]], times: int) -> list[list[str]]:
    """The same columns repeated: more layers, the same distinct layer-steps."""
    return [row * times for row in methods]


@pytest.mark.parametrize(("kind", "layers"), [("pixart", 6), ("dit", 3)])
def test_compiled_blocks_run_every_method_like_eager_with_one_graph_per_variant(kind, layers):
    model = model_of(kind, layers)
    plan = plan_for(model, widen(MIXED, layers // 3), cfg_order=ORDERS[kind])
    runs = eager_then_compiled(model, kind, plan, len(MIXED))
    runs.assert_like_eager_without_recompiling()
    variants = Schedule(MIXED).variants()  # of the 3-layer grid: the graphs do not grow with layers
    assert len(variants) == 9 and len({v[:3] for v in variants}) == 8
    assert 1 < runs.graphs <= len(variants)
    stats, eager_stats = runs.stats, runs.eager_stats
    assert stats.method_counts == {m: 2 * c for m, c in eager_stats.method_counts.items()}
    assert stats.peak_cache_bytes == eager_stats.peak_cache_bytes
    assert stats.attention_flops_fraction == pytest.approx(eager_stats.attention_flops_fraction)


def test_forecasts_and_feed_forward_reuse_compile_like_eager_without_recompiling():
    """``forecast``'s coefficient is a tensor input (no recompile per step); feed-forward
    reuse runs eagerly between the block's graphs."""
    import msgspec

    from schemas import with_figures

    model = model_of("dit")
    methods = [["full"] * 3, ["full", "ast", "full"], ["forecast", "ast", "wars"], ["forecast", "full", "forecast"],
               ["full", "forecast", "forecast"]]  # fmt: skip
    ffn = [["compute"] * 3, ["compute", "reuse", "compute"], ["forecast", "reuse", "compute"],
           ["forecast", "compute", "reuse"], ["compute", "forecast", "forecast"]]  # fmt: skip
    plan = with_figures(msgspec.structs.replace(plan_for(model, methods, cfg_order="cond_uncond"), ffn=ffn))
    runs = eager_then_compiled(model, "dit", plan, len(methods))
    runs.assert_like_eager_without_recompiling()
    assert runs.stats.method_counts["forecast"] == 2 * 5 and runs.stats.ffn_counts["forecast"] == 2 * 4


def test_per_head_cells_compile_like_eager_without_recompiling():
    """Each head grouping is its own graph (its head indices are constants of the graph)."""
    model = model_of("pixart")
    methods = [["full"] * 3, ["wars"] * 3, ["wars", "full", "wars"], ["wars"] * 3]
    heads = {(1, 0): "fw", (1, 2): "af", (2, 0): "wa", (3, 1): "aw", (3, 2): "af"}
    plan = plan_for(model, methods, cfg_order="uncond_cond", heads=heads)
    runs = eager_then_compiled(model, "pixart", plan, len(methods))
    runs.assert_like_eager_without_recompiling()
    eager_stats = runs.eager_stats
    assert eager_stats.head_cells == len(heads)
    refreshes = eager_stats.residual_refreshes * method_cost("wars", 64, plan.window) / 12  # four, each a window
    assert eager_stats.residual_refreshes == 4
    assert eager_stats.attention_flops_fraction == pytest.approx(plan.summary.attention_flops_fraction + refreshes)


def test_latte_spatial_and_temporal_blocks_compile_per_window_and_kind():
    model = tiny_latte_transformer(seed=3)
    tokens = 16
    layers = [Layer("spatial", tokens, 5, sequences=FRAMES), Layer("temporal", FRAMES, 1, sequences=tokens)] * 2
    methods = [["full"] * 4, ["wars", "ast", "asc", "wars"], ["wars_asc", "wars", "wars", "full"]]
    plan = plan_for(model, methods, num_tokens=tokens, window=5, layers=layers, frames=FRAMES)

    def run() -> list[torch.Tensor]:
        outs = []
        text = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(9))
        for t in range(len(methods)):
            latents = torch.randn(2, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(50 + t))
            with torch.no_grad():
                outs.append(model(torch.cat([latents, latents]), encoder_hidden_states=text,
                                  timestep=torch.full((4,), 900.0 - 150 * t)).sample)
        return outs

    with runtime.apply(plan, model):
        eager = run()
    with compiles() as seen, runtime.apply(plan, model, compile={"backend": BACKEND}) as handle:
        first = run()
        compiled_first = len(seen.ids)
        handle.reset()
        second = run()
        graphs, compiled_second = seen.graphs, len(seen.ids) - compiled_first
    assert_close_all(first, eager)
    assert_close_all(second, eager)
    # per kind (spatial, temporal: other shapes and windows), at most one graph per variant
    assert graphs <= 2 * len(Schedule(methods).variants())
    assert compiled_second == 0


def test_remove_puts_back_the_uncompiled_blocks_and_a_users_own_compile():
    model = model_of("dit")
    blocks = repeated_blocks(model)
    raw = generation(model, "dit", 2)
    mine = torch.compile(blocks[0]._call_impl, backend="eager")
    blocks[0]._compiled_call_impl = mine  # what blocks[0].compile() does
    processors = [attn.processor for attn in self_attention_layers(model)]
    hooks = [dict(b._forward_pre_hooks) for b in blocks]
    handle = runtime.apply(plan_for(model, MIXED[:2], cfg_order="cond_uncond"), model, compile={"backend": BACKEND})
    assert all(vars(b).get("_compiled_call_impl") not in (None, mine) for b in blocks)
    handle.remove()
    assert blocks[0]._compiled_call_impl is mine
    assert all("_compiled_call_impl" not in vars(b) for b in blocks[1:])
    assert [dict(b._forward_pre_hooks) for b in blocks] == hooks
    assert all(a.processor is p for a, p in zip(self_attention_layers(model), processors, strict=True))
    del blocks[0]._compiled_call_impl
    for a, b in zip(generation(model, "dit", 2), raw, strict=True):
        assert torch.equal(a, b)


def test_plan_applied_before_the_user_compiles_the_repeated_blocks():
    model = model_of("pixart")
    model._repeated_blocks = ["BasicTransformerBlock"]  # what compile_repeated_blocks looks for
    methods = [["full"] * 3, ["wars", "ast", "full"], ["ast", "wars", "asc"]]
    plan = plan_for(model, methods)
    with runtime.apply(plan, model) as handle:
        eager = generation(model, "pixart", 3)
        handle.reset()
        with compiles() as seen:
            # the first block's input is a transposed view: its variants compile twice
            model.compile_repeated_blocks(backend=BACKEND, dynamic=False, recompile_limit=16)
            first = generation(model, "pixart", 3)
            compiled_first = len(seen.ids)
            handle.reset()
            second = generation(model, "pixart", 3)
            graphs, compiled_second = seen.graphs, len(seen.ids) - compiled_first
    for block in repeated_blocks(model):
        del block._compiled_call_impl
    assert_close_all(first, eager)
    assert_close_all(second, eager)
    assert graphs <= 2 * len(Schedule(methods).variants())
    assert compiled_second == 0


def test_plan_applied_before_torch_compile_of_the_whole_transformer():
    model = model_of("dit")
    methods = MIXED[:3]  # every method
    plan = plan_for(model, methods, cfg_order="cond_uncond")
    with runtime.apply(plan, model) as handle:
        eager = generation(model, "dit", len(methods))
        handle.reset()
        with compiles() as seen:
            compiled = torch.compile(model, backend=BACKEND)
            first = generation(compiled, "dit", len(methods))
            compiled_first = len(seen.ids)
            handle.reset()
            second = generation(compiled, "dit", len(methods))
            graphs, compiled_second = seen.graphs, len(seen.ids) - compiled_first
    assert_close_all(first, eager)
    assert_close_all(second, eager)
    assert graphs <= len({tuple(row) for row in methods})  # one graph per distinct row of methods
    assert compiled_second == 0
