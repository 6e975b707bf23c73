"""Measured latency of each method on the planning device, as the runtime executes it.

Each variant is timed as whole transformer forwards with every layer running it,
through ``runtime.apply`` on the model being calibrated, at one prompt's rows of a real
calibration call (both CFG halves when CFG is on): a forward of ``T(v) = A + L·a(v)``
seconds (``A`` the layers' other work) gives the per-layer-step figure ``T(v) / L``.
Differences between variants are then exactly the attention parts' differences, and a
plan's predicted time is the sum of its cells' figures (``schemas.time_fraction``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import msgspec
import torch

import runtime
from planner import distributed
from planner.loading import device_name
from planner.search import Chunks
from schemas import Latency, Plan, cfg_mode_of, summarize
from schemas.latency import CFG_VARIANTS

# Per variant: the methods of every layer at steps 0, 1, … and the step that is timed.
PROBES: dict[str, tuple[tuple[str, ...], int]] = {
    "full": (("full", "full"), 1),
    "full_refresh": (("full", "wars"), 0),
    "asc": (("full", "asc"), 1),
    "asc_refresh": (("full", "asc", "wars"), 1),
    "wars": (("full", "wars"), 1),
    "wars_asc": (("full", "wars_asc"), 1),
    "ast": (("full", "ast"), 1),
    "forecast": (("full", "full", "forecast"), 2),
}


class _Captured(Exception):
    def __init__(self, args: tuple, kwargs: dict) -> None:
        self.args_, self.kwargs = args, kwargs


def capture_call(pipe: Any, call: dict[str, Any]) -> tuple[tuple, dict]:
    """The arguments of the first transformer call that ``pipe(**call)`` makes (nothing more runs)."""

    def stop(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        raise _Captured(args, kwargs)

    hook = pipe.transformer.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        pipe(**call)
    except _Captured as captured:
        return captured.args_, {k: v for k, v in captured.kwargs.items() if k != "return_dict"}
    finally:
        hook.remove()
    raise RuntimeError("the pipeline never called its transformer")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(
    plan: Plan, transformer: torch.nn.Module, args: tuple, kwargs: dict, timed: int, kernel: str = "auto"
) -> float:
    """Seconds of the forward at step ``timed`` of ``plan`` (the earlier steps run untimed)."""
    device = next(transformer.parameters()).device
    with torch.inference_mode(), runtime.apply(plan, transformer, kernel=kernel, strict=False):
        for step in range(timed + 1):
            if step == timed:
                _synchronize(device)
                start = time.perf_counter()
            transformer(*args, return_dict=False, **kwargs)
        _synchronize(device)
        return time.perf_counter() - start


def measure_latency(pipe: Any, draft: Plan, call: dict[str, Any], **options: Any) -> Latency:
    """Seconds per layer-step of each method variant on ``pipe``'s device (module doc).

    ``draft`` is the all-``full`` plan of the calibration run (its header fixes tokens,
    window and CFG); ``call`` the pipeline call of the calibration batch, whose first
    transformer call, cut to one prompt's rows, is what is timed. ``options`` go to
    :func:`measure_transformer`.
    """
    args, kwargs = capture_call(pipe, call)
    rows = (args[0] if args else kwargs["hidden_states"]).shape[0]
    batched = cfg_mode_of(draft.sampling) == "batched"
    [(args, kwargs)] = Chunks(rows, batched, 1).split(args, kwargs)[:1]
    if cfg_mode_of(draft.sampling) != "separate":
        return measure_transformer(pipe.transformer, draft, args, kwargs, **options)
    single = msgspec.structs.replace(
        draft, sampling=msgspec.structs.replace(draft.sampling, cfg=False, cfg_order=None, cfg_mode="none")
    )
    return separate_step(measure_transformer(pipe.transformer, single, args, kwargs, **options))


def separate_step(call: Latency) -> Latency:
    """Per-step figures with CFG in separate calls from one call's: a step is two calls, and
    the unconditional call of a shared method returns the conditional call's output (what
    ``ast`` costs); an ``asc`` refresh hands its residual over."""
    s = call.seconds
    seconds = {variant: 2 * s[variant] for variant in ("full", "full_refresh", "wars", "ast", "forecast")}
    seconds.update(
        asc=s["full"] + s["ast"], asc_refresh=s["full_refresh"] + s["ast"], wars_asc=s["wars"] + s["ast"]
    )
    return msgspec.structs.replace(call, rows=2 * call.rows, seconds=seconds)


def measure_transformer(
    transformer: torch.nn.Module,
    draft: Plan,
    args: tuple,
    kwargs: dict,
    *,
    kernel: str = "auto",
    repeats: int = 5,
    warmup: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> Latency:
    """Seconds per layer-step of each variant: ``transformer(*args, **kwargs)`` under probe plans.

    Each variant is timed ``warmup + repeats`` times, interleaved with the others, and
    the median of the last ``repeats`` is kept; ``progress(done, total)`` follows the
    rounds. Under ``torchrun`` rank 0's figures are every rank's, so all ranks decide alike.
    """
    layers = draft.model.num_layers
    probes: dict[str, tuple[Plan, int]] = {}
    for variant, (steps, timed) in PROBES.items():
        if variant in CFG_VARIANTS and cfg_mode_of(draft.sampling) != "batched":
            continue
        grid = [[method] * layers for method in steps]
        plan = msgspec.structs.replace(
            draft,
            sampling=msgspec.structs.replace(draft.sampling, num_steps=len(grid)),
            methods=grid,
            losses=None,
            latency=None,
            summary=summarize(grid, draft.tokens.num_tokens, draft.window, draft.layers),
        )
        probes[variant] = plan, timed
    samples: dict[str, list[float]] = {variant: [] for variant in probes}
    for round_ in range(warmup + repeats):  # variants interleaved, so drifts hit all alike
        for variant, (plan, timed) in probes.items():
            seconds = time_forward(plan, transformer, args, kwargs, timed, kernel)
            if round_ >= warmup:
                samples[variant].append(seconds)
        if progress is not None:
            progress(round_ + 1, warmup + repeats)
    figures = {variant: statistics.median(values) / layers for variant, values in samples.items()}
    shared = distributed.sum_floats([value if distributed.is_writer() else 0.0 for value in figures.values()])
    parameter = next(transformer.parameters())
    return Latency(
        device=device_name(parameter.device),
        dtype=str(parameter.dtype).removeprefix("torch."),
        kernel=kernel,
        rows=int((args[0] if args else kwargs["hidden_states"]).shape[0]),
        seconds=dict(zip(figures, shared)),
    )
