"""End-to-end denoising with plans against the unmodified transformer, in one run.

A PixArt-Σ-architecture transformer with random weights (speed does not depend on
them) denoises a CFG batch for ``--steps`` steps, first unmodified, then under plans
whose method mix matches the attention FLOPs the paper reports for PixArt-Σ 1K at
D2, D4 and D6 (74 %, 52 %, 37 %).

How a mix is drawn: step 0 is ``full``; of the other (step, layer) cells a share
``1 - s`` stays ``full`` and the rest is split 0.3/0.3/0.2/0.2 between
``ast``/``wars``/``wars_asc``/``asc``. ``s`` is found by bisection so that the FLOPs
fraction hits the target; the cells get their methods in those counts (rounded),
placed in a seeded random order, and the grid's exact fraction is reported.

Each mix also runs latency-aware: the methods' latencies are measured on this transformer
and device first (``planner.latency``, as ``planner build`` does), every cell whose method
is not faster than ``full`` there becomes ``full``, and the row shows the predicted time
fraction and the predicted seconds spent refreshing residuals (``full``/``asc`` steps that
also run the window for a later ``wars``). ``--windows`` takes ``--window`` forms as in
``bench.attention`` (default ``band``: the band of N/8); each window gets its own mixes.
Run: ``python -m bench.e2e [--device cuda --layers 28] [--windows band,tiles2d:32x32:0]``.
"""

from __future__ import annotations

import argparse
import random

import torch
from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

import runtime
from bench.attention import windows_for
from bench.common import device_and_dtype, device_name, measure, split_forms, table
from planner.latency import measure_transformer
from planner.report import latency_fact
from schemas import (
    WindowShape,
    METHODS,
    SCHEMA_VERSION,
    Latency,
    ModelInfo,
    Plan,
    Sampling,
    Tokens,
    config_hash,
    faster_than_full,
    method_cost,
    summarize,
    variant_grid,
    window_name,
    with_latency,
)

TARGETS = {"D2": 0.74, "D4": 0.52, "D6": 0.37}
SHARES = {"ast": 0.3, "wars": 0.3, "wars_asc": 0.2, "asc": 0.2}


def draw_mix(steps: int, layers: int, target: float, tokens: int, window: WindowShape, seed: int) -> list[list[str]]:
    """A method grid whose expected attention FLOPs fraction is ``target`` (see module doc)."""
    compressed = sum(p * method_cost(m, tokens, window) for m, p in SHARES.items())

    def expected(s: float) -> float:
        later = (1 - s) + s * compressed
        return (1 + (steps - 1) * later) / steps

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected(mid) > target else (lo, mid)
    cells = (steps - 1) * layers
    counts = {m: round(cells * lo * p) for m, p in SHARES.items()}
    pool = [m for m, c in counts.items() for _ in range(c)]
    pool += ["full"] * (cells - len(pool))
    random.Random(seed).shuffle(pool)
    return [["full"] * layers] + [pool[t * layers:(t + 1) * layers] for t in range(steps - 1)]


def build_model(layers: int, side: int, device: torch.device, dtype: torch.dtype) -> PixArtTransformer2DModel:
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=16,
        attention_head_dim=72,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=side,
        patch_size=2,
        cross_attention_dim=1152,
        caption_channels=4096,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    return model.to(device=device, dtype=dtype).eval()


def make_plan(model: torch.nn.Module, methods: list[list[str]], tokens: int, window: WindowShape) -> Plan:
    return Plan(
        schema_version=SCHEMA_VERSION,
        tool_version="bench",
        model=ModelInfo(type(model).__name__, "pixart-sigma-random", config_hash(dict(model.config)),
                        len(methods[0]), 16, 72),
        tokens=Tokens(num_tokens=tokens),
        sampling=Sampling("DPMSolverMultistepScheduler", len(methods), True, "uncond_cond", 4.5),
        window=window,
        methods=methods,
        summary=summarize(methods, tokens, window),
    )


def inputs(side: int, device, dtype, text_tokens: int) -> tuple[torch.Tensor, dict]:
    """Seeded latents and the transformer's other arguments for a CFG batch of 2."""
    g = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(1, 4, side, side, generator=g).to(device, dtype)
    text = torch.randn(2, text_tokens, 4096, generator=g).to(device, dtype)
    return latents, {"encoder_hidden_states": text, "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def denoise(model, steps: int, side: int, device, dtype, text_tokens: int) -> torch.Tensor:
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(steps)
    latents, kwargs = inputs(side, device, dtype, text_tokens)
    with torch.no_grad():
        for t in scheduler.timesteps:
            batch = torch.cat([latents, latents])
            out = model(batch, timestep=t.expand(2).to(device), **kwargs).sample
            uncond, cond_out = out[:, :4].chunk(2)
            eps = uncond + 4.5 * (cond_out - uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--tokens", default="4096,16384")
    parser.add_argument("--layers", type=int, default=None, help="default: 28 on cuda, 2 on cpu")
    parser.add_argument("--steps", type=int, default=None, help="default: 20 on cuda, 5 on cpu")
    parser.add_argument("--text-tokens", type=int, default=120)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--kernel", default="auto")
    parser.add_argument("--windows", default="band", help="comma-separated --window forms (bench.attention)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = device_and_dtype(args.device, args.dtype)[1]
    layers = args.layers or (28 if gpu else 2)
    steps = args.steps or (20 if gpu else 5)
    headers = ["N", "plan", "attn FLOPs kept", "predicted time", "seconds", "speedup", "refresh s (predicted)",
               "peak mem MiB", "cache MiB", "cache / one layer's activations"]
    print(f"end to end, {layers} layers x {steps} steps, CFG batch 2 — {device_name(device)}, {dtype}")
    print(table(headers, []), flush=True)  # then each row as soon as it is measured

    def emit(row: list[str]) -> None:
        print("| " + " | ".join(row) + " |", flush=True)

    forms = split_forms(args.windows)
    facts = []
    for tokens in map(int, args.tokens.split(",")):
        side = 2 * int(round(tokens**0.5))  # latent side; patch 2 gives `tokens` tokens
        model = build_model(layers, side, device, dtype)
        run = lambda: denoise(model, steps, side, device, dtype, args.text_tokens)  # noqa: E731
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        raw = measure(run, device, args.reps)
        raw_peak = torch.cuda.max_memory_allocated(device) if gpu else 0
        activation = 2 * tokens * 1152 * torch.finfo(dtype).bits // 8
        emit([str(tokens), "raw", "100.0%", "-", f"{raw:.2f}", "1.00x", "-", _mib(raw_peak), "0", "-"])
        for window in windows_for(tokens, forms, 1 / 8):
            latency = measure_latency(model, tokens, window, side, device, dtype, args)
            for name, target in TARGETS.items():
                methods = draw_mix(steps, layers, target, tokens, window, seed=tokens)
                allowed = set(faster_than_full(latency, tuple(m for m in METHODS if m != "full")))
                aware = [[m if m == "full" or m in allowed else "full" for m in row] for row in methods]
                variants = [(f"{name}-like", methods), (f"{name}-like, latency-aware", aware)]
                if aware == methods:  # every method is faster than full here: one grid, timed once
                    variants = [(f"{name}-like (= latency-aware)", methods)]
                for label, grid in variants:
                    plan = with_latency(make_plan(model, grid, tokens, window), latency)
                    if gpu:
                        torch.cuda.reset_peak_memory_stats(device)
                    with runtime.apply(plan, model, kernel=args.kernel) as handle:
                        timed = measure(lambda: (handle.reset(), run()), device, args.reps)
                    peak = torch.cuda.max_memory_allocated(device) if gpu else 0
                    cache = handle.stats().peak_cache_bytes
                    emit([
                        str(tokens), f"{window_name(window)} {label}", f"{plan.summary.attention_flops_fraction:.1%}",
                        f"{plan.summary.time_fraction:.2f}", f"{timed:.2f}", f"{raw / timed:.2f}x",
                        f"{refresh_seconds(grid, latency):.3f}", _mib(peak), _mib(cache), f"{cache / activation:.1f}",
                    ])  # fmt: skip
            facts.append(f"latencies at {tokens} tokens, {window_name(window)}: {latency_fact(latency)}")
        del model
    print("\n".join(["", *facts]))


def measure_latency(model, tokens: int, window: WindowShape, side: int, device, dtype, args) -> Latency:
    """Each method's seconds per layer-step on this model and device, at one denoising call."""
    latents, kwargs = inputs(side, device, dtype, args.text_tokens)
    batch = torch.cat([latents, latents])
    kwargs = {**kwargs, "timestep": torch.full((2,), 500, device=device)}
    draft = make_plan(model, [["full"] * len(model.transformer_blocks)], tokens, window)
    return measure_transformer(model, draft, (batch,), kwargs, kernel=args.kernel, repeats=3, warmup=1)


def refresh_seconds(grid: list[list[str]], latency: Latency) -> float:
    """Predicted seconds that the grid's refreshing steps add over plain ``full``/``asc``."""
    extra = {"full_refresh": "full", "asc_refresh": "asc"}
    return sum(
        max(0.0, latency.seconds[v] - latency.seconds[extra[v]]) for row in variant_grid(grid) for v in row if v in extra
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f}" if n else "-"


if __name__ == "__main__":
    main()
