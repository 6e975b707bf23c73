"""Latency of each method's attention against full attention, next to its FLOPs fraction.

Shape: PixArt-Σ's self-attention (16 heads x 72) on a CFG batch of 2 rows. Each method
is timed as the runtime executes it: ``wars`` is the window kernel plus the residual
add; ``asc`` full attention on the conditional row, copied; ``wars_asc`` both; ``ast``
the cached output. Run: ``python -m bench.attention [--device cuda] [--tokens 1024,4096]``.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import device_name, measure, table
from runtime.kernels import KERNELS, full_attention, resolve_window_kernel
from schemas import method_cost


def method_calls(q, k, v, window: int, kernel: str) -> dict[str, object]:
    win = resolve_window_kernel(kernel)
    residual = torch.randn_like(q)
    cache = {0: q}
    c = slice(1, 2)

    return {
        "full": lambda: full_attention(q, k, v),
        "wars": lambda: win(q, k, v, window) + residual,
        "asc": lambda: torch.cat([full_attention(q[c], k[c], v[c])] * 2),
        "wars_asc": lambda: torch.cat([win(q[c], k[c], v[c], window) + residual[c]] * 2),
        "ast": lambda: cache.get(0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--tokens", default="1024,4096,16384")
    parser.add_argument("--window-frac", type=float, default=1 / 8)
    parser.add_argument("--kernel", default="auto", choices=KERNELS)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    rows = []
    for n in map(int, args.tokens.split(",")):
        window = max(1, int(n * args.window_frac))
        # [batch, tokens, heads, dim] seen as [batch, heads, tokens, dim]: the layout the processor gets
        q, k, v = (torch.randn(2, n, 16, 72, device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
        calls = method_calls(q, k, v, window, args.kernel)
        reps = 1 if n >= 16384 and device.type == "cpu" else args.reps
        times = {m: measure(fn, device, reps) for m, fn in calls.items()}
        for m in ("wars", "wars_asc", "asc", "ast"):
            latency = times[m] / times["full"]
            flops = method_cost(m, n, window)
            rows.append([
                str(n), str(window), m, f"{times[m] * 1e3:.2f}", f"{latency:.1%}", f"{flops:.1%}",
                f"{latency / flops:.2f}" if flops else "-",
            ])
        rows.append([str(n), str(window), "full", f"{times['full'] * 1e3:.2f}", "100.0%", "100.0%", "1.00"])
    print(f"attention latency vs full — {device_name(device)}, {dtype}, kernel={args.kernel}")
    print(table(["N", "w", "method", "ms", "latency", "FLOPs", "latency/FLOPs"], rows))


if __name__ == "__main__":
    main()
