"""The benchmarks run and report what they measure (tiny sizes; no timing asserted)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from bench.e2e import draw_mix
from schemas import summarize, window_pairs


def run(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_attention_bench_prints_every_method():
    text = run("bench.attention", "--tokens", "128", "--reps", "1", "--windows", "band,tiles1d:32:1")
    for window in ("band:16", "tiles1d:32:1"):
        for method in ("wars", "wars_asc"):
            assert re.search(rf"\| 128 \| {window} \| {method} \|", text), text
    for method in ("full", "asc", "ast"):
        assert re.search(rf"\| 128 \|  \| {method} \|", text), text


def test_attention_bench_prints_both_refreshes_per_window():
    text = run("bench.attention", "--tokens", "128", "--reps", "1", "--windows", "band,tiles1d:32:1", "--refresh")
    for window, pairs in (("band:16", 1 + window_pairs(128, 16) / 128**2), ("tiles1d:32:1", 1 + 96 / 128)):
        assert re.search(rf"\| 128 \| {window} \| refresh:full\+window \| [0-9.]+ \| [0-9.]+% \| {pairs:.1%} \|", text), text
        assert re.search(rf"\| 128 \| {window} \| refresh:merged \| [0-9.]+ \| [0-9.]+% \| 100.0% \|", text), text
    assert "refresh" not in run("bench.attention", "--tokens", "128", "--reps", "1")


def test_e2e_bench_prints_raw_and_three_plans_per_window():
    text = run(
        "bench.e2e", "--tokens", "64", "--steps", "3", "--layers", "1", "--text-tokens", "4",
        "--windows", "band,tiles2d:4x4:0",
    )  # fmt: skip
    assert text.count("| 64 | raw |") == 1
    for window in ("band:8", "tiles2d:4x4:0"):
        for level in ("D2", "D4", "D6"):
            assert re.search(rf"\| 64 \| {window} {level}-like( \(= latency-aware\))? \|", text), text
        assert f"latencies at 64 tokens, {window}:" in text


def test_exactness_bench_finds_every_kernel_exact_in_float32():
    text = run("bench.exactness", "--tokens", "256", "--windows", "auto")
    errors = re.findall(r"\| 256 \| (\S+) \| ([a-z :]+) \| ([0-9.e+-]+|nan) \|", text)
    assert {w for w, _, _ in errors} >= {"band:32", "tiles1d:64:0", "tiles2d:8x8:0"}, text
    assert len(errors) == 3 * len({w for w, _, _ in errors})
    assert all(float(e) < 1e-5 for *_, e in errors), text


@pytest.mark.parametrize("target", [0.74, 0.52, 0.37])
def test_drawn_mix_hits_its_flops_target(target):
    grid = draw_mix(20, 28, target, 4096, 512, seed=0)
    assert grid[0] == ["full"] * 28
    assert summarize(grid, 4096, 512).attention_flops_fraction == pytest.approx(target, abs=0.01)


def test_compiled_plan_has_one_graph_per_layer_step_variant_and_no_recompile_in_generation_two():
    text = run(
        "bench.compile", "--tokens", "16", "--layers", "2", "--steps", "8", "--heads", "2", "--head-dim", "8",
        "--threads", "1", "--reps", "3",
    )
    variants = re.search(r"; (\d+) distinct layer-steps", text)
    found = re.search(r"graphs compiled: (\d+), recompiles: generation 1: (\d+), generation 2: (\d+)", text)
    worst = re.search(r"max \|compiled - eager\| over 2 x 8 steps: ([0-9.e+-]+) \(output scale ([0-9.e+-]+)\)", text)
    assert variants and found and worst, text
    assert 1 < int(found.group(1)) <= int(variants.group(1)) < 2 * 8  # fewer graphs than layer-steps
    assert int(found.group(3)) == 0
    assert float(worst.group(1)) < 1e-4 * float(worst.group(2))
    assert re.search(r"\| plan \| [0-9.]+ \| [0-9.]+ \|", text), text


def test_trace_bench_summarises_raw_and_each_window():
    text = run(
        "bench.trace", "--tokens", "64", "--layers", "1", "--steps", "2", "--text-tokens", "4",
        "--windows", "band,tiles2d:4x4:0", "--top", "3",
    )  # fmt: skip
    for label in ("raw", "band:8 D6-like", "tiles2d:4x4:0 D6-like"):
        found = re.search(rf"\| {re.escape(label)} \| ([0-9.]+) \| ([0-9.]+) \| [0-9]+% \| ([0-9]+) \|", text)
        assert found and float(found[1]) > 0 and int(found[3]) > 0, text
        assert f"\n{label}: top operators by own CPU time" in text
