"""Moving digits: a scikit-learn digit sliding linearly across the frames of a 32×32 video.

Each video shows one digit, upsampled to ``DIGIT_PX`` pixels and lightly jittered (rotation,
scale, shear), translated by ``SPEED_PX`` pixels per frame (± ``SPEED_JITTER``) in one of four
directions; subpixel positions come from an affine ``grid_sample``. Videos are
``[B, 3, F, 32, 32]`` in ``[-1, 1]`` (channel-first, frames second, as the Latte pipeline
returns them before post-processing); latents are ``[B, 4, F, 16, 16]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.data import IMAGE_SIZE, Augment, caption, load_digit_arrays, upsample

FRAMES = 8
DIGIT_PX = 18.0
SPEED_PX = 1.5
SPEED_JITTER = 0.25
CROSS_JITTER_PX = 2.0
START_JITTER_PX = 1.0

DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# Unit motion per direction in image coordinates (x to the right, y downwards).
DIRECTION_VECTORS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
MOTION_WORDS: tuple[str, ...] = ("moving", "sliding", "left", "right", "up", "down")

# ``{v}`` is "moving" or "sliding" as the template says; ``{m}`` the direction word.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "{a} {w} moving {m}",
    "the digit {d} moving {m}",
    "{a} handwritten {w} sliding {m}",
    "digit {w} moving {m}",
    "the number {w} sliding {m}",
    "{d} moving {m}",
    "{a} {w} sliding {m}",
    "handwritten digit {d} moving {m}",
    "the handwritten number {d} sliding {m}",
    "{w} moving {m}",
)
# Held out of training (same vocabulary, new combinations): for evaluation only.
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "the digit {d} sliding {m}",
    "a handwritten {d} moving {m}",
    "the number {w} moving {m}",
    "{w} sliding {m}",
)


def video_caption(digit: int, direction: str, template: str) -> str:
    """One caption such as "a seven moving left"."""
    return caption(digit, template.replace("{m}", direction))


def trajectories(
    n: int, generator: torch.Generator, frames: int = FRAMES, directions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Direction ids ``[n]`` and digit centres ``[n, frames, 2]`` (x, y in pixels of the 32×32 canvas).

    The centre moves ``SPEED_PX ± SPEED_JITTER`` px per frame along the direction, the path
    centred on the canvas (± ``START_JITTER_PX``), offset across it by ± ``CROSS_JITTER_PX``.
    """
    if directions is None:
        directions = torch.randint(len(DIRECTIONS), (n,), generator=generator)
    vec = torch.tensor([DIRECTION_VECTORS[d] for d in DIRECTIONS])[directions]  # [n, 2]
    speed = SPEED_PX + SPEED_JITTER * (2 * torch.rand(n, generator=generator) - 1)
    along = START_JITTER_PX * (2 * torch.rand(n, generator=generator) - 1)
    across = CROSS_JITTER_PX * (2 * torch.rand(n, generator=generator) - 1)
    perp = vec.flip(1)  # (x, y) -> (y, x): perpendicular for axis-aligned directions
    mid = IMAGE_SIZE / 2 + vec * along[:, None] + perp * across[:, None]
    offsets = torch.arange(frames, dtype=torch.float32) - (frames - 1) / 2  # [frames]
    centres = mid[:, None, :] + vec[:, None, :] * speed[:, None, None] * offsets[None, :, None]
    return directions, centres


def render(digits01: torch.Tensor, centres: torch.Tensor, digit_px: float = DIGIT_PX) -> torch.Tensor:
    """Place ``[n, 1, 32, 32]`` digit images (filling the canvas) at ``centres`` ``[n, F, 2]``.

    Returns ``[n, 1, F, 32, 32]`` in ``[0, 1]``; the digit is shrunk to ``digit_px`` pixels.
    """
    n, frames, _ = centres.shape
    s = IMAGE_SIZE / digit_px
    c = centres / IMAGE_SIZE * 2 - 1  # normalised centre, align_corners=False convention
    theta = torch.zeros(n * frames, 2, 3)
    theta[:, 0, 0] = s
    theta[:, 1, 1] = s
    theta[:, :, 2] = -s * c.reshape(-1, 2)
    src = digits01.repeat_interleave(frames, dim=0)
    grid = F.affine_grid(theta, [n * frames, 1, IMAGE_SIZE, IMAGE_SIZE], align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(n, frames, 1, IMAGE_SIZE, IMAGE_SIZE).permute(0, 2, 1, 3, 4)


def moving_videos(
    indices: torch.Tensor,
    seed: int,
    directions: torch.Tensor | None = None,
    jitter: bool = True,
    frames: int = FRAMES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Videos of the dataset digits at ``indices``: ``([n, 1, F, 32, 32] in [0, 1], labels, direction ids)``."""
    images8, labels = load_digit_arrays()
    base = upsample(torch.from_numpy(images8[indices.numpy()]))
    generator = torch.Generator().manual_seed(seed)
    if jitter:
        base = Augment(max_shift_px=0.0)(base, generator)
    directions, centres = trajectories(len(indices), generator, frames, directions)
    return render(base, centres), torch.from_numpy(labels[indices.numpy()]), directions


def video_dataset(copies: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every digit ``copies`` times, each in a seeded random direction (copy 0 unjittered): videos, labels, directions."""
    n = len(load_digit_arrays()[1])
    generator = torch.Generator().manual_seed(seed)
    idx = torch.arange(n)
    parts = [
        moving_videos(idx, seed + k, torch.randint(len(DIRECTIONS), (n,), generator=generator), jitter=k > 0)
        for k in range(copies)
    ]
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


@torch.no_grad()
def encode_videos(vae: torch.nn.Module, videos01: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Scaled VAE latents ``[n, 4, F, 16, 16]`` of videos ``[n, 1, F, 32, 32]`` in ``[0, 1]``."""
    from train.vae import encode

    n, _, frames, h, w = videos01.shape
    flat = videos01.permute(0, 2, 1, 3, 4).reshape(n * frames, 1, h, w)
    flat = (flat * 2 - 1).expand(-1, 3, -1, -1)
    lat = encode(vae, flat, batch=batch)
    return lat.reshape(n, frames, *lat.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()
