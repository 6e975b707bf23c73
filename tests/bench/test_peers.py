"""bench.peers on the MMDiTs: its meter counts what the runtime counts, and the bench runs (tiny sizes)."""

from __future__ import annotations

import math

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.progress import Progress

from bench import peers
from planner.build import build_plan
from planner.embedded import load_embedded
from planner.evaluate import EvalInputs
from planner.registry import resolve_model
from runtime.apply import self_attention_layers
from schemas import Plan, encode_plan, layer_weight
from tests.planner.pipelines import embedded_request

STEPS = 4
MODELS = ("sd3-digits", "flux-digits")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The bench's tiny models run fastest on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {name: load_embedded(name) for name in MODELS}


@pytest.fixture(scope="module")
def plans(pipes) -> dict[str, Plan]:
    """Our plan at δ = 1 (every layer-step full) per model, calibrated on two captions over ``STEPS`` steps."""
    built = {}
    for name, pipe in pipes.items():
        request = embedded_request(name, delta=1.0, steps=STEPS)
        built[name] = build_plan(pipe, request).plan
    return built


@pytest.mark.parametrize("name", MODELS)
def test_hooks_select_exactly_the_runtimes_self_attention_layers(pipes, name):
    transformer = pipes[name].transformer
    pattern = peers.SELF_ATTENTION[type(transformer).__name__].pattern
    selected = [module for key, module in transformer.named_modules() if re.fullmatch(pattern, key)]
    assert selected == self_attention_layers(transformer)


@pytest.mark.parametrize("name", MODELS)
def test_meter_counts_what_the_runtime_counts_at_delta_one(pipes, plans, name):
    pipe, plan = pipes[name], plans[name]
    assert {m for row in plan.methods for m in row} == {"full"}
    inputs = peers.calibration_inputs(name)
    raw = peers.generate(pipe, resolve_model(name), plan, inputs, None)
    ours = peers.generate(pipe, resolve_model(name), plan, inputs, peers.ours("D0", plan))
    both_halves = 2 * len(inputs)  # CFG rows per step, batched or in two calls
    assert raw.pairs == STEPS * both_halves * sum(layer_weight(layer) for layer in plan.layers)
    assert ours.pairs == raw.pairs
    assert ours.ffn_tokens == raw.ffn_tokens > 0


def test_meter_counts_no_feed_forward_tokens_for_reused_outputs(pipes, plans):
    """sd3-digits: each block's ``ff`` and, but on the last block, ``ff_context``; reusing a
    feed-forward layer's output runs none of it, so the meter counts what the runtime computed."""
    import msgspec

    from runtime.feedforward import feed_forward_layers
    from schemas import with_figures

    pipe, plan, spec = pipes["sd3-digits"], plans["sd3-digits"], resolve_model("sd3-digits")
    width = len(feed_forward_layers(pipe.transformer))
    ffn = [["compute"] * width] + [["reuse"] + ["compute"] * (width - 1) for _ in range(STEPS - 1)]
    reusing = with_figures(msgspec.structs.replace(plan, ffn=ffn))
    inputs = EvalInputs(("the digit 3",), (3,), (0,))
    raw = peers.generate(pipe, spec, plan, inputs, None)
    ours = peers.generate(pipe, spec, reusing, inputs, peers.ours("F", reusing))
    assert raw.ffn_tokens - ours.ffn_tokens == (STEPS - 1) * 2 * 256  # ff of block 0: 2 CFG rows x 256 image tokens


@pytest.mark.filterwarnings("ignore:torch.meshgrid")  # inside FasterCache's frequency split
def test_attention_peers_run_on_sd3_joint_and_attn2_layers(pipes, plans):
    pipe, plan, spec = pipes["sd3-digits"], plans["sd3-digits"], resolve_model("sd3-digits")
    inputs = EvalInputs(("the digit 3",), (3,), (0,))
    raw = peers.generate(pipe, spec, plan, inputs, None)
    layers = peers.SELF_ATTENTION["SD3Transformer2DModel"]
    pab = peers.generate(pipe, spec, plan, inputs, peers.pab(layers, 2, (-1, 1000)))
    assert pab.pairs == raw.pairs / 2 and pab.ffn_tokens == raw.ffn_tokens
    faster = peers.generate(pipe, spec, plan, inputs, peers.faster_cache(layers, 2, (-1, 1000), cfg_cache=True))
    assert faster.pairs < raw.pairs and faster.ffn_tokens < raw.ffn_tokens  # the CFG cache drops the uncond half
    assert np.isfinite(faster.images).all()


def test_bench_table_has_ours_and_every_peer_that_runs_on_flux(plans, tmp_path: Path):
    path = tmp_path / "full.json"
    path.write_bytes(encode_plan(plans["flux-digits"]))
    with Progress(disable=True) as bar:
        text, _ = peers.compare("flux-digits", [str(path)], 2, 1, bar)
    assert text.startswith(f"flux-digits: 2 held-out samples, {STEPS} steps"), text
    assert re.search(r"\| raw \|  \| 100\.0 % \| 100 % \|", text), text
    assert re.search(r"\| ditfastattn \| FULL \(δ 1\.0\) \| 100\.0 % \| 100 % \|", text), text
    for peer in ("TaylorSeer", "FirstBlockCache", "MagCache"):
        assert re.search(rf"\| {peer} \| [^|]+ \| [0-9.]+ % \| [0-9]+ % \|", text), text
    assert "| PAB |" not in text and "| FasterCache |" not in text


def test_curves_plot_psnr_against_attention_and_time_one_series_per_method(tmp_path):
    from bench.plot import save_plot

    rows = [
        peers.Row("raw", "", 1.0, 1.0, 0.9, math.inf, 1.0, 1.0),
        peers.Row("ditfastattn", "A45", 0.45, 1.0, 0.9, 31.0, 0.98, 0.8),
        peers.Row("TaylorSeer", "interval 3", 0.45, 1.0, 0.9, 29.0, 0.97, 0.7),
        peers.Row("ditfastattn", "A25", 0.25, 1.0, 0.9, 24.0, 0.92, 0.7),
        peers.Row("TaylorSeer", "interval 8", 0.25, 1.0, 0.9, 20.0, 0.86, 0.6),
    ]
    attention, time = peers.curves("dit-digits", rows)
    assert [s.name for s in attention.series] == ["ditfastattn", "TaylorSeer"]
    assert attention.series[0].points == [(25.0, 24.0), (45.0, 31.0)]
    assert time.series[1].points == [(0.6, 20.0), (0.7, 29.0)]
    save_plot(tmp_path / "curves.png", [attention, time])
    assert (tmp_path / "curves.png").stat().st_size > 0
