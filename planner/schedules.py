"""Uniform schedules as plans: every layer computes on a set of steps and reuses between them.

These are the step caches of the literature written in the plan grammar: with ``ast``
between computed steps, FORA's reuse; with ``forecast``, TaylorSeer's first-order
extrapolation from the last two computed steps (``ast`` on the steps with only one
computed step before them, where TaylorSeer falls back to order 0). A compiled plan
should never lose to them at the same compute, so ``plans/targets.py`` generates them
beside the compiled plans and keeps whichever is closest to the raw images on the
calibration prompts.

Computed steps: the first ``warmup``, then every ``interval``-th step after the last of
them (``warmup - 1 + k·interval``). With ``ffn`` the feed-forward layers follow the same
steps (``compute`` / ``reuse`` / ``forecast``), as a block cache skips whole blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec

from planner.compile import tool_version
from planner.refine import with_methods
from schemas import Plan, Profile
from schemas.profile import header_plan, profile_calibration

REUSES = {"ast": "reuse", "forecast": "forecast"}  # attention method → feed-forward method
WARMUPS = (1, 2, 3, 4, 5)
MAX_INTERVAL = 12


def computed_steps(steps: int, interval: int, warmup: int) -> list[bool]:
    """Per step, whether every layer computes it."""
    return [t < warmup or (t - warmup + 1) % interval == 0 for t in range(steps)]


def base_plan(profile: Profile) -> Plan:
    """An all-``full`` plan with ``profile``'s header facts, to build uniform plans from."""
    plan = header_plan(profile)
    return msgspec.structs.replace(
        plan, tool_version=tool_version(), calibration=profile_calibration(profile, 1.0, "profile")
    )


def uniform_plan(base: Plan, interval: int, warmup: int, reuse: str, *, ffn: bool = False) -> Plan:
    """The plan that computes every layer at ``computed_steps`` and runs ``reuse`` between;
    ``base`` (any plan of the model and sampling, e.g. ``base_plan(profile)``) gives the
    header facts and the feed-forward layers (``$.costs.ffn``)."""
    if reuse not in REUSES:
        raise ValueError(f"reuse: expected one of {sorted(REUSES)}, not {reuse!r}")
    if base.calibration is None:
        raise ValueError("base: the plan records no calibration")
    computed = computed_steps(base.sampling.num_steps, interval, warmup)
    between = [reuse if sum(computed[:t]) >= 2 else "ast" for t in range(len(computed))]
    width = len(base.costs.ffn) if ffn and base.costs is not None else 0
    if ffn and not width:
        raise ValueError("ffn: the plan counts no feed-forward layers ($.costs.ffn)")
    methods = [["full" if c else m] * base.model.num_layers for c, m in zip(computed, between)]
    grid = [["compute" if c else REUSES[m]] * width for c, m in zip(computed, between)] if width else None
    search = f"uniform-{reuse}-every-{interval}-after-{warmup}" + ("-ffn" if width else "")
    calibration = msgspec.structs.replace(base.calibration, delta=1.0, search=search)
    plan = msgspec.structs.replace(base, ffn=grid, calibration=calibration)
    return with_methods(plan, methods)


def uniform_plans(
    base: Plan, target: float, figure: Callable[[Plan], float], *, ffn: bool = False,
    reuses: Iterable[str] = ("ast", "forecast"),
) -> list[Plan]:
    """Per reuse method and warm-up, the uniform plan of the smallest interval whose
    ``figure`` is at most ``target`` (the most compute that fits), where one does."""
    found = []
    for reuse in reuses:
        for warmup in WARMUPS:
            for interval in range(2, MAX_INTERVAL + 1):
                plan = uniform_plan(base, interval, warmup, reuse, ffn=ffn)
                if figure(plan) <= target:
                    found.append(plan)
                    break
    return found
