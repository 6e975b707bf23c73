"""Build valid plans for test models."""

from __future__ import annotations

import torch

from schemas import SCHEMA_VERSION, HeadCell, Layer, ModelInfo, Plan, Sampling, Tokens, config_hash, summarize


def plan_for(
    model: torch.nn.Module,
    methods: list[list[str]],
    *,
    num_tokens: int = 64,
    window: int = 8,
    cfg: bool = True,
    cfg_order: str | None = "uncond_cond",
    layers: list[Layer] | None = None,
    frames: int | None = None,
    heads: dict[tuple[int, int], str] | None = None,
) -> Plan:
    """A plan with ``methods`` (and per-head cells ``heads``) that matches ``model`` (a tiny
    diffusers transformer)."""
    attn = model.transformer_blocks[0].attn1
    return Plan(
        schema_version=SCHEMA_VERSION,
        tool_version="test",
        model=ModelInfo(
            class_name=type(model).__name__,
            name="tiny",
            config_hash=config_hash(dict(model.config)),
            num_layers=len(methods[0]),
            num_heads=attn.heads,
            head_dim=attn.to_q.out_features // attn.heads,
        ),
        tokens=Tokens(num_tokens=num_tokens, frames=frames),
        sampling=Sampling(
            scheduler="DPMSolverMultistepScheduler",
            num_steps=len(methods),
            cfg=cfg,
            cfg_order=cfg_order if cfg else None,
        ),
        window=window,
        methods=methods,
        summary=summarize(methods, num_tokens, window, layers, heads),
        layers=layers,
        heads=[HeadCell(t, i, letters) for (t, i), letters in sorted(heads.items())] if heads else None,
    )


def all_full(steps: int, layers: int) -> list[list[str]]:
    return [["full"] * layers for _ in range(steps)]
