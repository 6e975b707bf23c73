"""Where a generation's time goes: ``torch.profiler`` over one generation, raw and under a plan.

The PixArt-Σ-architecture transformer of ``bench.e2e`` denoises once unmodified and once
under the D6-like mix for each ``--windows`` form, after a warm-up of each. Per run it
prints the wall time, the time the device spent in kernels (on CUDA; on the CPU the
operators' own time), the number of operator calls, and the ``--top`` operators by
their own time. Wall time well above kernel time means the run waits on the host
(Python and kernel launches), which no attention saving removes.
Run: ``python -m bench.trace [--device cuda] [--tokens 4096] [--windows band,tiles2d:32x32:0]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import runtime
from bench.attention import windows_for
from bench.common import device_and_dtype, device_name, split_forms, sync, table
from bench.e2e import TARGETS, build_model, denoise, draw_mix, make_plan
from schemas import window_name


def traced(run, device: torch.device) -> tuple[float, object]:
    """One warm-up call, then one profiled call: its wall seconds and the profile."""
    run()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        run()
        sync(device)
        wall = time.perf_counter() - start
    return wall, prof


def self_seconds(event, device: torch.device) -> float:
    """An operator's (or, on CUDA, a kernel's) own time in seconds."""
    if device.type == "cuda":
        return event.self_device_time_total / 1e6
    return event.self_cpu_time_total / 1e6


def busy_seconds(events, device: torch.device) -> float:
    """Time in kernels (CUDA: the kernel events alone, which the operators' device times
    repeat) or in operators (CPU: their own times, which exclude their children)."""
    if device.type == "cuda":
        return sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6
    return sum(e.self_cpu_time_total for e in events) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=None, help="default: 28 on cuda, 2 on cpu")
    parser.add_argument("--steps", type=int, default=None, help="default: 20 on cuda, 5 on cpu")
    parser.add_argument("--text-tokens", type=int, default=120)
    parser.add_argument("--windows", default="band")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = device_and_dtype(args.device, args.dtype)[1]
    layers, steps = args.layers or (28 if gpu else 2), args.steps or (20 if gpu else 5)
    side = 2 * int(round(args.tokens**0.5))
    model = build_model(layers, side, device, dtype)
    run = lambda: denoise(model, steps, side, device, dtype, args.text_tokens)  # noqa: E731
    print(f"bench.trace: {layers} layers x {steps} steps, {args.tokens} tokens, CFG batch 2 — "
          f"{device_name(device)}, {dtype}")
    summary = []
    windows = windows_for(args.tokens, split_forms(args.windows), 1 / 8)
    runs = [("raw", None)] + [(f"{window_name(w)} D6-like", w) for w in windows]
    for label, window in runs:
        if window is None:
            wall, prof = traced(run, device)
        else:
            grid = draw_mix(steps, layers, TARGETS["D6"], args.tokens, window, seed=args.tokens)
            with runtime.apply(make_plan(model, grid, args.tokens, window), model) as handle:
                wall, prof = traced(lambda: (handle.reset(), run()), device)
        events = prof.key_averages()
        busy = busy_seconds(events, device)
        calls = sum(e.count for e in events if e.key.startswith("aten::"))
        summary.append([label, f"{wall:.3f}", f"{busy:.3f}", f"{busy / wall:.0%}", str(calls)])
        top = sorted(events, key=lambda e: self_seconds(e, device), reverse=True)[: args.top]
        print(f"\n{label}: top operators by own {'device' if gpu else 'CPU'} time")
        print(table(["operator", "calls", "own s"], [[e.key[:60], str(e.count), f"{self_seconds(e, device):.4f}"]
                                                    for e in top]))
    print()
    print(table(["run", "wall s", "kernel s" if gpu else "operator s", "busy", "aten calls"], summary))


if __name__ == "__main__":
    main()
