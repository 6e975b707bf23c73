"""Latency of each method's attention against full attention, next to its FLOPs fraction.

Shape: PixArt-Σ's self-attention (16 heads x 72) on a CFG batch of 2 rows. Each method
is timed as the runtime executes it: ``wars`` is the window kernel plus the residual
add; ``asc`` full attention on the conditional row, copied; ``wars_asc`` both; ``ast``
the cached output. Windows (``--windows``, comma-separated ``--window`` forms of
``planner build``, tiles over a square patch grid): ``band`` (default) is the band of
``--window-frac`` of the tokens; ``auto`` adds the tilings ``--window auto`` would try.
``--refresh`` adds, per window, the two ways a full step can refresh the residual
``R = full - window``: ``refresh:full+window`` (full attention, then the window kernel) and
``refresh:merged`` (``runtime/merge.py``: window and complement with their log-sum-exps,
merged), each with the subtraction; their FLOPs are the pairs they compute. The two are
timed in rounds with full attention (full, full+window, merged, …), each round's times
taken as ratios to its full, and the table gives the medians: on a shared machine the
load changes between a window's rows and the ``full`` row, less within a round.
Run: ``python -m bench.attention [--device cuda] [--tokens 1024,4096] [--windows auto] [--refresh]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from bench.common import device_and_dtype, device_name, measure, split_forms, sync, table
from planner.windows import band_width, candidates, parse_window, shape_for
from runtime.kernels import KERNELS, full_attention
from runtime.merge import bind_refresh
from runtime.windows import bind_window
from schemas import WindowShape, method_cost, window_name, window_pairs

REFRESH = ("refresh:full+window", "refresh:merged")


def method_calls(q, k, v, window: WindowShape, kernel: str) -> dict[str, object]:
    n = q.shape[-2]
    win = bind_window(window, n, kernel)
    refresh = bind_refresh(window, n)

    def merged():
        o, w = refresh(q, k, v)
        return o - w
    residual = torch.randn_like(q)
    cache = {0: q}
    c = slice(1, 2)

    return {
        "full": lambda: full_attention(q, k, v),
        "wars": lambda: win(q, k, v) + residual,
        "asc": lambda: torch.cat([full_attention(q[c], k[c], v[c])] * 2),
        "wars_asc": lambda: torch.cat([win(q[c], k[c], v[c]) + residual[c]] * 2),
        "ast": lambda: cache.get(0),
        "refresh:full+window": lambda: full_attention(q, k, v) - win(q, k, v),
        "refresh:merged": merged,
    }


def refresh_cost(method: str, n: int, window: WindowShape) -> float:
    """Pairs a refresh computes, as a fraction of full attention's."""
    return 1.0 + (window_pairs(n, window) / n**2 if method == "refresh:full+window" else 0.0)


def rounds(calls: dict[str, object], device: torch.device, reps: int) -> dict[str, tuple[float, float]]:
    """Each call once untimed, then ``reps`` rounds of all of them: per call, the median time
    and the median of its ratios to the first call's time in the same round."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    base = next(iter(times.values()))
    return {
        name: (statistics.median(ts), statistics.median(t / b for t, b in zip(ts, base))) for name, ts in times.items()
    }


def windows_for(n: int, forms: list[str], window_frac: float) -> list[WindowShape]:
    """The windows ``forms`` name at ``n`` tokens on a square grid (``auto``: the band and its candidates)."""
    side = math.isqrt(n)
    grid = (side, side) if side * side == n else ()
    band = band_width(n, None, window_frac)
    shapes: list[WindowShape] = []
    for form in forms:
        option = parse_window(form) if form != "band" else None
        if option is None:
            found = [band]
        elif option.kind == "auto":
            found = candidates(n, grid, band)
        else:
            found = [shape_for(option, n, grid, window_frac)]
        shapes += [s for s in found if s not in shapes]
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--tokens", default="1024,4096,16384")
    parser.add_argument("--window-frac", type=float, default=1 / 8)
    parser.add_argument("--windows", default="band", help="comma-separated: band, auto, or --window forms")
    parser.add_argument("--kernel", default="auto", choices=KERNELS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--refresh", action="store_true", help="add the residual refresh: full+window vs merged")
    args = parser.parse_args()
    device, dtype = device_and_dtype(args.device, args.dtype)
    forms = split_forms(args.windows)
    rows = []
    for n in map(int, args.tokens.split(",")):
        # [batch, tokens, heads, dim] seen as [batch, heads, tokens, dim]: the layout the processor gets
        q, k, v = (torch.randn(2, n, 16, 72, device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
        reps = 1 if n >= 16384 and device.type == "cpu" else args.reps
        shared = None
        for window in windows_for(n, forms, args.window_frac):
            calls = method_calls(q, k, v, window, args.kernel)
            if shared is None:  # full, asc and ast do not depend on the window
                shared = {m: measure(calls[m], device, reps) for m in ("full", "asc", "ast")}
            times = {m: (measure(calls[m], device, reps), None) for m in ("wars", "wars_asc")}
            if args.refresh:
                timed = rounds({m: calls[m] for m in ("full", *REFRESH)}, device, reps)
                times.update({m: timed[m] for m in REFRESH})
            name = window_name(window)
            for m, (seconds, latency) in times.items():
                flops = refresh_cost(m, n, window) if m in REFRESH else method_cost(m, n, window)
                latency = seconds / shared["full"] if latency is None else latency
                ms, ratio = f"{seconds * 1e3:.2f}", f"{latency / flops:.2f}"
                rows.append([str(n), name, m, ms, f"{latency:.1%}", f"{flops:.1%}", ratio])
        for m in ("asc", "ast", "full"):
            latency, flops = shared[m] / shared["full"], method_cost(m, n, 0)
            ratio = f"{latency / flops:.2f}" if flops else "-"
            rows.append([str(n), "", m, f"{shared[m] * 1e3:.2f}", f"{latency:.1%}", f"{flops:.1%}", ratio])
    print(f"attention latency vs full — {device_name(device)}, {dtype}, kernel={args.kernel}")
    print(table(["N", "window", "method", "ms", "latency", "FLOPs", "latency/FLOPs"], rows))


if __name__ == "__main__":
    main()
