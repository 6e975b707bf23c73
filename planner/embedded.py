"""The small real models shipped in ``models/``, loaded through the stock diffusers pipelines.

All generate 32×32 handwritten digits through a shared 16×16×4-latent VAE. DiT, PixArt and
SD3 see N = 256 image tokens (patch 1; default window w = N/8 = 32); FLUX packs 2×2 latent
patches into N = 64 tokens (w = 8). Model cards with configurations, training commands and
measured quality: ``models/README.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class EmbeddedModel:
    """Facts about one shipped model: where it is, how to call it, what to calibrate and evaluate on.

    Prompts are class ids for DiT and captions for the others; ``*_digits`` holds the digit
    each prompt asks for (what :func:`planner.yardstick.accuracy` compares against).
    Calibration prompts come from training phrasings; evaluation prompts are disjoint from
    them (held-out classes for DiT, held-out phrasings for the caption models).

    ``layers`` counts self-attention layers (an MMDiT block's joint ``attn`` and, in MMDiT-X
    blocks, its image-only ``attn2``). ``cfg_mode`` is how the pipeline runs CFG: ``batched``
    (both halves in one call, rows in ``cfg_order``) or ``separate`` (FLUX's true CFG: a second
    call on the negative prompt; ``cfg_order`` is ``None``). ``guidance_arg`` is the pipeline
    argument that takes ``guidance``.
    """

    name: str
    folder: Path
    pipeline: Literal["DiTPipeline", "PixArtSigmaPipeline", "LattePipeline", "StableDiffusion3Pipeline", "FluxPipeline"]
    height: int
    width: int
    tokens: int
    window: int
    layers: int
    steps: int
    guidance: float
    cfg_order: Literal["cond_uncond", "uncond_cond"] | None
    calibration_prompts: tuple[int, ...] | tuple[str, ...]
    calibration_digits: tuple[int, ...]
    eval_prompts: tuple[int, ...] | tuple[str, ...]
    eval_digits: tuple[int, ...]
    accuracy: float
    call_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    motion: float | None = None  # video models: card motion consistency (planner.video_yardstick)
    cfg_mode: Literal["batched", "separate"] = "batched"
    guidance_arg: str = "guidance_scale"


_DIT_CALIBRATION = (0, 2, 3, 5, 6, 8)
_DIT_EVAL = (1, 4, 7, 9)

_CAPTION_CALIBRATION = (
    "a handwritten seven",
    "the digit 3",
    "number five, handwritten",
    "handwritten digit 0",
    "the number two",
    "an image of the digit eight",
)
_CAPTION_CALIBRATION_DIGITS = (7, 3, 5, 0, 2, 8)
_CAPTION_EVAL = tuple(
    text
    for d, w in enumerate(DIGIT_WORDS)
    for text in (f"the handwritten digit {w}", f"number {d}, handwritten")
)
_CAPTION_EVAL_DIGITS = tuple(d for d in range(10) for _ in range(2))

# The MMDiTs have no attention masks: captions are encoded at a fixed length (CLIP 8 tokens,
# T5 ``max_sequence_length``), padding included.
_MMDIT_CALL = {"max_sequence_length": 8}

EMBEDDED_MODELS: Mapping[str, EmbeddedModel] = MappingProxyType(
    {
        "dit-digits": EmbeddedModel(
            name="dit-digits",
            folder=MODELS_DIR / "dit-digits",
            pipeline="DiTPipeline",
            height=32,
            width=32,
            tokens=256,
            window=32,
            layers=6,
            steps=20,
            guidance=4.0,
            cfg_order="cond_uncond",
            calibration_prompts=_DIT_CALIBRATION,
            calibration_digits=_DIT_CALIBRATION,
            eval_prompts=_DIT_EVAL,
            eval_digits=_DIT_EVAL,
            accuracy=0.97,
        ),
        "pixart-digits": EmbeddedModel(
            name="pixart-digits",
            folder=MODELS_DIR / "pixart-digits",
            pipeline="PixArtSigmaPipeline",
            height=32,
            width=32,
            tokens=256,
            window=32,
            layers=6,
            steps=20,
            guidance=4.5,
            cfg_order="uncond_cond",
            calibration_prompts=_CAPTION_CALIBRATION,
            calibration_digits=_CAPTION_CALIBRATION_DIGITS,
            eval_prompts=_CAPTION_EVAL,
            eval_digits=_CAPTION_EVAL_DIGITS,
            accuracy=0.37,
            call_kwargs=MappingProxyType(
                {"use_resolution_binning": False, "clean_caption": False, "max_sequence_length": 16}
            ),
        ),
        "sd3-digits": EmbeddedModel(
            name="sd3-digits",
            folder=MODELS_DIR / "sd3-digits",
            pipeline="StableDiffusion3Pipeline",
            height=32,
            width=32,
            tokens=256,
            window=32,
            layers=5,
            steps=20,
            guidance=4.0,
            cfg_order="uncond_cond",
            calibration_prompts=_CAPTION_CALIBRATION,
            calibration_digits=_CAPTION_CALIBRATION_DIGITS,
            eval_prompts=_CAPTION_EVAL,
            eval_digits=_CAPTION_EVAL_DIGITS,
            accuracy=1.0,
            call_kwargs=MappingProxyType(_MMDIT_CALL),
        ),
        "flux-digits": EmbeddedModel(
            name="flux-digits",
            folder=MODELS_DIR / "flux-digits",
            pipeline="FluxPipeline",
            height=32,
            width=32,
            tokens=64,
            window=8,
            layers=6,
            steps=20,
            guidance=4.0,
            cfg_order=None,
            calibration_prompts=_CAPTION_CALIBRATION,
            calibration_digits=_CAPTION_CALIBRATION_DIGITS,
            eval_prompts=_CAPTION_EVAL,
            eval_digits=_CAPTION_EVAL_DIGITS,
            accuracy=1.0,
            call_kwargs=MappingProxyType(_MMDIT_CALL),
            cfg_mode="separate",
            guidance_arg="true_cfg_scale",
        ),
    }
)


# Video models (8-frame LattePipeline): prompts end with the direction the digit moves in;
# ``tokens`` / ``window`` are per frame (spatial layers), ``layers`` counts spatial + temporal.
# latte-digits is trained on unmasked 120-token caption encodings: called with mask_feature=False.
_LATTE_CALIBRATION = (
    "a seven moving left",
    "the digit 3 moving up",
    "a handwritten five sliding right",
    "digit zero moving down",
    "the number two sliding left",
    "handwritten digit 8 moving right",
)
_LATTE_CALIBRATION_DIGITS = (7, 3, 5, 0, 2, 8)
_LATTE_DIRECTIONS = ("left", "right", "up", "down")
_LATTE_EVAL = tuple(
    text
    for d, w in enumerate(DIGIT_WORDS)
    for text in (
        f"the digit {d} sliding {_LATTE_DIRECTIONS[d % 4]}",
        f"the number {w} moving {_LATTE_DIRECTIONS[(d + 2) % 4]}",
    )
)

VIDEO_MODELS: Mapping[str, EmbeddedModel] = MappingProxyType(
    {
        "latte-digits": EmbeddedModel(
            name="latte-digits",
            folder=MODELS_DIR / "latte-digits",
            pipeline="LattePipeline",
            height=32,
            width=32,
            tokens=64,
            window=8,
            layers=6,
            steps=20,
            guidance=4.5,
            cfg_order="uncond_cond",
            calibration_prompts=_LATTE_CALIBRATION,
            calibration_digits=_LATTE_CALIBRATION_DIGITS,
            eval_prompts=_LATTE_EVAL,
            eval_digits=_CAPTION_EVAL_DIGITS,
            accuracy=0.116,
            call_kwargs=MappingProxyType({"clean_caption": False, "video_length": 8, "mask_feature": False}),
            motion=0.375,
        ),
    }
)


def embedded_model(name: str) -> EmbeddedModel:
    """The facts for ``name`` (image or video model); ``KeyError`` listing the known names otherwise."""
    known = {**EMBEDDED_MODELS, **VIDEO_MODELS}
    try:
        return known[name]
    except KeyError:
        raise KeyError(f"unknown embedded model {name!r}; known: {', '.join(known)}") from None


def load_embedded(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """The stock diffusers pipeline for ``name``, loaded from its local folder (no network)."""
    import diffusers

    model = embedded_model(name)
    if not (model.folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{name}: no pipeline at {model.folder} (see models/README.md to train it)")
    cls = getattr(diffusers, model.pipeline)
    pipe = cls.from_pretrained(str(model.folder), dtype=dtype, local_files_only=True, low_cpu_mem_usage=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_kwargs(
    name: str,
    prompts: Sequence[int] | Sequence[str],
    *,
    seed: int = 0,
    output_type: str = "np",
    **overrides: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``pipe(**kwargs)``: model defaults, one generator per image (seed + i),
    and for caption models the empty negative prompt (FLUX runs true CFG only when given one)."""
    model = embedded_model(name)
    kwargs: dict[str, Any] = {
        "num_inference_steps": model.steps,
        model.guidance_arg: model.guidance,
        "generator": [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))],
        "output_type": output_type,
        **model.call_kwargs,
    }
    if model.pipeline == "DiTPipeline":
        kwargs["class_labels"] = [int(p) for p in prompts]
    else:
        kwargs["prompt"] = [str(p) for p in prompts]
        kwargs["negative_prompt"] = ""
        kwargs["height"], kwargs["width"] = model.height, model.width
    kwargs.update(overrides)
    return kwargs


def generate(
    pipe: Any, name: str, prompts: Sequence[int] | Sequence[str], *, seed: int = 0, **overrides: Any
) -> Any:
    """Images for ``prompts`` (``np`` ``[B, H, W, 3]`` in ``[0, 1]`` unless ``output_type`` says otherwise);
    videos ``[B, F, H, W, 3]`` for video models."""
    out = pipe(**pipeline_kwargs(name, prompts, seed=seed, **overrides))
    return out.frames if embedded_model(name).pipeline == "LattePipeline" else out.images
