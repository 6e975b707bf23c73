"""``torch.compile`` with a plan applied: graphs, recompiles, agreement with eager, per-layer overhead.

A PixArt-Σ-architecture transformer with random weights runs a mixed plan (all five
methods, drawn as in ``bench.e2e``) for two whole ``--steps``-step generations under
``runtime.apply(plan, model, compile=True)``: regional compilation of its blocks, the
method choice a guard. From dynamo's own records it reports the graphs compiled (against
the plan's distinct layer-steps, ``Schedule.variants``), the recompiles (compilations of a
frame that already had a graph) in each generation, and the largest difference between
the compiled and the eager outputs over every step. Then it times a generation eagerly
and compiled, in the same run, as milliseconds per layer-step: at small ``--tokens`` that
is the Python and kernel-launch overhead of a layer. ``--whole`` also measures
``torch.compile`` of the whole transformer after ``apply`` (one graph per distinct row of
the plan). Run: ``python -m bench.compile``.
"""

from __future__ import annotations

import argparse
import re

import msgspec
import torch
import torch._dynamo
from diffusers import PixArtTransformer2DModel
from torch._dynamo.utils import counters

import runtime
from bench.common import device_name, measure, table
from bench.e2e import draw_mix, make_plan
from runtime.apply import CompiledBlocks
from schemas import Plan, config_hash

CAPTION_CHANNELS = 64  # text embeddings: their width does not matter here


class Compiles:
    """Dynamo's compilations since ``start``: each one's compile id ``frame/attempt``."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def start(self) -> None:
        torch._dynamo.reset()  # also clears the callbacks
        counters.clear()
        self.ids.clear()
        torch._dynamo.callback_handler.register_start_callback(lambda args: self.ids.append(args.compile_id))

    def recompiles(self, start: int, stop: int) -> int:
        """Compilations of a frame that already had a graph, among the ``start``-th to ``stop``-th."""
        return sum(1 for cid in self.ids[start:stop] if _attempt(cid) > 0)

    @staticmethod
    def graphs() -> int:
        return counters["stats"]["unique_graphs"]


def _attempt(compile_id: str) -> int:
    found = re.search(r"(\d+)/(\d+)", compile_id)
    return int(found.group(2)) if found else 0


def build(layers: int, side: int, heads: int, head_dim: int, device: torch.device) -> PixArtTransformer2DModel:
    """PixArt-Σ's block architecture with random weights, ``heads x head_dim`` wide."""
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=layers, sample_size=side, patch_size=2, cross_attention_dim=heads * head_dim,
        caption_channels=CAPTION_CHANNELS, norm_type="ada_norm_single", use_additional_conditions=False,
    )
    return model.to(device).eval()


def plan_for(model: PixArtTransformer2DModel, methods: list[list[str]], tokens: int, window: int) -> Plan:
    plan = make_plan(model, methods, tokens, window)
    attn = model.transformer_blocks[0].attn1
    info = msgspec.structs.replace(plan.model, num_heads=attn.heads, head_dim=attn.to_q.out_features // attn.heads,
                                   config_hash=config_hash(dict(model.config)))
    return msgspec.structs.replace(plan, model=info)


def generation(model, steps: int, side: int, device, dtype, text) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    outs = []
    with torch.no_grad():
        for t in range(steps):
            latents = torch.randn(1, 4, side, side, generator=g).to(device, dtype)
            timestep = torch.full((2,), 999.0 - 45 * t, device=device)
            out = model(torch.cat([latents, latents]), encoder_hidden_states=text, timestep=timestep,
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            outs.append(out)
    return outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--heads", type=int, default=16, help="default: PixArt-Σ's 16")
    parser.add_argument("--head-dim", type=int, default=72, help="default: PixArt-Σ's 72")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=5, help="timed generations per figure (median)")
    parser.add_argument("--whole", action="store_true", help="also torch.compile the whole transformer after apply")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), torch.float32
    side = 2 * int(round(args.tokens**0.5))
    window = args.tokens // 8
    model = build(args.layers, side, args.heads, args.head_dim, device)
    plan = plan_for(model, draw_mix(args.steps, args.layers, 0.37, args.tokens, window, 0), args.tokens, window)
    text = torch.randn(2, 16, CAPTION_CHANNELS, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    run = lambda m: generation(m, args.steps, side, device, dtype, text)  # noqa: E731
    per_layer_step = lambda seconds: 1e3 * seconds / (args.steps * args.layers)  # noqa: E731
    times: dict[tuple[str, str], float] = {}

    times["raw", "eager"] = measure(lambda: run(model), device, args.reps)
    with runtime.apply(plan, model) as handle:
        eager = run(model)
        times["plan", "eager"] = measure(lambda: (handle.reset(), run(model)), device, args.reps)
        variants = len(handle.runner.schedule.variants())
    scale = max(e.abs().max().item() for e in eager)

    compiles = Compiles()
    compiles.start()
    with runtime.apply(plan, model, compile={"backend": args.backend}) as handle:
        first = run(model)
        after_first = len(compiles.ids)
        handle.reset()
        second = run(model)
        after_second = len(compiles.ids)
        times["plan", "compiled"] = measure(lambda: (handle.reset(), run(model)), device, args.reps, warmup=0)
    graphs, recompiles = compiles.graphs(), compiles.recompiles(0, after_first)
    worst = max((a - b).abs().max().item() for a, b in zip(first + second, eager + eager))

    compiles.start()  # the same regional compilation without a plan, on fresh caches
    compiled = CompiledBlocks(model, {"backend": args.backend})
    times["raw", "compiled"] = measure(lambda: run(model), device, args.reps)
    compiled.remove()

    print(f"bench.compile: {args.layers} layers x {args.steps} steps, {args.tokens} tokens, "
          f"{args.heads} heads x {args.head_dim}, CFG batch 2, {device_name(device)}, float32, "
          f"backend {args.backend}")
    print(f"plan: {plan.summary.method_counts}; {variants} distinct layer-steps "
          "(method, refresh, keep, conditional-only residual)")
    print(f"apply(plan, model, compile=True): graphs compiled: {graphs}, recompiles: generation 1: "
          f"{recompiles}, generation 2: {after_second - after_first}")
    print(f"max |compiled - eager| over 2 x {args.steps} steps: {worst:.2e} (output scale {scale:.2e})")
    print("time per layer-step (whole generation / (steps x layers), median of "
          f"{args.reps}; at small sizes mostly Python and launch overhead):")
    print(table(
        ["model", "eager ms", "compiled ms", "compiled / eager"],
        [[name, f"{per_layer_step(times[name, 'eager']):.3f}", f"{per_layer_step(times[name, 'compiled']):.3f}",
          f"{times[name, 'compiled'] / times[name, 'eager']:.2f}"] for name in ("raw", "plan")],
    ))

    if args.whole:
        compiles.start()
        with runtime.apply(plan, model) as handle:
            whole = torch.compile(model, backend=args.backend, recompile_limit=args.steps)
            first = run(whole)
            after_first = len(compiles.ids)
            handle.reset()
            second = run(whole)
        rows = len({tuple(row) for row in plan.methods})
        worst = max((a - b).abs().max().item() for a, b in zip(first + second, eager + eager))
        print(f"torch.compile(model) after apply: graphs compiled: {compiles.graphs()} for {rows} distinct "
              f"step rows, recompiles: generation 1: {compiles.recompiles(0, after_first)}, generation 2: "
              f"{len(compiles.ids) - after_first}, max |compiled - eager|: {worst:.2e}")


if __name__ == "__main__":
    main()
