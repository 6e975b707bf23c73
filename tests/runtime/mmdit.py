"""Tiny MMDiTs (SD3 with an MMDiT-X block and a context-pre-only last block; FLUX with
double- and single-stream blocks), their plans, and a scheduler-like loop of calls."""

from __future__ import annotations

import functools

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from schemas import SCHEMA_VERSION, HeadCell, Layer, ModelInfo, Plan, Sampling, Tokens, config_hash, summarize

SD3_GRID, SD3_TEXT = (8, 8), 5  # 64 image tokens (patch 1), 5 text tokens
SD3_KINDS = ["joint", "spatial", "joint", "joint"]  # block 0: attn, attn2 (MMDiT-X); blocks 1, 2
FLUX_GRID, FLUX_TEXT = (4, 4), 6  # 16 image tokens (packed latents), 6 text tokens
FLUX_KINDS = ["joint"] * 4  # two double-stream blocks, two single-stream blocks
PROMPTS = 2


def tiny_sd3(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=SD3_GRID[0], patch_size=1, in_channels=4, out_channels=4, num_layers=3,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=8, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    ).eval()


@functools.cache
def float64_model(family: str) -> torch.nn.Module:
    return (tiny_sd3 if family == "sd3" else tiny_flux)(seed=1).double()


def geometry(family: str) -> tuple[int, int, list[str]]:
    """(image tokens, text tokens, layer kinds) of the tiny model."""
    if family == "sd3":
        return SD3_GRID[0] * SD3_GRID[1], SD3_TEXT, SD3_KINDS
    return FLUX_GRID[0] * FLUX_GRID[1], FLUX_TEXT, FLUX_KINDS


def mmdit_plan(
    model: torch.nn.Module, family: str, methods: list[list[str]], window, cfg_mode: str,
    heads: dict[tuple[int, int], str] | None = None,
) -> Plan:
    """A plan of ``methods`` (and per-head cells ``heads``) that fits the tiny ``family``
    model, with CFG ``cfg_mode``."""
    tokens, text, kinds = geometry(family)
    layers = [Layer(kind, tokens, window, text_tokens=text if kind == "joint" else 0) for kind in kinds]
    return Plan(
        schema_version=SCHEMA_VERSION,
        tool_version="test",
        model=ModelInfo(type(model).__name__, "tiny", config_hash(dict(model.config)), len(kinds), 2, 8),
        tokens=Tokens(num_tokens=tokens, text_tokens=text),
        sampling=Sampling(
            scheduler="FlowMatchEulerDiscreteScheduler",
            num_steps=len(methods),
            cfg=cfg_mode != "none",
            cfg_order="uncond_cond" if cfg_mode == "batched" else None,
            cfg_mode=cfg_mode,
        ),
        window=window,
        methods=methods,
        summary=summarize(methods, tokens, window, layers, heads),
        layers=layers,
        heads=[HeadCell(t, i, letters) for (t, i), letters in sorted(heads.items())] if heads else None,
    )


def _randn(seed: int, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def sd3_inputs(step: int, *, cfg: bool, dtype=torch.float64) -> dict:
    """One step's inputs: a batched CFG call ``[uncond, cond]`` (StableDiffusion3Pipeline's order)."""
    latents = _randn(100 + step, PROMPTS, 4, *SD3_GRID, dtype=dtype)
    rows = 2 * PROMPTS if cfg else PROMPTS
    return {
        "hidden_states": torch.cat([latents, latents]) if cfg else latents,
        "encoder_hidden_states": _randn(7, rows, SD3_TEXT, 16, dtype=dtype),
        "pooled_projections": _randn(8, rows, 8, dtype=dtype),
        "timestep": torch.full((rows,), 900.0 - 200 * step, dtype=dtype),
    }


def flux_ids() -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = FLUX_GRID
    img_ids = torch.zeros(rows * cols, 3)
    img_ids[:, 1] = torch.arange(rows * cols) // cols
    img_ids[:, 2] = torch.arange(rows * cols) % cols
    return img_ids, torch.zeros(FLUX_TEXT, 3)


def flux_inputs(step: int, *, negative: bool, dtype=torch.float64) -> dict:
    """One call's inputs: the prompts' (or the negative prompts') text, the step's latents."""
    img_ids, txt_ids = flux_ids()
    return {
        "hidden_states": _randn(200 + step, PROMPTS, FLUX_GRID[0] * FLUX_GRID[1], 8, dtype=dtype),
        "encoder_hidden_states": _randn(9 if negative else 10, PROMPTS, FLUX_TEXT, 16, dtype=dtype),
        "pooled_projections": _randn(11 if negative else 12, PROMPTS, 8, dtype=dtype),
        "timestep": torch.full((PROMPTS,), 0.9 - 0.2 * step, dtype=dtype),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }


def step_calls(family: str, step: int, cfg_mode: str, dtype=torch.float64) -> list[dict]:
    """The transformer calls of one denoising step, in the order the pipeline makes them."""
    if family == "sd3":
        return [sd3_inputs(step, cfg=cfg_mode == "batched", dtype=dtype)]
    calls = [flux_inputs(step, negative=False, dtype=dtype)]
    if cfg_mode == "separate":
        calls.append(flux_inputs(step, negative=True, dtype=dtype))
    return calls


def run_calls(model: torch.nn.Module, family: str, steps: int, cfg_mode: str, dtype=torch.float64) -> list[torch.Tensor]:
    """Every call's output over ``steps`` steps."""
    with torch.no_grad():
        return [model(**call).sample for t in range(steps) for call in step_calls(family, t, cfg_mode, dtype)]
