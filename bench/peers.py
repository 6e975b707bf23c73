"""Our shipped plans against diffusers' own cache hooks, on the embedded digit models, at matched compute.

Every method generates the same held-out prompts with the same seeds as the raw
pipeline (the model's ``eval_prompts``, seeds 1000 + i), and is judged like
``planner eval``: digit accuracy, PSNR / SSIM against the raw images, and wall time
against the raw pipeline timed back to back in the same process.

Compute, counted while generating:

- *attention FLOPs kept*: self-attention query-key pairs actually computed, over the
  raw pipeline's. The self-attention layers are the runtime's
  (``runtime.apply.self_attention_layers``): ``attn1`` (DiT, PixArt), each MMDiT block's
  joint ``attn`` and SD3's image-only ``attn2``, FLUX's single-stream ``attn``. Ours: the
  runtime's own count (window bands exactly, residual refreshes included). Hooks: every
  such layer whose ``to_q`` runs counts rows x (image + text tokens)² pairs (text: a joint
  layer's ``encoder_hidden_states``; a FLUX single-stream layer gets the joint sequence as
  its ``hidden_states``), the runtime's unit; a skipped or reused attention counts nothing.
- *FFN FLOPs kept*: tokens that went through the blocks' feed-forward (``ff``, the MMDiT
  text stream's ``ff_context``, FLUX single-stream ``proj_mlp``; counted at each one's first
  linear layer, so a reused output counts nothing), over raw's (below 100 % for methods that
  skip whole blocks or reuse feed-forward outputs).

Matching: a peer's knob is swept on the calibration prompts (seeds 0 + i) and the
setting whose attention FLOPs kept is closest to our plan's there is the one run on
the held-out prompts. Peers (``diffusers.hooks``), on the self-attention layers above
(``SELF_ATTENTION``: module-name patterns by transformer class):

- Pyramid Attention Broadcast (skip range 2…6, timestep window (100, 800) or all
  steps);
- FasterCache: attention reuse with its weighted extrapolation (skip range 2…4,
  timestep window (-1, 681) or every step after the first: the attention part skips at
  its first call when that step is in the window and has no cache yet), plus its CFG
  cache of the unconditional half where the pipeline batches ``[uncond, cond]``
  (PixArt, SD3; ``pooled_projections`` split with the other CFG inputs). DiT batches
  ``[cond, uncond]`` while the hook assumes ``[uncond, cond]``, so on DiT only its
  attention part runs (``is_guidance_distilled=True``);
- TaylorSeer on the attention outputs (first-order, cache interval 2…8);
- First Block Cache (skips blocks 1…L-1 when block 0's residual barely changes);
- MagCache (skips all blocks on a magnitude-ratio budget; ratios calibrated on the
  calibration prompts with its own ``calibrate=True`` mode, the first CFG call's).

Left out (``LEFT_OUT``), as they fail or mix what they cache:

- sd3-digits, First Block Cache: the last SD3 block is ``context_pre_only`` and returns
  ``None`` for the text stream, which the hook's tail subtracts from its cached text
  output (``TypeError: unsupported operand type(s) for -: 'NoneType' and 'Tensor'``).
- flux-digits, PAB and FasterCache. The pipeline runs the two CFG halves as separate
  transformer calls under ``cache_context("cond")`` / ``("uncond")``, and these two hooks
  keep one state per attention module, not one per cache context (TaylorSeer, First
  Block Cache and MagCache key theirs by context): PAB hands one call the other's
  attention output, FasterCache extrapolates one call's from the other's, and its CFG
  cache splits each call's batch as if it were ``[uncond, cond]`` (``RuntimeError:
  Tensors must have same number of dimensions: got 4 and 3``). As run here FasterCache
  fails sooner: FLUX takes the timestep over 1000, so every step lies in its window and
  it skips at the first call (``TypeError: 'NoneType' object is not subscriptable``).

Run: ``python -m bench.peers [--models dit-digits,pixart-digits] [--plans d3,d6]``
(``--models sd3-digits,flux-digits`` for the MMDiTs; ``--plans`` also takes plan files).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import io
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import runtime
from bench.common import table
from bench.plot import Panel, Series, save_plot
from planner import yardstick
from planner.embedded import EMBEDDED_MODELS
from planner.evaluate import EvalInputs, call_kwargs, eval_inputs, ssim_window
from planner.loading import load_pipeline, quiet_libraries
from planner.registry import ModelSpec, resolve_model
from runtime.apply import self_attention_layers
from schemas import Plan

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SelfAttention:
    """A transformer class's self-attention layers, as the hooks select them.

    ``pattern`` matches their module names in full; ``label`` names them in the settings.
    """

    label: str
    pattern: str


SELF_ATTENTION = {
    "DiTTransformer2DModel": SelfAttention("attn1", r"transformer_blocks\.\d+\.attn1"),
    "PixArtTransformer2DModel": SelfAttention("attn1", r"transformer_blocks\.\d+\.attn1"),
    "SD3Transformer2DModel": SelfAttention("attn, attn2", r"transformer_blocks\.\d+\.attn2?"),
    "FluxTransformer2DModel": SelfAttention("attn", r"(single_)?transformer_blocks\.\d+\.attn"),
}

FEED_FORWARDS = ("ff", "ff_context", "proj_mlp")

# The transformer inputs FasterCache splits into CFG halves: its default, and SD3's pooled text embedding.
CFG_INPUTS = (
    "hidden_states", "encoder_hidden_states", "timestep", "attention_mask", "encoder_attention_mask",
    "pooled_projections",
)  # fmt: skip

# Peers left out on a model (why: the module docstring).
LEFT_OUT = {"sd3-digits": ("FirstBlockCache",), "flux-digits": ("PAB", "FasterCache")}


# ---------------------------------------------------------------------------
# counting what ran


def feed_forwards(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """Every block's feed-forward modules: ``ff``, the MMDiT text stream's ``ff_context``,
    FLUX single-stream ``proj_mlp``."""
    blocks = [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", ())]
    return [ffn for block in blocks for name in FEED_FORWARDS if (ffn := getattr(block, name, None)) is not None]


class Meter:
    """Self-attention pairs and feed-forward tokens computed by a transformer, via forward hooks.

    A self-attention layer's call notes its text tokens (``encoder_hidden_states``); its
    ``to_q`` running then counts rows x (tokens + text tokens)² pairs.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.pairs = 0.0
        self.ffn_tokens = 0.0
        self._text_tokens = 0
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        for attn in self_attention_layers(transformer):
            self._hooks.append(attn.register_forward_pre_hook(self._call, with_kwargs=True))
            self._hooks.append(attn.to_q.register_forward_pre_hook(self._attention))
        for ffn in feed_forwards(transformer):  # its first linear layer: a reused output runs none
            first = next(m for m in ffn.modules() if isinstance(m, torch.nn.Linear))
            self._hooks.append(first.register_forward_pre_hook(self._ffn))

    def _call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self._text_tokens = 0 if context is None else context.shape[1]

    def _attention(self, module: torch.nn.Module, args: tuple) -> None:
        rows, tokens = args[0].shape[:2]
        self.pairs += rows * (tokens + self._text_tokens) ** 2

    def _ffn(self, module: torch.nn.Module, args: tuple) -> None:
        self.ffn_tokens += args[0].shape[:-1].numel()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


class Clock:
    """The current denoising timestep, read from the transformer's ``timestep`` argument."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.value = 1000.0
        self._hook = transformer.register_forward_pre_hook(self._read, with_kwargs=True)

    def _read(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep")
        if t is not None:
            self.value = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)

    def __call__(self) -> float:
        return self.value

    def remove(self) -> None:
        self._hook.remove()


# ---------------------------------------------------------------------------
# methods


@dataclass(frozen=True)
class Method:
    """One way of running the pipeline: ``attach(pipe)`` installs it for the ``with`` block.

    The context yields a function called before every generation, which returns
    the attention pairs the method computed since the last call when it counts them
    itself (our runtime), else ``None`` (the meter's count is used).
    """

    name: str
    setting: str
    attach: Callable[[Any], contextlib.AbstractContextManager[Callable[[], float | None]]]


def ours(name: str, plan: Plan) -> Method:
    @contextlib.contextmanager
    def attach(pipe: Any) -> Iterator[Callable[[], float | None]]:
        with runtime.apply(plan, pipe) as handle:
            def pairs() -> float:
                done = handle.stats().attention_flops
                handle.reset(stats=True)
                return done

            yield pairs

    return Method("ditfastattn", f"{name} (δ {plan.calibration.delta if plan.calibration else '-'})", attach)


def hook_method(name: str, setting: str, install: Callable[[torch.nn.Module, Clock], None]) -> Method:
    """A diffusers hook installed on a copy of the transformer, its state reset per generation."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    @contextlib.contextmanager
    def attach(pipe: Any) -> Iterator[Callable[[], float | None]]:
        original = pipe.transformer
        model = copy.deepcopy(original)
        clock = Clock(model)
        install(model, clock)
        registry = HookRegistry.check_if_exists_or_initialize(model)
        registry.invalidate_child_registries_cache()

        def reset() -> None:
            registry.reset_stateful_hooks(recurse=True)
            _set_cache_context(model, CacheContext("cond_uncond"))

        pipe.transformer = model
        try:
            yield lambda: reset()
        finally:
            pipe.transformer = original
            clock.remove()

    return Method(name, setting, attach)


def pab(layers: SelfAttention, skip: int, window: tuple[int, int]) -> Method:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    def install(model: torch.nn.Module, clock: Clock) -> None:
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip,
            spatial_attention_timestep_skip_range=window,
            spatial_attention_block_identifiers=(f"^{layers.pattern}$",),
            current_timestep_callback=clock,
        )
        apply_pyramid_attention_broadcast(model, config)

    return hook_method("PAB", f"{layers.label} every {skip}, t in {window}", install)


def faster_cache(layers: SelfAttention, skip: int, window: tuple[int, int], cfg_cache: bool) -> Method:
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache

    def install(model: torch.nn.Module, clock: Clock) -> None:
        config = FasterCacheConfig(
            spatial_attention_block_skip_range=skip,
            spatial_attention_timestep_skip_range=window,
            spatial_attention_block_identifiers=(f"^{layers.pattern}$",),
            current_timestep_callback=clock,
            attention_weight_callback=lambda _: 0.5,
            tensor_format="BCHW",
            is_guidance_distilled=not cfg_cache,
            _unconditional_conditional_input_kwargs_identifiers=CFG_INPUTS,
        )
        apply_faster_cache(model, config)

    part = "" if cfg_cache else ", attention part only"
    return hook_method("FasterCache", f"{layers.label} every {skip}, t in {window}{part}", install)


def taylorseer(layers: SelfAttention, interval: int) -> Method:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    def install(model: torch.nn.Module, clock: Clock) -> None:
        config = TaylorSeerCacheConfig(
            cache_interval=interval,
            disable_cache_before_step=3,
            max_order=1,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=[layers.pattern],
        )
        apply_taylorseer_cache(model, config)

    return hook_method("TaylorSeer", f"{layers.label}, interval {interval}, order 1", install)


def first_block_cache(threshold: float) -> Method:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    def install(model: torch.nn.Module, clock: Clock) -> None:
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))

    return hook_method("FirstBlockCache", f"threshold {threshold:g}", install)


def mag_cache(threshold: float, ratios: list[float], steps: int) -> Method:
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    def install(model: torch.nn.Module, clock: Clock) -> None:
        config = MagCacheConfig(threshold=threshold, num_inference_steps=steps, mag_ratios=list(ratios))
        apply_mag_cache(model, config)

    return hook_method("MagCache", f"threshold {threshold:g}, K 3", install)


def mag_ratios(pipe: Any, spec: ModelSpec, plan: Plan, inputs: EvalInputs) -> list[float]:
    """MagCache's per-step magnitude ratios from its own calibration run (it prints them,
    once per cache context: the first is the conditional call's where CFG calls are separate)."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    def install(model: torch.nn.Module, clock: Clock) -> None:
        apply_mag_cache(model, MagCacheConfig(calibrate=True, num_inference_steps=plan.sampling.num_steps))

    printed = io.StringIO()
    with hook_method("MagCache", "calibration", install).attach(pipe) as reset:
        reset()
        with contextlib.redirect_stdout(printed):
            pipe(**call_kwargs(spec, plan, inputs, slice(None)))
    lists = [line for line in printed.getvalue().splitlines() if line.startswith("[") and line.endswith("]")]
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios")
    return [float(x) for x in ast.literal_eval(lists[0])]


def candidates(model: str, pipe: Any, spec: ModelSpec, plan: Plan, calibration: EvalInputs) -> dict[str, list[Method]]:
    """Each peer's sweep of its main knob, by peer name, less the peers in ``LEFT_OUT``."""
    layers = SELF_ATTENTION[type(pipe.transformer).__name__]
    cfg_cache = EMBEDDED_MODELS[model].cfg_order == "uncond_cond"
    ratios = mag_ratios(pipe, spec, plan, calibration)
    steps = plan.sampling.num_steps
    sweep = {
        "PAB": [pab(layers, s, w) for w in ((100, 800), (-1, 1000)) for s in (2, 3, 4, 6)],
        "FasterCache": [faster_cache(layers, s, w, cfg_cache) for w in ((-1, 681), (-1, 990)) for s in (2, 3, 4)],
        "TaylorSeer": [taylorseer(layers, i) for i in (2, 3, 4, 5, 6, 8)],
        "FirstBlockCache": [first_block_cache(t) for t in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8)],
        "MagCache": [mag_cache(t, ratios, steps) for t in (0.01, 0.03, 0.06, 0.12, 0.24, 0.5)],
    }
    return {peer: methods for peer, methods in sweep.items() if peer not in LEFT_OUT.get(model, ())}


# ---------------------------------------------------------------------------
# measuring


@dataclass
class Run:
    images: np.ndarray
    seconds: float
    pairs: float
    ffn_tokens: float


def generate(pipe: Any, spec: ModelSpec, plan: Plan, inputs: EvalInputs, method: Method | None) -> Run:
    """One timed generation of ``inputs``, raw or under ``method``, with its compute counted."""
    with contextlib.ExitStack() as stack:
        before = stack.enter_context(method.attach(pipe)) if method else (lambda: None)
        meter = Meter(pipe.transformer)
        stack.callback(meter.remove)
        before()
        kwargs = call_kwargs(spec, plan, inputs, slice(None))
        start = time.perf_counter()
        images = pipe(**kwargs).images
        seconds = time.perf_counter() - start
        own = before()
    pairs = own if own is not None else meter.pairs
    return Run(np.asarray(images, dtype=np.float64), seconds, pairs, meter.ffn_tokens)


@dataclass
class Row:
    method: str
    setting: str
    attention: float
    ffn: float
    accuracy: float | None
    psnr: float
    ssim: float
    time_ratio: float

    def cells(self) -> list[str]:
        accuracy = "-" if self.accuracy is None else f"{100 * self.accuracy:.0f} %"
        psnr = "∞" if math.isinf(self.psnr) else f"{self.psnr:.1f}"
        return [
            self.method, self.setting, f"{100 * self.attention:.1f} %", f"{100 * self.ffn:.0f} %",
            accuracy, psnr, f"{self.ssim:.3f}", f"{self.time_ratio:.2f}",
        ]  # fmt: skip


def measure(
    pipe: Any, spec: ModelSpec, plan: Plan, inputs: EvalInputs, method: Method | None, repeats: int
) -> Row:
    """``method`` against raw on ``inputs``: raw and method alternate ``repeats`` times, fastest kept."""
    raw_best = done_best = math.inf
    for _ in range(repeats):
        raw = generate(pipe, spec, plan, inputs, None)
        done = generate(pipe, spec, plan, inputs, method)
        raw_best, done_best = min(raw_best, raw.seconds), min(done_best, done.seconds)
    accuracy = yardstick.accuracy(done.images, inputs.digits) if inputs.digits is not None else None
    return Row(
        method.name if method else "raw",
        method.setting if method else "",
        done.pairs / raw.pairs,
        done.ffn_tokens / raw.ffn_tokens,
        accuracy,
        float(yardstick.psnr(raw.images, done.images)),
        float(yardstick.ssim(raw.images, done.images, window=ssim_window(raw.images))),
        done_best / raw_best,
    )


def attention_kept(pipe: Any, spec: ModelSpec, plan: Plan, inputs: EvalInputs, method: Method, raw_pairs: float) -> float:
    return generate(pipe, spec, plan, inputs, method).pairs / raw_pairs


def calibration_inputs(model: str) -> EvalInputs:
    facts = EMBEDDED_MODELS[model]
    count = len(facts.calibration_prompts)
    return EvalInputs(facts.calibration_prompts, facts.calibration_digits, tuple(range(count)))


def load_plans(model: str, names: list[str]) -> dict[str, Plan]:
    """Our plans by label: a name is the shipped ``plans/MODEL/NAME.json``, a ``.json`` path
    a plan file (labelled by its stem)."""
    paths = [Path(name) if name.endswith(".json") else ROOT / "plans" / model / f"{name}.json" for name in names]
    return {path.stem: runtime.load_plan(path) for path in paths}


def compare(model: str, plan_names: list[str], num_samples: int, repeats: int, bar: Progress) -> tuple[str, list[Row]]:
    """The markdown table for one model (raw, then per plan ours and each peer at matched
    compute) and its rows."""
    spec = resolve_model(model)
    pipe = load_pipeline(spec, torch.device("cpu"), torch.float32)
    plans = load_plans(model, plan_names)
    first = next(iter(plans.values()))
    held_out = eval_inputs(spec, first, num_samples, None)
    calibration = calibration_inputs(model)
    sweep = candidates(model, pipe, spec, first, calibration)
    task = bar.add_task(model, total=sum(map(len, sweep.values())) + len(plans) * (1 + len(sweep)) + 1)
    raw_pairs = generate(pipe, spec, first, calibration, None).pairs
    kept = {}
    for methods in sweep.values():
        for method in methods:
            kept[method] = attention_kept(pipe, spec, first, calibration, method, raw_pairs)
            bar.advance(task)
    rows = [measure(pipe, spec, first, held_out, None, 1)]
    bar.advance(task)
    for name, plan in plans.items():
        target = attention_kept(pipe, spec, plan, calibration, ours(name.upper(), plan), raw_pairs)
        rows.append(measure(pipe, spec, plan, held_out, ours(name.upper(), plan), repeats))
        bar.advance(task)
        for peer, methods in sweep.items():
            closest = min(methods, key=lambda m: abs(kept[m] - target))
            rows.append(measure(pipe, spec, plan, held_out, closest, repeats))
            bar.advance(task)
    headers = [
        "method", "setting", "attn FLOPs kept", "FFN FLOPs kept", "digit accuracy",
        "PSNR vs raw (dB)", "SSIM vs raw", "time / raw",
    ]  # fmt: skip
    title = f"{model}: {len(held_out)} held-out samples, {first.sampling.num_steps} steps, CPU float32"
    return title + "\n\n" + table(headers, [row.cells() for row in rows]), rows


def curves(model: str, rows: list[Row]) -> list[Panel]:
    """PSNR against attention FLOPs kept and against time, one series per method (raw left out)."""
    names = list(dict.fromkeys(row.method for row in rows if row.method != "raw"))

    def series(x: Callable[[Row], float]) -> list[Series]:
        return [Series(n, sorted((x(r), r.psnr) for r in rows if r.method == n)) for n in names]

    return [
        Panel(f"{model}: quality against attention kept", "attention FLOPs kept (%)", "PSNR vs raw (dB)",
              series(lambda r: 100 * r.attention)),
        Panel(f"{model}: quality against wall time", "time / raw", "PSNR vs raw (dB)", series(lambda r: r.time_ratio),
              lines=False),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="dit-digits,pixart-digits")
    parser.add_argument(
        "--plans",
        default="d3,d6",
        help="Our plans to match: shipped names (plans/MODEL/NAME.json) or plan files (.json).",
    )
    parser.add_argument("--num-samples", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="Timed runs per method (fastest kept).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument("--plot", type=Path, default=None, help="Also save the curves as this PNG file.")
    args = parser.parse_args()
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        parser.error(f"--plot: {args.plot} is not a .png file")
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    tables, panels = [], []
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    ) as bar:
        for model in args.models.split(","):
            text, rows = compare(model, args.plans.split(","), args.num_samples, args.repeats, bar)
            tables.append(text)
            panels += curves(model, rows)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("\n\n".join(tables))
    if args.plot is not None:
        save_plot(args.plot, panels, title="ditfastattn plans and diffusers' caches")
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
