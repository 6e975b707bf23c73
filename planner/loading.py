"""Loading registry models with diffusers ``from_pretrained``; missing weights say how to get them."""

from __future__ import annotations

import platform
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import huggingface_hub
import torch
from huggingface_hub import constants as hub_constants

from planner.errors import bad_input
from planner.registry import ModelSpec, missing_checkpoint

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def quiet_libraries() -> None:
    """Silence diffusers/transformers/hub logs and loading bars: the planner reports itself."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a device; ``None`` is cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise bad_input(f"device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise bad_input(f"device: {name!r} is not available on this machine")
    return device


def device_name(device: torch.device) -> str:
    """What a device is, as plans record where their latencies were measured."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()}, {torch.get_num_threads()} threads"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on cuda and float32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _load_failure(spec: ModelSpec, exc: Exception) -> Exception:
    if spec.local:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return bad_input(f"model: cannot load the pipeline in {spec.source!r}: {reason}")
    return bad_input(missing_checkpoint(spec.source))


def _cache_first(spec: ModelSpec, load: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``load`` from local files; from the hub only when that fails and the hub is allowed."""
    try:
        return load(*args, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        if spec.local or hub_constants.HF_HUB_OFFLINE:
            raise _load_failure(spec, exc) from None
    try:
        return load(*args, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_failure(spec, exc) from None


def load_pipeline(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> Any:
    """The model's diffusers pipeline on ``device``, with the family's scheduler."""
    import diffusers

    pipeline_class = getattr(diffusers, spec.family.pipeline)
    with warnings.catch_warnings():  # newer diffusers name it `dtype`; older ones only know this
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = _cache_first(spec, pipeline_class.from_pretrained, spec.source, torch_dtype=dtype)
    if type(pipe.scheduler).__name__ != spec.family.scheduler:
        scheduler_class = getattr(diffusers, spec.family.scheduler)
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _component_class(spec: ModelSpec, index: dict[str, Any], name: str) -> Any:
    import diffusers

    try:
        return getattr(diffusers, index[name][1])
    except (KeyError, IndexError, TypeError, AttributeError):
        raise bad_input(f"model: {spec.source} has no supported {name} in model_index.json") from None


def load_transformer_skeleton(spec: ModelSpec) -> torch.nn.Module:
    """The model's transformer built from its config on the meta device: no weights needed."""
    return load_model_skeleton(spec).transformer


@dataclass(frozen=True)
class ModelSkeleton:
    """What checking a plan against a model needs, from its configs alone (no weights)."""

    transformer: torch.nn.Module
    vae_scale: int
    scheduler_config: dict[str, Any]


def load_model_skeleton(spec: ModelSpec) -> ModelSkeleton:
    """The transformer on the meta device, the VAE's pixels per latent and the scheduler config."""
    import diffusers

    index = _cache_first(spec, diffusers.DiffusionPipeline.load_config, spec.source)
    transformer_class = _component_class(spec, index, "transformer")
    config = _cache_first(spec, transformer_class.load_config, spec.source, subfolder="transformer")
    with torch.device("meta"):
        transformer = transformer_class.from_config(config)
    vae_class = _component_class(spec, index, "vae")
    vae = _cache_first(spec, vae_class.load_config, spec.source, subfolder="vae")
    scheduler_class = _component_class(spec, index, "scheduler")
    scheduler = _cache_first(spec, scheduler_class.load_config, spec.source, subfolder="scheduler")
    channels = vae.get("block_out_channels")
    vae_scale = 2 ** (len(channels) - 1) if channels else 8  # diffusers' default without a VAE config
    return ModelSkeleton(transformer, vae_scale, dict(scheduler))
