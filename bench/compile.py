"""``torch.compile`` with a plan applied: recompiles over a generation, and agreement with eager.

Counts, from torch's dynamo counters, the frames compiled and the recompiles (guard
failures) over a ``--steps``-step generation under a mixed plan, and compares every
step's output with the same plan run eagerly. Run: ``python -m bench.compile``.
"""

from __future__ import annotations

import argparse

import torch
import torch._dynamo
from torch._dynamo.utils import counters, guard_failures

import runtime
from bench.e2e import build_model, draw_mix, make_plan


def generation(model, compiled, plan, steps: int, side: int, device, dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 16, 4096, generator=g).to(device, dtype)
    outs = []
    with runtime.apply(plan, model), torch.no_grad():
        for t in range(steps):
            latents = torch.randn(1, 4, side, side, generator=g).to(device, dtype)
            timestep = torch.full((2,), 999.0 - 45 * t, device=device)
            out = compiled(torch.cat([latents, latents]), encoder_hidden_states=text, timestep=timestep,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            outs.append(out)
    return outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.float32
    side = 2 * int(round(args.tokens**0.5))
    model = build_model(args.layers, side, device, dtype)
    plan = make_plan(model, draw_mix(args.steps, args.layers, 0.37, args.tokens, args.tokens // 8, 0),
                     args.tokens, args.tokens // 8)
    eager = generation(model, model, plan, args.steps, side, device, dtype)
    torch._dynamo.reset()
    counters.clear()
    guard_failures.clear()
    compiled = generation(model, torch.compile(model), plan, args.steps, side, device, dtype)
    recompiles = sum(len(v) for v in guard_failures.values())
    worst = max((a - b).abs().max().item() for a, b in zip(compiled, eager))
    print(f"plan: {plan.summary.method_counts}")
    print(f"frames compiled: {counters['frames']['ok']}, recompiles: {recompiles}, "
          f"max |compiled - eager| over {args.steps} steps: {worst:.2e}")


if __name__ == "__main__":
    main()
