"""Shipped plans at target compute: profile a model once, then compile the plan of each target.

``python plans/targets.py dit-digits pixart-digits`` writes ``plans/MODEL/a25.json``,
``a35.json``, ``a45.json`` (attention FLOPs executed about 25, 35, 45 %, forecasts among
the candidates) and ``f40.json`` (feed-forward reuse too, about 40 % of the transformer's
FLOPs). "Executed" counts, as the runtime does, the window attention of the steps that
refresh a ``wars`` residual on top of the plan's own figure. For each target the profile
compiler gives nine plans, with step weights to the power 1, ½ and without them, each
picking the cheapest method that fits with and without per-head cells, and picking by cost
saved per unit of loss (``--pick ratio``): each the plan of the largest δ (on the
compiler's 0.001 grid) whose figure is at most the target.
Beside them stand the uniform schedules of ``planner/schedules.py`` at the same target
(FORA- and TaylorSeer-like: every layer computed on a set of steps, ``ast`` or ``forecast``
between; with the feed-forward layers too for ``f40``), so that a shipped plan never loses
to one of them on the calibration prompts. All candidates generate the calibration prompts
(seeds 0, 1, …, as ``bench/peers.py``); the one closest to the raw images (PSNR) is refined
on that PSNR (``planner/refine.py``: cost-neutral moves of computed steps, at most
``--evals`` scores, the figure kept under the target; the refined grid only if the same
prompts with the next seeds agree) and written; ``--refine-only``
weighs the plans already written against the uniform schedules again (no profile needed)
and refines the winner. The profile uses the model's defaults (its calibration
prompts, steps, window auto, seed 0) on the CPU in float32, without latencies; ``--profile``
reuses one made so.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from planner.compile import RESOLUTION, Compiler, load_profile
from planner.embedded import EMBEDDED_MODELS
from planner.loading import load_pipeline
from planner.output import write_plan
from planner.refine import calibration_score, executed_attention, refine
from planner.registry import resolve_model
from planner.schedules import base_plan, uniform_plans
from runtime import load_plan
from schemas import Plan

ROOT = Path(__file__).resolve().parent.parent
ATTENTION_TARGETS = {"a25": 0.25, "a35": 0.35, "a45": 0.45}
TRANSFORMER_TARGETS = {"f40": 0.40}


POWERS = (1.0, 0.5, None)  # step weights to this power; None: without
PICKS = ((False, "cheapest"), (True, "cheapest"), (False, "ratio"))  # (per-head cells, pick) per power


FIGURES = {"attention": executed_attention, "transformer": lambda plan: plan.summary.transformer_flops_fraction}


def plan_at(compiler: Compiler, target: float, figure: str) -> Plan | None:
    """The plan of the largest δ whose ``figure`` is at most ``target`` (``None``: none)."""
    for k in range(RESOLUTION):
        plan = compiler.plan(round(1 - k / RESOLUTION, 3))
        if FIGURES[figure](plan) <= target:
            return plan
    return None


def distinct(plans: list[Plan]) -> list[Plan]:
    """``plans`` without those that run the same as an earlier one (a per-head compile that chose none)."""
    seen, kept = set(), []
    for plan in plans:
        key = repr((plan.methods, plan.heads, plan.ffn))
        if key not in seen:
            seen.add(key)
            kept.append(plan)
    return kept


def closest_to_raw(score: Callable[[Plan], float], plans: list[Plan]) -> tuple[Plan, list[float]]:
    """Of ``plans``, the one whose calibration images are closest to raw, and each one's PSNR."""
    scores = [score(plan) for plan in plans]
    return plans[int(np.argmax(scores))], scores


def path_of(model: str, name: str) -> Path:
    return ROOT / "plans" / model / f"{name}.json"


def pick_and_refine(pipe: Any, model: str, name: str, options: list[Plan], target: float, figure: str, evals: int) -> Plan:
    """The option closest to raw on the calibration prompts, refined there (both printed)."""
    prompts = EMBEDDED_MODELS[model].calibration_prompts
    score = calibration_score(pipe, resolve_model(model), options[0], prompts)
    plan, scores = closest_to_raw(score, options)
    tried = ", ".join(f"{o.calibration.search} {s:.2f} dB" for o, s in zip(options, scores))
    print(f"plans/{model}/{name}.json  {figure} {FIGURES[figure](plan):.3f}; calibration PSNR: {tried}", flush=True)
    check = calibration_score(pipe, resolve_model(model), plan, prompts, seed_offset=len(prompts))
    return refined(score, check, plan, target, figure, evals)


def refined(
    score: Callable[[Plan], float], check: Callable[[Plan], float], plan: Plan, target: float, figure: str, evals: int
) -> Plan:
    """``plan`` refined on the calibration PSNR (``planner/refine.py``), its figure kept under
    ``target``, if ``check`` agrees."""
    result = refine(plan, score, fits=lambda p: FIGURES[figure](p) <= target, max_evals=evals, check=check)
    verdict = f"; {result.check_note()}" if result.checked is not None else ""
    print(f"    refined: {result.start:.2f} → {result.score:.2f} dB, {result.kept} moves kept of "
          f"{result.evals} scored{verdict}", flush=True)
    return result.plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--evals", type=int, default=40, help="calibration scores the refinement may spend per plan")
    parser.add_argument("--refine-only", action="store_true", help="weigh the plans already in plans/MODEL/ against the uniform schedules, refine, rewrite")
    parser.add_argument("--profile", type=Path, help="use this profile of the (one) model instead of profiling it")
    args = parser.parse_args()
    if args.profile is not None and len(args.models) != 1:
        parser.error("--profile: give one model")
    planner = [sys.executable, "-m", "cli"]
    targets = [(name, target, "attention", False) for name, target in ATTENTION_TARGETS.items()]
    targets += [(name, target, "transformer", True) for name, target in TRANSFORMER_TARGETS.items()]
    for model in args.models:
        pipe = load_pipeline(resolve_model(model), torch.device("cpu"), torch.float32)
        if args.refine_only:
            for name, target, figure, ffn in targets:
                path = path_of(model, name)
                shipped = [load_plan(path)] if path.exists() else []
                base = shipped[0] if shipped else load_plan(path_of(model, "a25"))
                options = shipped + uniform_plans(base, target, FIGURES[figure], ffn=ffn)
                if options:
                    write_plan(pick_and_refine(pipe, model, name, options, target, figure, args.evals), path)
            continue
        if args.profile is not None:
            profile = load_profile(args.profile)
        else:
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / f"{model}.profile"
                subprocess.run([*planner, "profile", "--model", model, "-o", str(path), "--device", "cpu",
                                "--dtype", "float32", "--no-latency", "--quiet"], check=True, cwd=ROOT)  # fmt: skip
                profile = load_profile(path)
        for name, target, figure, ffn in targets:
            compilers = [Compiler(profile, weighted=p is not None, ffn=ffn, power=p or 0.0, heads=heads, pick=pick)
                         for p in POWERS for heads, pick in PICKS]  # fmt: skip
            options = distinct([p for p in (plan_at(c, target, figure) for c in compilers) if p is not None])
            options += uniform_plans(base_plan(profile), target, FIGURES[figure], ffn=ffn)
            if not options:
                print(f"plans/{model}/{name}.json  not written: no plan keeps {figure} FLOPs at most {target}", flush=True)
                continue
            write_plan(pick_and_refine(pipe, model, name, options, target, figure, args.evals), path_of(model, name))

if __name__ == "__main__":
    main()
