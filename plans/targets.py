"""Shipped plans at target compute: profile a model once, then compile the plan of each target.

``python plans/targets.py dit-digits pixart-digits`` writes ``plans/MODEL/a25.json``,
``a35.json``, ``a45.json`` (attention FLOPs kept about 25, 35, 45 %: the profile compiler's
default, forecasts and step weights) and ``f40.json`` (feed-forward reuse too, about 40 % of
the transformer's FLOPs). Each is the plan of the largest δ (on the compiler's 0.001 grid)
whose figure is at most the target. The profile uses the model's defaults (its calibration
prompts, 20 steps, window auto, seed 0) on the CPU in float32, without latencies.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from planner.compile import RESOLUTION, Compiler, load_profile
from planner.output import write_plan

ROOT = Path(__file__).resolve().parent.parent
ATTENTION_TARGETS = {"a25": 0.25, "a35": 0.35, "a45": 0.45}
TRANSFORMER_TARGETS = {"f40": 0.40}


def plan_at(compiler: Compiler, target: float, figure: str):
    """The plan of the largest δ whose ``summary.<figure>`` is at most ``target``."""
    for k in range(RESOLUTION):
        plan = compiler.plan(1 - k / RESOLUTION)
        if getattr(plan.summary, figure) <= target:
            return plan
    raise SystemExit(f"error: no δ reaches {figure} {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    planner = [sys.executable, "-m", "cli"]
    for model in args.models:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{model}.profile"
            subprocess.run([*planner, "profile", "--model", model, "-o", str(path), "--device", "cpu",
                            "--dtype", "float32", "--no-latency", "--quiet"], check=True, cwd=ROOT)  # fmt: skip
            profile = load_profile(path)
        attention, transformer = Compiler(profile, objective="flops"), Compiler(profile, ffn=True)
        for name, target in ATTENTION_TARGETS.items():
            plan = plan_at(attention, target, "attention_flops_fraction")
            write_plan(plan, ROOT / "plans" / model / f"{name}.json")
            print(f"plans/{model}/{name}.json  δ {plan.calibration.delta}, attention {plan.summary.attention_flops_fraction:.3f}")
        for name, target in TRANSFORMER_TARGETS.items():
            plan = plan_at(transformer, target, "transformer_flops_fraction")
            write_plan(plan, ROOT / "plans" / model / f"{name}.json")
            print(f"plans/{model}/{name}.json  δ {plan.calibration.delta}, transformer {plan.summary.transformer_flops_fraction:.3f}")


if __name__ == "__main__":
    main()
