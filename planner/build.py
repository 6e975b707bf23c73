"""Calibrate a loaded diffusers pipeline and produce its plan."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import msgspec
import torch

import runtime
from planner import distributed
from planner.calibration import inputs_hash
from planner.costs import measure_costs
from planner.errors import bad_input
from planner.registry import Family, family_of
from planner.latency import capture_call, measure_latency
from planner.search import CANDIDATES, GreedySearch, Progress
from planner.windows import WindowOption, best, candidates, measure_windows, parse_window, shape_for
from runtime.apply import layer_kinds, self_attention_layers
from runtime.schedule import Schedule
from schemas import (
    SCHEMA_VERSION,
    Calibration,
    Layer,
    ModelInfo,
    Plan,
    Sampling,
    Tokens,
    WindowShape,
    config_hash,
    faster_than_full,
    summarize,
    with_figures,
    with_latency,
)

DEFAULT_WINDOW_FRAC = 1 / 8
# Latent pixels per token side of transformers that pack latent patches themselves (their
# config's ``patch_size`` is 1): FLUX packs 2x2.
PACKED_PATCH = {"FluxTransformer2DModel": 2}
# Latent side a pipeline generates at when the transformer's config has no ``sample_size``
# (``FluxPipeline.default_sample_size``).
DEFAULT_LATENT_SIDE = 128


@dataclass(frozen=True)
class BuildRequest:
    """One calibration run: the inputs, the sampling settings and the search settings.

    ``height``/``width`` ``None`` take the model's native size. ``window`` is
    ``--window``'s value (``planner/windows.py``): ``auto``, a band, or a tiling; ``None``
    is the band of ``window_frac`` of the token count. ``calib_batch`` bounds how many
    prompts go through the transformer at once (losses still cover all of them).
    ``call_kwargs`` are the model's own extra pipeline arguments, over its family's.
    ``family`` is the model's (how it guides); ``None`` takes the pipeline class's.
    """

    name: str
    inputs: tuple[str, ...] | tuple[int, ...]
    delta: float
    steps: int
    guidance: float
    height: int | None = None
    width: int | None = None
    window: int | str | None = None
    window_frac: float = DEFAULT_WINDOW_FRAC
    seed: int = 0
    calib_batch: int | None = None
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    latency: bool = False
    family: Family | None = None


@dataclass(frozen=True)
class BuildResult:
    """The plan, the calibration trajectory's final pipeline output (:func:`own_output`),
    and the search time."""

    plan: Plan
    images: torch.Tensor
    seconds: float


def tool_version() -> str:
    """The installed ditfastattn version, recorded in every plan."""
    try:
        return metadata.version("ditfastattn")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def pipeline_family(pipe: Any) -> Family:
    """The supported family of a loaded pipeline; refuses other pipeline classes."""
    return family_of(type(pipe).__name__, "the pipeline")


def request_family(pipe: Any, request: BuildRequest) -> Family:
    """The family ``request`` calibrates under: its model's, else the pipeline class's."""
    return request.family if request.family is not None else pipeline_family(pipe)


def image_geometry(pipe: Any, height: int | None, width: int | None) -> tuple[int, int, int]:
    """(num_tokens, height, width) of one generation at the asked size."""
    return geometry(pipeline_family(pipe), pipe.transformer, vae_scale(pipe), height, width)


def vae_scale(pipe: Any) -> int:
    """The VAE's image pixels per latent pixel."""
    return getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def geometry(
    family: Family, transformer: Any, vae_scale: int, height: int | None, width: int | None
) -> tuple[int, int, int]:
    """(num_tokens, height, width) of a generation by ``transformer`` (a model or a skeleton).

    ``vae_scale`` is the VAE's pixels per latent; ``None`` sizes take the native one.
    """
    pixels = token_pixels(transformer, vae_scale)
    native = getattr(transformer.config, "sample_size", DEFAULT_LATENT_SIDE) * vae_scale
    multiple = pixels
    if family.inputs == "captions":
        multiple = math.lcm(pixels, 8)  # PixArt pipelines also need multiples of 8 pixels
    elif (height or native) != native or (width or native) != native:
        raise bad_input(
            f"resolution: {type(transformer).__name__} generates {native}x{native} only "
            f"(got {height or native}x{width or native})"
        )
    height, width = height or native, width or native
    if height % multiple or width % multiple:
        raise bad_input(f"height/width: must be multiples of {multiple} (got {height}x{width})")
    return (height // pixels) * (width // pixels), height, width


def token_pixels(transformer: Any, vae_scale: int) -> int:
    """Image pixels per token side: the VAE's scale times the transformer's patch."""
    patch = PACKED_PATCH.get(type(transformer).__name__, transformer.config.patch_size)
    return vae_scale * patch


def patch_grid(pipe: Any, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of the patch grid of an image (a frame) of ``height`` x ``width`` pixels."""
    pixels = token_pixels(pipe.transformer, vae_scale(pipe))
    return height // pixels, width // pixels


def window_option(request: BuildRequest) -> WindowOption:
    """``request.window`` parsed; a bad form is refused in one line naming ``window``."""
    try:
        return parse_window(request.window if request.window is not None else WindowOption("band"))
    except ValueError as exc:
        raise bad_input(f"window: {exc} (got {request.window!r})") from None


def resolve_window(request: BuildRequest, num_tokens: int, grid: tuple[int, ...] = ()) -> WindowShape:
    """The window of the spatial layers: as asked (a tiling completed by the patch ``grid``),
    or the band of ``window_frac`` of the tokens (also ``auto``'s starting point)."""
    try:
        return shape_for(window_option(request), num_tokens, grid, request.window_frac)
    except ValueError as exc:
        raise bad_input(f"window: {exc}") from None


def video_frames(pipe: Any) -> int | None:
    """Frames per video for video DiTs (the transformer's ``video_length``), else ``None``."""
    if getattr(pipe.transformer, "temporal_transformer_blocks", None) is None:
        return None
    return int(pipe.transformer.config.video_length)


def layer_entries(
    pipe: Any, num_tokens: int, window: WindowShape, window_frac: float, text_tokens: int = 0
) -> list[Layer] | None:
    """Per-layer kind, tokens and window of a video DiT (spatial over a frame's tokens,
    temporal over the frames, window ``window_frac`` of them, at least 1) or of an MMDiT
    (joint layers over the image and ``text_tokens`` text tokens, image-only ``attn2``
    layers); ``None`` for image DiTs, whose layers are uniform."""
    kinds = layer_kinds(pipe.transformer)
    if "joint" in kinds:
        return [Layer(kind, num_tokens, window, text_tokens=text_tokens if kind == "joint" else 0) for kind in kinds]
    frames = video_frames(pipe)
    if frames is None:
        return None
    temporal_window = min(max(1, int(frames * window_frac)), max(frames - 1, 1))
    pair = [
        Layer("spatial", num_tokens, window, sequences=frames),
        Layer("temporal", frames, temporal_window, sequences=num_tokens),
    ]
    return pair * len(pipe.transformer.transformer_blocks)


def joint_text_tokens(pipe: Any, request: BuildRequest) -> int:
    """Text tokens in an MMDiT's joint attention (from its first transformer call of the
    calibration run); 0 for models without joint attention."""
    if "joint" not in layer_kinds(pipe.transformer):
        return 0
    _, kwargs = capture_call(pipe, generation_kwargs(pipe, request))
    return int(kwargs["encoder_hidden_states"].shape[1])


def generation_kwargs(pipe: Any, request: BuildRequest) -> dict[str, Any]:
    """The pipeline call that generates the calibration batch."""
    family = request_family(pipe, request)
    common = {
        "num_inference_steps": request.steps,
        family.guidance_arg: request.guidance,
        "generator": torch.Generator("cpu").manual_seed(request.seed),
    }
    if family.inputs == "classes":
        return {**common, "class_labels": list(request.inputs), "output_type": "pt", **request.call_kwargs}
    _, height, width = image_geometry(pipe, request.height, request.width)
    return {
        **common,
        "prompt": list(request.inputs),
        "negative_prompt": "",
        "height": height,
        "width": width,
        "output_type": "latent",
        **({"video_length": video_frames(pipe)} if video_frames(pipe) else {}),
        **family.call_kwargs,
        **request.call_kwargs,
    }


def own_output(pipe: Any, output: Any, request: BuildRequest) -> torch.Tensor:
    """The images (videos: frames) a calibration run made for this rank's prompts: all of
    them in one process (other ranks' rows are not computed in a data-parallel run)."""
    images = output.frames if video_frames(pipe) else output.images
    share = distributed.share(len(request.inputs))
    return images[share.start : share.stop]


def _check_inputs(pipe: Any, request: BuildRequest) -> None:
    timesteps = getattr(pipe.scheduler.config, "num_train_timesteps", None)
    if timesteps is not None and request.steps > timesteps:
        raise bad_input(
            f"steps: {request.steps} exceeds the {timesteps} training timesteps of {type(pipe.scheduler).__name__}"
        )
    if not request.inputs:
        raise bad_input("prompts: the calibration set is empty")
    classes = pipeline_family(pipe).inputs == "classes"
    if classes != all(isinstance(x, int) for x in request.inputs):
        kind = "class ids" if classes else "captions"
        raise bad_input(f"prompts: {type(pipe).__name__} is calibrated on {kind}")
    count = getattr(pipe.transformer.config, "num_embeds_ada_norm", None)
    if classes and count is not None:
        for c in request.inputs:
            if c >= count:
                raise bad_input(f"classes: class id {c} is out of range (the model has {count})")


def draft_plan(pipe: Any, request: BuildRequest, window: WindowShape | None = None) -> Plan:
    """The all-``full`` plan carrying every header fact of this calibration run, with
    ``window`` (default: the one asked for; for ``auto``, the band it starts from)."""
    _check_inputs(pipe, request)
    transformer = pipe.transformer
    layers = self_attention_layers(transformer)
    num_tokens, height, width = image_geometry(pipe, request.height, request.width)
    if window is None:
        window = resolve_window(request, num_tokens, patch_grid(pipe, height, width))
    family = request_family(pipe, request)
    cfg = family.runs_cfg(request.guidance)
    grid = [["full"] * len(layers) for _ in range(request.steps)]
    text_tokens = joint_text_tokens(pipe, request)
    entries = layer_entries(pipe, num_tokens, window, request.window_frac, text_tokens)
    return Plan(
        schema_version=SCHEMA_VERSION,
        tool_version=tool_version(),
        model=ModelInfo(
            class_name=type(transformer).__name__,
            name=request.name,
            config_hash=config_hash(dict(transformer.config)),
            num_layers=len(layers),
            num_heads=layers[0].heads,
            head_dim=layers[0].to_q.out_features // layers[0].heads,
        ),
        tokens=Tokens(
            num_tokens=num_tokens,
            height=height,
            width=width,
            frames=video_frames(pipe),
            text_tokens=text_tokens or None,
        ),
        sampling=Sampling(
            scheduler=type(pipe.scheduler).__name__,
            num_steps=request.steps,
            cfg=cfg,
            cfg_order=family.cfg_order if cfg else None,
            guidance_scale=request.guidance,
            cfg_mode=family.cfg if cfg else "none",
        ),
        window=window,
        methods=grid,
        summary=summarize(grid, num_tokens, window, entries),
        layers=entries,
        calibration=Calibration(
            delta=request.delta,
            metric="rel_l1",
            prompts_hash=inputs_hash(list(request.inputs)),
            num_prompts=len(request.inputs),
            seed=request.seed,
            search="greedy",
            world_size=distributed.size(),
        ),
    )


def settle_window(pipe: Any, request: BuildRequest) -> Plan:
    """The draft plan with its window settled: as asked, or for ``auto`` the candidate of
    least residual error on one all-``full`` generation of the calibration batch
    (``planner/windows.py``), each candidate's error kept in ``calibration.window_errors``."""
    draft = draft_plan(pipe, request)
    if window_option(request).kind != "auto":
        return draft
    tokens = draft.tokens
    shapes = candidates(tokens.num_tokens, patch_grid(pipe, tokens.height, tokens.width), draft.window)
    if len(shapes) == 1:
        return draft
    errors = measure_windows(pipe, draft, shapes, generation_kwargs(pipe, request), request.calib_batch)
    plan = draft_plan(pipe, request, best(shapes, errors))
    calibration = msgspec.structs.replace(plan.calibration, window_errors=errors)
    return msgspec.structs.replace(plan, calibration=calibration)


def build_plan(pipe: Any, request: BuildRequest, *, progress: Progress | None = None) -> BuildResult:
    """Search a plan on ``pipe`` by generating the calibration batch under it (DESIGN §2).

    The runtime's own processors run every trial and the trajectory, so the plan
    is measured exactly as it will execute. ``progress(step, layer, method, loss)``
    is called once per decided cell. The pipeline is left as it was found.
    """
    draft = settle_window(pipe, request)
    latency = measure_latency(pipe, draft, generation_kwargs(pipe, request)) if request.latency else None
    handle = runtime.apply(draft, pipe)
    try:
        handle.runner.schedule = Schedule([list(row) for row in draft.methods], keep_all=True)
        search = GreedySearch(
            handle.runner,
            pipe.transformer,
            delta=request.delta,
            calib_batch=request.calib_batch,
            progress=progress,
            allowed=faster_than_full(latency, CANDIDATES) if latency is not None else None,
        )
        start = time.perf_counter()
        with search.attached():
            images = own_output(pipe, pipe(**generation_kwargs(pipe, request)), request)
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
    methods = search.methods
    plan = msgspec.structs.replace(
        draft,
        methods=methods,
        losses=search.losses,
        summary=summarize(methods, draft.tokens.num_tokens, draft.window, draft.layers),
        costs=measure_costs(pipe, draft, generation_kwargs(pipe, request)),
    )
    return BuildResult(plan=with_latency(with_figures(plan), latency), images=images, seconds=seconds)


def time_generation(pipe: Any, request: BuildRequest) -> float:
    """Seconds of one plain generation of the calibration batch (no plan installed)."""
    start = time.perf_counter()
    pipe(**generation_kwargs(pipe, request))
    return time.perf_counter() - start
