"""The benchmarks run and report what they measure (tiny sizes; no timing asserted)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from bench.e2e import draw_mix
from schemas import summarize


def run(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_attention_bench_prints_every_method():
    text = run("bench.attention", "--tokens", "128", "--reps", "1")
    for method in ("full", "wars", "wars_asc", "asc", "ast"):
        assert re.search(rf"\| 128 \| 16 \| {method} \|", text), text


def test_e2e_bench_prints_raw_and_three_plans():
    text = run("bench.e2e", "--tokens", "64", "--steps", "3", "--layers", "1", "--text-tokens", "4")
    assert "| 64 | raw |" in text
    for level in ("D2", "D4", "D6"):
        assert f"| 64 | {level}-like |" in text


@pytest.mark.parametrize("target", [0.74, 0.52, 0.37])
def test_drawn_mix_hits_its_flops_target(target):
    grid = draw_mix(20, 28, target, 4096, 512, seed=0)
    assert grid[0] == ["full"] * 28
    assert summarize(grid, 4096, 512).attention_flops_fraction == pytest.approx(target, abs=0.01)


def test_compiled_transformer_with_a_plan_matches_eager_with_few_recompiles():
    text = run("bench.compile", "--tokens", "16", "--layers", "2", "--steps", "20")
    found = re.search(r"recompiles: (\d+), max \|compiled - eager\| over 20 steps: ([0-9.e+-]+)", text)
    assert found, text
    assert int(found.group(1)) <= 2
    assert float(found.group(2)) < 1e-4
