"""Pieces shared by the two transformer trainings: latents, the noise schedule, EMA, the loop.

The objective is epsilon prediction under the 1000-step linear-beta schedule that the
stock ``DPMSolverMultistepScheduler()`` (saved in each pipeline folder) assumes, with
min-SNR-5 loss weighting.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from train.data import augmented_dataset
from train.vae import VAE_DIR, encode, load_vae

CACHE_DIR = Path("build/train")


def inference_scheduler() -> DPMSolverMultistepScheduler:
    """The scheduler saved with both pipelines (DPM-Solver++ order 2, epsilon, linear betas)."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon"
    )


def training_scheduler() -> DDPMScheduler:
    """The forward process matching :func:`inference_scheduler`."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon"
    )


def latent_dataset(copies: int, seed: int, cache: Path | None = CACHE_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled VAE latents ``[copies·1797, 4, 16, 16]`` of the (jittered) digits, and their labels.

    Cached under ``cache`` keyed by the VAE weights' hash, the copies and the seed.
    """
    path = None
    if cache is not None:
        digest = hashlib.sha256((VAE_DIR / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:16]
        path = cache / f"latents-{digest}-{copies}-{seed}.pt"
        if path.is_file():
            saved = torch.load(path)
            return saved["latents"], saved["labels"]
    images, labels = augmented_dataset(copies=copies, seed=seed)
    latents = encode(load_vae(), images)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"latents": latents, "labels": labels}, path)
    return latents, labels


def checkpoint_path(kind: str, args: object, ignore: tuple[str, ...] = ("out", "threads")) -> Path:
    """Where a run with these hyperparameters keeps its resumable state (keyed by their hash)."""
    settings = {k: str(v) for k, v in sorted(vars(args).items()) if k not in ignore}
    digest = hashlib.sha256(repr(settings).encode()).hexdigest()[:12]
    return CACHE_DIR / f"{kind}-{digest}.pt"


class EMA:
    """Exponential moving average of a model's parameters (with the usual warm-up of the decay)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = [p for p in self.model.parameters()]
        cur = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, cur, 1.0 - d)


def noisy_batch(
    scheduler: DDPMScheduler, latents: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(noisy latents, timesteps, noise)`` for a batch of clean latents, timesteps uniform in 0–999."""
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    return scheduler.add_noise(latents, noise, t), t, noise


def min_snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-γ loss weights for epsilon prediction, ``min(SNR, γ) / SNR`` (Hang et al., 2023)."""
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1.0 - alpha_bar)
    return snr.clamp(max=gamma) / snr


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, weighted and averaged over the batch."""
    return (((pred - target) ** 2).flatten(1).mean(dim=1) * weights).mean()


@torch.no_grad()
def init_caption_projection(projection: torch.nn.Module, text_states: torch.Tensor) -> float:
    """Orthogonal init of a ``PixArtAlphaTextProjection`` (``linear_1``, GELU-tanh, ``linear_2``), rescaled
    so that the projected ``text_states`` (``[..., caption_channels]``: the encoder outputs the
    transformer will see) have unit RMS; returns the factor applied to ``linear_2``.

    diffusers' default init shrinks the text signal about tenfold before cross-attention sees
    it, and a short training then learns to nearly ignore the captions.
    """
    for linear in (projection.linear_1, projection.linear_2):
        torch.nn.init.orthogonal_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
    out = projection(text_states.reshape(-1, text_states.shape[-1]))
    factor = 1.0 / float(out.pow(2).mean().sqrt())
    projection.linear_2.weight *= factor
    return factor


def fit(
    model: torch.nn.Module,
    ema: EMA,
    loss_fn: Callable[[int], torch.Tensor],
    generator: torch.Generator,
    *,
    steps: int,
    lr: float,
    warmup: int,
    lr_scale: Callable[[str], float] | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 100,
    log_every: int = 100,
    start: float | None = None,
) -> None:
    """AdamW with linear warm-up and cosine decay to 10 % of ``lr``; ``loss_fn(step)`` gives the loss.

    ``lr_scale(parameter name)`` multiplies the learning rate of single parameters.

    With ``checkpoint``, the whole training state (weights, EMA, optimizer, schedule, the
    data generator) is saved every ``checkpoint_every`` steps and resumed from if present,
    so an interrupted run ends with the same weights as an uninterrupted one.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(lr_scale(name) if lr_scale is not None else 1.0, []).append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "lr": lr * scale} for scale, ps in groups.items()], lr=lr, weight_decay=0.0, betas=(0.9, 0.99)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    first = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        ema.updates = state["ema_updates"]
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        generator.set_state(state["generator"])
        first = state["step"]
        print(f"resumed from {checkpoint} at step {first}")
    start = time.perf_counter() if start is None else start
    running = 0.0
    for step in range(first, steps):
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update(model)
        running += loss.item()
        if (step + 1) % log_every == 0 or step == steps - 1:
            n = min(log_every, step + 1 - first) if (step + 1) % log_every == 0 else (step % log_every) + 1
            elapsed = time.perf_counter() - start
            print(f"step {step + 1:5d}/{steps}  loss {running / n:.4f}  lr {sched.get_last_lr()[0]:.2e}  {elapsed:6.0f}s")
            running = 0.0
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step == steps - 1):
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            state = {
                "step": step + 1,
                "model": model.state_dict(),
                "ema": ema.model.state_dict(),
                "ema_updates": ema.updates,
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "generator": generator.get_state(),
            }
            torch.save(state, checkpoint.with_suffix(".tmp"))
            checkpoint.with_suffix(".tmp").replace(checkpoint)


def training_arguments(
    description: str | None, *, out: Path, steps: int, width: int, heads: int, **layers: int
) -> argparse.ArgumentParser:
    """The options every transformer training takes, with its defaults; ``layers`` maps
    each layer-count option (``layers``, ``double_layers``, …) to its default."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--width", type=int, default=width)
    parser.add_argument("--heads", type=int, default=heads)
    for name, default in layers.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--copies", type=int, default=8, help="jittered copies of the dataset to encode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--no-resume", action="store_true", help="ignore and write no checkpoint in build/train/")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    return parser


def caption_arguments(parser: argparse.ArgumentParser, *, text_width: int, pretrain_steps: int) -> None:
    """The options of trainings conditioned on captions."""
    parser.add_argument("--text-width", type=int, default=text_width)
    parser.add_argument("--text-pretrain-steps", type=int, default=pretrain_steps)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
