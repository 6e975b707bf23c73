"""Rectified flow, the objective of the MMDiT pipelines (sd3-digits, flux-digits).

``x_σ = (1 − σ)·x₀ + σ·ε`` with σ ∈ (0, 1) drawn logit-normal (Esser et al., 2024); the
transformer predicts the velocity ``ε − x₀``, which ``FlowMatchEulerDiscreteScheduler``
integrates from σ = 1 to 0. No timestep shift: the latents are small (16×16×4).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


def inference_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler saved with both MMDiT pipelines (Euler, 1000 training steps, shift 1)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def noisy_batch(latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_σ, σ, velocity target)`` for a batch of clean latents; σ has shape ``[B]``."""
    noise = torch.randn(latents.shape, generator=generator)
    sigma = torch.sigmoid(torch.randn(len(latents), generator=generator))
    s = sigma.view(-1, *[1] * (latents.ndim - 1))
    return (1.0 - s) * latents + s * noise, sigma, noise - latents

