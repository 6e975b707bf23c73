"""The window kernels and the merged refresh on a device, against a float64 dense-mask reference.

For each ``--windows`` form (as in ``bench.attention``) at each ``--tokens``, fresh random
q, k, v in the processor's layout (16 heads x 72, batch 2) go through the window kernel
(``runtime.windows.bind_window``) and the merged refresh (``runtime.merge.bind_refresh``)
in the device's dtype; the table gives ``||out - ref|| / ||ref||`` against softmax
attention under the window's dense mask (and without one, for the refresh's full
output) computed in float64 on the same device. Run before timing on a new device:
``python -m bench.exactness --device cuda``.
"""

from __future__ import annotations

import argparse

import torch

from bench.attention import windows_for
from bench.common import device_and_dtype, device_name, split_forms, table
from runtime.kernels import KERNELS
from runtime.merge import bind_refresh
from runtime.windows import bind_window, mask
from schemas import window_name


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention in float64 on the inputs' device, keys outside ``allowed`` excluded."""
    q, k, v = (x.detach().to(torch.float64) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().to(ref.device, torch.float64)
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--tokens", default="1024,4096")
    parser.add_argument("--windows", default="auto", help="comma-separated: band, auto, or --window forms")
    parser.add_argument("--kernel", default="auto", choices=KERNELS)
    args = parser.parse_args()
    device, dtype = device_and_dtype(args.device, args.dtype)
    forms = split_forms(args.windows)
    rows = []
    for n in map(int, args.tokens.split(",")):
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(2, n, 16, 72, generator=gen).to(device, dtype).transpose(1, 2) for _ in range(3))
        full_ref = reference(q, k, v, None)
        for window in windows_for(n, forms, 1 / 8):
            allowed = mask(window, n, device)
            window_ref = reference(q, k, v, allowed)
            full, win = bind_refresh(window, n)(q, k, v)
            errors = {
                "window kernel": relative_error(bind_window(window, n, args.kernel)(q, k, v), window_ref),
                "merged refresh: full": relative_error(full, full_ref),
                "merged refresh: window": relative_error(win, window_ref),
            }
            rows += [[str(n), window_name(window), what, f"{e:.1e}"] for what, e in errors.items()]
    print(f"exactness against float64 — {device_name(device)}, {dtype}, kernel={args.kernel}")
    print(table(["N", "window", "output", "relative error"], rows))


if __name__ == "__main__":
    main()
