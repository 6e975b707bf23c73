"""Evaluate a plan: raw and planned images from held-out prompts and seeds, and their yardsticks.

Both runs use the same prompts, seeds and batches, and are timed in the same process,
batch by batch (raw, then planned), so the time ratio compares like with like. The
prompts are the model's held-out evaluation set, never its calibration set, and sample
``i`` uses seed ``seed + i`` (by default the calibration seed + 1000), so no evaluation
latent is a calibration latent.

Figures: attention FLOPs kept (the plan's figure, and what the runtime executed,
residual refreshes included); digit accuracy raw and planned (digit models only);
PSNR (dB, from the mean squared error over all samples; infinite when every image is
identical) and SSIM (mean over samples) of the planned images against the raw ones;
wall time of each run and their ratio planned / raw.

Video models (``LattePipeline``) are evaluated frame by frame: accuracy is per frame
(:func:`planner.video_yardstick.frame_accuracy`), PSNR / SSIM are over all frames, and the
motion consistency of raw and planned videos is reported too (digit video models only).
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import runtime
from planner import video_yardstick, yardstick
from planner.calibration import EVAL_CAPTIONS, EVAL_CLASS_IDS
from planner.embedded import EMBEDDED_MODELS, VIDEO_MODELS
from planner.build import vae_scale
from planner.errors import bad_input
from planner.fit import EVAL_SEED_OFFSET, check_eval_seeds, check_model_fit
from planner.output import write_atomic
from planner.registry import ModelSpec
from runtime.state import RunStats
from schemas import METHODS, Plan

SSIM_WINDOW = 11

Progress = Callable[[], None]


@dataclass(frozen=True)
class EvalInputs:
    """Held-out prompts (captions or class ids), the digit each asks for (digit models), and seeds."""

    prompts: tuple[str, ...] | tuple[int, ...]
    digits: tuple[int, ...] | None
    seeds: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def batches(self, size: int | None) -> list[slice]:
        """Consecutive slices of at most ``size`` samples (all at once when ``None``)."""
        size = size or len(self)
        return [slice(start, min(start + size, len(self))) for start in range(0, len(self), size)]


@dataclass
class EvalResult:
    """What ``planner eval`` reports (see the module docstring for each figure)."""

    model: str
    inputs: EvalInputs
    plan_flops: float
    stats: RunStats
    raw: np.ndarray
    planned: np.ndarray
    seconds_raw: float
    seconds_planned: float
    accuracy_raw: float | None = None
    accuracy_planned: float | None = None
    motion_raw: float | None = None
    motion_planned: float | None = None
    psnr: float = field(init=False)
    ssim: float = field(init=False)

    def __post_init__(self) -> None:
        self.psnr = float(yardstick.psnr(self.raw, self.planned))
        self.ssim = float(yardstick.ssim(self.raw, self.planned, window=ssim_window(self.raw)))

    @property
    def executed_flops(self) -> float:
        return self.stats.attention_flops_fraction

    @property
    def time_ratio(self) -> float:
        return self.seconds_planned / self.seconds_raw

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types; an infinite PSNR is the string ``"inf"``."""
        accuracy = None
        if self.accuracy_raw is not None:
            accuracy = {"raw": self.accuracy_raw, "planned": self.accuracy_planned}
        motion = None
        if self.motion_raw is not None:
            motion = {"raw": self.motion_raw, "planned": self.motion_planned}
        return {
            "model": self.model,
            "num_samples": len(self.inputs),
            "prompts": list(self.inputs.prompts),
            "seeds": list(self.inputs.seeds),
            "attention_flops_kept": {"plan": self.plan_flops, "executed": self.executed_flops},
            "method_counts": dict(self.stats.method_counts),
            "accuracy": accuracy,
            **({"motion_consistency": motion} if motion is not None else {}),
            "psnr_db": "inf" if math.isinf(self.psnr) else self.psnr,
            "ssim": self.ssim,
            "seconds": {"raw": self.seconds_raw, "planned": self.seconds_planned},
            "time_ratio": self.time_ratio,
        }


def ssim_window(images: np.ndarray) -> int:
    """The SSIM Gaussian window: 11 pixels, or the largest odd size that fits smaller images."""
    side = min(images.shape[1], images.shape[2])
    return min(SSIM_WINDOW, side if side % 2 else side - 1)


def default_seed(plan: Plan) -> int:
    """First evaluation seed: the calibration seed + 1000."""
    return (plan.calibration.seed if plan.calibration is not None else 0) + EVAL_SEED_OFFSET


def eval_inputs(spec: ModelSpec, plan: Plan, num_samples: int, seed: int | None) -> EvalInputs:
    """``num_samples`` held-out prompts (cycling through the set) with seeds ``seed + i``.

    Refuses seeds that would repeat the calibration seed.
    """
    if num_samples < 1:
        raise bad_input(f"num_samples: must be >= 1 (got {num_samples})")
    first = default_seed(plan) if seed is None else seed
    check_eval_seeds(first, num_samples)
    seeds = tuple(range(first, first + num_samples))
    if plan.calibration is not None and plan.calibration.seed in seeds:
        raise bad_input(
            f"seed: evaluation seeds {first}…{seeds[-1]} include the calibration seed "
            f"{plan.calibration.seed}; pick another --seed"
        )
    embedded = {**EMBEDDED_MODELS, **VIDEO_MODELS}.get(spec.name) if spec.local else None
    if embedded is not None:
        pool: Sequence[Any] = embedded.eval_prompts
        digits: Sequence[int] | None = embedded.eval_digits
    else:
        pool = EVAL_CLASS_IDS if spec.family.inputs == "classes" else EVAL_CAPTIONS
        digits = None
    picked = [i % len(pool) for i in range(num_samples)]
    return EvalInputs(
        prompts=tuple(pool[i] for i in picked),
        digits=tuple(digits[i] for i in picked) if digits is not None else None,
        seeds=seeds,
    )


def call_kwargs(spec: ModelSpec, plan: Plan, inputs: EvalInputs, rows: slice) -> dict[str, Any]:
    """The pipeline call generating samples ``rows`` as the plan was calibrated (steps, CFG, size)."""
    sampling = plan.sampling
    guidance = sampling.guidance_scale if sampling.guidance_scale is not None else spec.guidance
    common: dict[str, Any] = {
        "num_inference_steps": sampling.num_steps,
        spec.family.guidance_arg: guidance,
        "generator": [torch.Generator("cpu").manual_seed(s) for s in inputs.seeds[rows]],
        "output_type": "np",
    }
    if spec.family.inputs == "classes":
        return {**common, "class_labels": [int(p) for p in inputs.prompts[rows]]}
    return {
        **common,
        "prompt": [str(p) for p in inputs.prompts[rows]],
        "negative_prompt": "",
        "height": plan.tokens.height,
        "width": plan.tokens.width,
        **({"video_length": plan.tokens.frames} if plan.tokens.frames is not None else {}),
        **spec.family.call_kwargs,
    }


def match_scheduler(pipe: Any, plan: Plan) -> None:
    """Give ``pipe`` the scheduler class the plan was calibrated with."""
    import diffusers

    wanted = plan.sampling.scheduler
    if type(pipe.scheduler).__name__ == wanted:
        return
    scheduler_class = getattr(diffusers, wanted, None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        raise bad_input(f"$.sampling.scheduler: unknown diffusers scheduler {wanted!r}")
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)


def check_plan_fits(pipe: Any, spec: ModelSpec, plan: Plan) -> None:
    """Refuse, before generating anything, a plan that does not fit the pipeline."""
    video_plan = plan.tokens.frames is not None or any(x.kind == "temporal" for x in plan.layers or ())
    if video_plan != (getattr(pipe.transformer, "temporal_transformer_blocks", None) is not None):
        raise bad_input(f"plan: a {'video' if video_plan else 'image'} plan does not fit {type(pipe).__name__}")
    if plan.tokens.height is None or plan.tokens.width is None:
        raise bad_input("$.tokens.height: the plan records no image size to evaluate at")
    check_model_fit(plan, spec, pipe.transformer, vae_scale(pipe), dict(pipe.scheduler.config))
    runtime.apply(plan, pipe).remove()  # and the pipeline's own CFG batch order


@contextmanager
def counting_steps(pipe: Any, progress: Progress | None) -> Iterator[None]:
    """Call ``progress()`` after every transformer forward (one denoising step) of ``pipe``."""
    if progress is None:
        yield
        return
    hook = pipe.transformer.register_forward_hook(lambda *args: progress())
    try:
        yield
    finally:
        hook.remove()


def _timed(pipe: Any, kwargs: dict[str, Any]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = pipe(**kwargs)
    images = out.frames if hasattr(out, "frames") else out.images  # videos: [B, F, H, W, C]
    return np.asarray(images, dtype=np.float64), time.perf_counter() - start


def _add_stats(total: RunStats, part: RunStats) -> None:
    for method in METHODS:
        total.method_counts[method] += part.method_counts[method]
    total.residual_refreshes += part.residual_refreshes
    total.steps += part.steps
    total.generations += part.generations
    total.attention_flops += part.attention_flops
    total.full_attention_flops += part.full_attention_flops
    total.peak_cache_bytes = max(total.peak_cache_bytes, part.peak_cache_bytes)


def forwards_needed(plan: Plan, inputs: EvalInputs, batch_size: int | None, repeats: int) -> int:
    """Transformer forwards of one evaluation (for a progress bar): both runs, every batch."""
    return 2 * repeats * len(inputs.batches(batch_size)) * plan.sampling.num_steps


def evaluate(
    pipe: Any,
    spec: ModelSpec,
    plan: Plan,
    inputs: EvalInputs,
    *,
    batch_size: int | None = None,
    repeats: int = 1,
    progress: Progress | None = None,
) -> EvalResult:
    """Generate ``inputs`` without and with ``plan`` on ``pipe`` and measure both (module doc).

    Each batch runs raw then planned, ``repeats`` times each; a run's time is the sum
    over batches of the fastest repeat. One untimed one-sample raw call warms up first.
    """
    if repeats < 1:
        raise bad_input(f"repeats: must be >= 1 (got {repeats})")
    match_scheduler(pipe, plan)
    check_plan_fits(pipe, spec, plan)
    warmup = call_kwargs(spec, plan, inputs, slice(0, 1))
    pipe(**{**warmup, "num_inference_steps": min(2, plan.sampling.num_steps)})
    raw_parts, planned_parts, stats = [], [], RunStats()
    seconds_raw = seconds_planned = 0.0
    with counting_steps(pipe, progress):
        for rows in inputs.batches(batch_size):
            best_raw = best_planned = math.inf
            for _ in range(repeats):  # fresh generators each call: same latents every time
                raw, seconds = _timed(pipe, call_kwargs(spec, plan, inputs, rows))
                best_raw = min(best_raw, seconds)
                with runtime.apply(plan, pipe) as handle:
                    planned, seconds = _timed(pipe, call_kwargs(spec, plan, inputs, rows))
                best_planned = min(best_planned, seconds)
            _add_stats(stats, handle.stats())  # one repeat's count: every repeat runs the same
            raw_parts.append(raw)
            planned_parts.append(planned)
            seconds_raw += best_raw
            seconds_planned += best_planned
    raw_images, planned_images = np.concatenate(raw_parts), np.concatenate(planned_parts)
    accuracy_raw = accuracy_planned = motion_raw = motion_planned = None
    if raw_images.ndim == 5:  # videos: per-frame figures, motion from the captions' direction words
        if inputs.digits is not None:
            accuracy_raw = video_yardstick.frame_accuracy(raw_images, inputs.digits)
            accuracy_planned = video_yardstick.frame_accuracy(planned_images, inputs.digits)
            directions = [video_yardstick.direction_of(str(p)) for p in inputs.prompts]
            motion_raw = video_yardstick.motion_consistency(raw_images, directions)
            motion_planned = video_yardstick.motion_consistency(planned_images, directions)
        raw_images, planned_images = raw_images.reshape(-1, *raw_images.shape[2:]), planned_images.reshape(
            -1, *planned_images.shape[2:]
        )
    elif inputs.digits is not None:
        accuracy_raw = yardstick.accuracy(raw_images, inputs.digits)
        accuracy_planned = yardstick.accuracy(planned_images, inputs.digits)
    return EvalResult(
        model=spec.name,
        inputs=inputs,
        plan_flops=plan.summary.attention_flops_fraction,
        stats=stats,
        raw=raw_images,
        planned=planned_images,
        seconds_raw=seconds_raw,
        seconds_planned=seconds_planned,
        accuracy_raw=accuracy_raw,
        accuracy_planned=accuracy_planned,
        motion_raw=motion_raw,
        motion_planned=motion_planned,
    )


def save_grid(raw: np.ndarray, planned: np.ndarray, path: Path, *, gap: int = 2) -> None:
    """A PNG with the raw samples in the top row and the planned ones below, side by side.

    Images smaller than 96 pixels are enlarged by a whole factor (nearest neighbour).
    """
    from PIL import Image

    count, height, width, _ = raw.shape
    scale = max(1, 96 // max(height, width))
    tile_h, tile_w = height * scale, width * scale
    canvas = np.full(
        (2 * tile_h + 3 * gap, count * tile_w + (count + 1) * gap, 3), 255, dtype=np.uint8
    )
    for row, images in enumerate((raw, planned)):
        pixels = (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
        if pixels.shape[-1] == 1:
            pixels = np.repeat(pixels, 3, axis=-1)
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
        top = gap + row * (tile_h + gap)
        for i, image in enumerate(pixels):
            left = gap + i * (tile_w + gap)
            canvas[top : top + tile_h, left : left + tile_w] = image[..., :3]
    png = io.BytesIO()
    Image.fromarray(canvas).save(png, format="PNG")
    write_atomic(png.getvalue(), path, "save_grid")


def render(result: EvalResult) -> Any:
    """The evaluation as a rich table: one row per figure, raw and planned side by side."""
    from rich.table import Table

    def pct(x: float) -> str:
        return f"{100 * x:.1f} %"

    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("")
    table.add_column("raw", justify="right")
    table.add_column("planned", justify="right")
    table.add_row("attention FLOPs kept (plan)", pct(1.0), pct(result.plan_flops))
    table.add_row("attention FLOPs kept (executed)", pct(1.0), pct(result.executed_flops))
    if result.accuracy_raw is not None:
        table.add_row("digit accuracy", pct(result.accuracy_raw), pct(result.accuracy_planned or 0.0))
    if result.motion_raw is not None:
        table.add_row("motion consistency", pct(result.motion_raw), pct(result.motion_planned or 0.0))
    psnr = "∞ (identical)" if math.isinf(result.psnr) else f"{result.psnr:.2f} dB"
    table.add_row("PSNR vs raw", "", psnr)
    table.add_row("SSIM vs raw", "", f"{result.ssim:.4f}")
    table.add_row(
        "wall time",
        f"{result.seconds_raw:.2f} s",
        f"{result.seconds_planned:.2f} s ({result.time_ratio:.2f}x)",
    )
    return table
