"""Known models: registry names, the diffusers pipelines they use, and their defaults."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from planner.embedded import EMBEDDED_MODELS, VIDEO_MODELS, EmbeddedModel
from planner.errors import bad_input
from runtime.apply import PIPELINE_CFG_ORDER


@dataclass(frozen=True)
class Family:
    """What calibrating a supported diffusers pipeline class needs.

    ``inputs`` says whether the pipeline is conditioned on captions or class ids;
    ``call_kwargs`` are extra arguments of every calibration call. ``cfg`` is how the
    pipeline runs classifier-free guidance when ``guidance`` is above 1: ``batched`` (both
    halves in one call, in ``cfg_order``), ``separate`` (a second transformer call for the
    negative prompt) or ``none`` (guidance-distilled: ``guidance`` is a model input).
    ``guidance_arg`` is the pipeline argument that takes ``guidance``.
    """

    pipeline: str
    inputs: Literal["captions", "classes"]
    guidance: float
    steps: int = 50
    scheduler: str = "DPMSolverMultistepScheduler"
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    cfg: Literal["batched", "separate", "none"] = "batched"
    guidance_arg: str = "guidance_scale"

    @property
    def cfg_order(self) -> str | None:
        """Row order of the CFG batch this pipeline builds (``None`` unless ``batched``)."""
        return PIPELINE_CFG_ORDER.get(self.pipeline) if self.cfg == "batched" else None

    def runs_cfg(self, guidance: float) -> bool:
        """Whether a generation at ``guidance`` runs classifier-free guidance."""
        return self.cfg != "none" and guidance > 1.0


# PixArt captions are our own and already clean; the plan fixes the resolution, so the
# pipeline must not snap it to an aspect-ratio bin.
_PIXART_CALL = {"use_resolution_binning": False, "clean_caption": False}
_FLOW_MATCH = "FlowMatchEulerDiscreteScheduler"

FAMILIES: dict[str, Family] = {
    "PixArtSigmaPipeline": Family("PixArtSigmaPipeline", "captions", 4.5, call_kwargs=_PIXART_CALL),
    "PixArtAlphaPipeline": Family("PixArtAlphaPipeline", "captions", 4.5, call_kwargs=_PIXART_CALL),
    "DiTPipeline": Family("DiTPipeline", "classes", 4.0),
    "LattePipeline": Family("LattePipeline", "captions", 7.5, call_kwargs={"clean_caption": False}),
    "StableDiffusion3Pipeline": Family(
        "StableDiffusion3Pipeline", "captions", 7.0, steps=28, scheduler=_FLOW_MATCH
    ),
    # FLUX.1 is guidance-distilled: ``guidance_scale`` is an input of the transformer and
    # each step is one call; true CFG (``true_cfg_scale``) runs a second, separate call.
    "FluxPipeline": Family(
        "FluxPipeline", "captions", 3.5, steps=50, scheduler=_FLOW_MATCH, cfg="none"
    ),
}


def _variant(pipeline: str, guidance: float, steps: int, **call_kwargs: Any) -> Family:
    """``pipeline``'s family with a model card's own guidance, steps and call arguments."""
    family = FAMILIES[pipeline]
    return replace(
        family, guidance=guidance, steps=steps, call_kwargs={**family.call_kwargs, **call_kwargs}
    )


@dataclass(frozen=True)
class ModelSpec:
    """A model to calibrate: where ``from_pretrained`` finds it and its defaults.

    ``resolution`` is ``None`` when it comes from the model's own config;
    ``calibration`` is the model's default calibration set (``None``: the built-in one).
    """

    name: str
    source: str
    family: Family
    resolution: int | None = None
    aliases: tuple[str, ...] = ()
    local: bool = False
    calibration: tuple[str, ...] | tuple[int, ...] | None = None

    @property
    def steps(self) -> int:
        return self.family.steps

    @property
    def guidance(self) -> float:
        return self.family.guidance


def embedded_spec(model: EmbeddedModel) -> ModelSpec:
    """The registry entry of a model shipped in ``models/``: its own steps, guidance and prompts."""
    family = replace(
        FAMILIES[model.pipeline],
        guidance=model.guidance,
        steps=model.steps,
        call_kwargs=dict(model.call_kwargs),
        cfg=model.cfg_mode,
        guidance_arg=model.guidance_arg,
    )
    return ModelSpec(
        model.name, str(model.folder), family, model.height, local=True, calibration=model.calibration_prompts
    )


REGISTRY: tuple[ModelSpec, ...] = (
    ModelSpec(
        "pixart-sigma-1k",
        "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        FAMILIES["PixArtSigmaPipeline"],
        1024,
        aliases=("pixart",),
    ),
    ModelSpec(
        "pixart-sigma-2k", "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS", FAMILIES["PixArtSigmaPipeline"], 2048
    ),
    ModelSpec("pixart-alpha", "PixArt-alpha/PixArt-XL-2-1024-MS", FAMILIES["PixArtAlphaPipeline"], 1024),
    ModelSpec("dit-xl-2-256", "facebook/DiT-XL-2-256", FAMILIES["DiTPipeline"], 256, aliases=("dit",)),
    ModelSpec("dit-xl-2-512", "facebook/DiT-XL-2-512", FAMILIES["DiTPipeline"], 512),
    ModelSpec("latte-1", "maxin-cn/Latte-1", FAMILIES["LattePipeline"], 512, aliases=("latte",)),
    ModelSpec(
        "sd3-medium",
        "stabilityai/stable-diffusion-3-medium-diffusers",
        _variant("StableDiffusion3Pipeline", 7.0, 28),
        1024,
        aliases=("sd3",),
    ),
    ModelSpec(
        "sd3.5-medium",
        "stabilityai/stable-diffusion-3.5-medium",
        _variant("StableDiffusion3Pipeline", 4.5, 40),
        1024,
    ),
    ModelSpec(
        "sd3.5-large", "stabilityai/stable-diffusion-3.5-large", _variant("StableDiffusion3Pipeline", 3.5, 28), 1024
    ),
    ModelSpec(
        "flux-dev",
        "black-forest-labs/FLUX.1-dev",
        _variant("FluxPipeline", 3.5, 50, max_sequence_length=512),
        1024,
        aliases=("flux",),
    ),
    ModelSpec(
        "flux-schnell",
        "black-forest-labs/FLUX.1-schnell",
        _variant("FluxPipeline", 0.0, 4, max_sequence_length=256),
        1024,
    ),
    *(embedded_spec(model) for model in (*EMBEDDED_MODELS.values(), *VIDEO_MODELS.values())),
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def missing_checkpoint(repo: str) -> str:
    """The one line that says a hub checkpoint is absent and how to provide it."""
    return (
        f"model: checkpoint {repo} is not available locally and the Hugging Face hub cannot be "
        f"reached; download it into the Hugging Face cache (`hf download {repo}`) or pass "
        "--model with a local folder holding the pipeline"
    )


def family_of(pipeline_class: str, where: str) -> Family:
    """The family of a diffusers pipeline class name; refuses unsupported classes."""
    try:
        return FAMILIES[pipeline_class]
    except KeyError:
        supported = ", ".join(FAMILIES)
        raise bad_input(
            f"model: {where} is a {pipeline_class}; supported pipelines are {supported}"
        ) from None


def _pipeline_class(index_file: Path, where: str) -> str:
    try:
        name = json.loads(index_file.read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise bad_input(f"model: {where} has no readable model_index.json ({exc})") from None
    return str(name)


def resolve_model(text: str) -> ModelSpec:
    """The model ``--model`` names: a registry name or alias, a local folder, or a hub id."""
    key = text.strip().lower()
    for spec in REGISTRY:
        if key in (spec.name, *spec.aliases) or key == spec.source.lower():
            return spec
    folder = Path(text).expanduser()
    if folder.is_dir():
        family = family_of(_pipeline_class(folder / "model_index.json", text), text)
        return ModelSpec(text, str(folder.resolve()), family, local=True)
    if _HUB_ID.match(text):
        index = cached_file(text, "model_index.json") or _download(text, "model_index.json")
        if index is None:
            raise bad_input(missing_checkpoint(text))
        return ModelSpec(text, text, family_of(_pipeline_class(index, text), text))
    names = ", ".join(spec.name for spec in REGISTRY)
    raise bad_input(
        f"model: unknown model {text!r}; use one of {names}, a local pipeline folder, or a hub id"
    )


def cached_file(repo: str, filename: str) -> Path | None:
    """A file of a hub repository from the local Hugging Face cache, if it is there."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return Path(found) if isinstance(found, str) else None


def _download(repo: str, filename: str) -> Path | None:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except (OSError, ValueError):
        return None


def is_available(spec: ModelSpec) -> bool:
    """Whether the model's pipeline index is on this machine (local folder or cache)."""
    if spec.local:
        return (Path(spec.source) / "model_index.json").is_file()
    return cached_file(spec.source, "model_index.json") is not None
