"""Latency of each method's attention against full attention, next to its FLOPs fraction.

Shape: PixArt-Σ's self-attention (16 heads x 72) on a CFG batch of 2 rows. Each method
is timed as the runtime executes it: ``wars`` is the window kernel plus the residual
add; ``asc`` full attention on the conditional row, copied; ``wars_asc`` both; ``ast``
the cached output. Windows (``--windows``, comma-separated ``--window`` forms of
``planner build``, tiles over a square patch grid): ``band`` (default) is the band of
``--window-frac`` of the tokens; ``auto`` adds the tilings ``--window auto`` would try.
Run: ``python -m bench.attention [--device cuda] [--tokens 1024,4096] [--windows auto]``.
"""

from __future__ import annotations

import argparse
import math

import torch

from bench.common import device_name, measure, table
from planner.windows import band_width, candidates, parse_window, shape_for
from runtime.kernels import KERNELS, full_attention
from runtime.windows import bind_window
from schemas import WindowShape, method_cost, window_name


def method_calls(q, k, v, window: WindowShape, kernel: str) -> dict[str, object]:
    n = q.shape[-2]
    win = bind_window(window, n, kernel)
    residual = torch.randn_like(q)
    cache = {0: q}
    c = slice(1, 2)

    return {
        "full": lambda: full_attention(q, k, v),
        "wars": lambda: win(q, k, v) + residual,
        "asc": lambda: torch.cat([full_attention(q[c], k[c], v[c])] * 2),
        "wars_asc": lambda: torch.cat([win(q[c], k[c], v[c]) + residual[c]] * 2),
        "ast": lambda: cache.get(0),
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
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    forms = [f.strip() for f in args.windows.split(",") if f.strip()]
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
            times = {**shared, **{m: measure(calls[m], device, reps) for m in ("wars", "wars_asc")}}
            name = window_name(window)
            for m in ("wars", "wars_asc"):
                latency, flops = times[m] / times["full"], method_cost(m, n, window)
                ms, ratio = f"{times[m] * 1e3:.2f}", f"{latency / flops:.2f}"
                rows.append([str(n), name, m, ms, f"{latency:.1%}", f"{flops:.1%}", ratio])
        for m in ("asc", "ast", "full"):
            latency, flops = shared[m] / shared["full"], method_cost(m, n, 0)
            ratio = f"{latency / flops:.2f}" if flops else "-"
            rows.append([str(n), "", m, f"{shared[m] * 1e3:.2f}", f"{latency:.1%}", f"{flops:.1%}", ratio])
    print(f"attention latency vs full — {device_name(device)}, {dtype}, kernel={args.kernel}")
    print(table(["N", "window", "method", "ms", "latency", "FLOPs", "latency/FLOPs"], rows))


if __name__ == "__main__":
    main()
