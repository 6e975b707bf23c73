"""Uniform schedules as plans: every layer computes on a set of steps and reuses between them.

These are the step caches of the literature written in the plan grammar: with ``ast``
between computed steps, FORA's reuse; with ``forecast``, TaylorSeer's first-order
extrapolation from the last two computed steps. A compiled plan should never lose to
them at the same compute, so ``plans/targets.py`` generates them beside the compiled
plans and keeps whichever is closest to the raw images on the calibration prompts.

Computed steps: the first ``warmup``, then every ``interval``-th step after the last of
them (``warmup - 1 + k·interval``). With ``ffn`` the feed-forward layers follow the same
steps (``compute`` / ``reuse`` / ``forecast``), as a block cache skips whole blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec

from planner.compile import tool_version
from schemas import Plan, Profile
from schemas.profile import ffn_width, header_plan, profile_calibration

REUSES = {"ast": "reuse", "forecast": "forecast"}  # attention method → feed-forward method
WARMUPS = (1, 2, 3)
MAX_INTERVAL = 12


def computed_steps(steps: int, interval: int, warmup: int) -> list[bool]:
    """Per step, whether every layer computes it."""
    return [t < warmup or (t - warmup + 1) % interval == 0 for t in range(steps)]


def uniform_plan(profile: Profile, interval: int, warmup: int, reuse: str, *, ffn: bool = False) -> Plan:
    """The plan that computes every layer at ``computed_steps`` and runs ``reuse`` between."""
    if reuse not in REUSES:
        raise ValueError(f"reuse: expected one of {sorted(REUSES)}, not {reuse!r}")
    if reuse == "forecast" and warmup < 2:
        raise ValueError("warmup: a forecast needs two computed steps before it (warmup >= 2)")
    computed = computed_steps(profile.sampling.num_steps, interval, warmup)
    layers, width = profile.model.num_layers, ffn_width(profile) if ffn else None
    if ffn and width is None:
        raise ValueError("ffn: the profile measured no feed-forward layers")
    methods = [["full" if c else reuse] * layers for c in computed]
    grid = [["compute" if c else REUSES[reuse]] * width for c in computed] if width else None
    search = f"uniform-{reuse}-every-{interval}-after-{warmup}" + ("-ffn" if width else "")
    plan = header_plan(profile, methods, grid)
    return msgspec.structs.replace(
        plan, tool_version=tool_version(), calibration=profile_calibration(profile, 1.0, search)
    )


def uniform_plans(
    profile: Profile, target: float, figure: Callable[[Plan], float], *, ffn: bool = False,
    reuses: Iterable[str] = ("ast", "forecast"),
) -> list[Plan]:
    """Per reuse method and warm-up, the uniform plan of the smallest interval whose
    ``figure`` is at most ``target`` (the most compute that fits), where one does."""
    found = []
    for reuse in reuses:
        for warmup in WARMUPS:
            if reuse == "forecast" and warmup < 2:
                continue
            for interval in range(2, MAX_INTERVAL + 1):
                plan = uniform_plan(profile, interval, warmup, reuse, ffn=ffn)
                if figure(plan) <= target:
                    found.append(plan)
                    break
    return found
