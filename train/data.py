"""The scikit-learn digits (1797 bundled 8×8 images) upsampled to 32×32, with seeded augmentation.

Pixel convention everywhere: ink is bright. The 8×8 originals hold integers 0–16; images
fed to the VAE are ``[B, 3, 32, 32]`` in ``[-1, 1]`` (grey replicated over RGB), the range
the diffusers pipelines decode back to ``[0, 1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

IMAGE_SIZE = 32
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Caption phrasings: ``{w}`` is the digit's word, ``{d}`` its numeral, ``{a}`` "a" or "an" before ``{w}``.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "{a} handwritten {w}",
    "the digit {d}",
    "number {w}, handwritten",
    "{a} {w}",
    "handwritten digit {d}",
    "the number {w}",
    "{w}",
    "digit {w}",
    "a handwritten {d}",
    "an image of the digit {w}",
    "{d}",
    "the handwritten number {d}",
)
# Held out of training (same vocabulary, new combinations): for evaluation only.
HELDOUT_TEMPLATES: tuple[str, ...] = (
    "the handwritten digit {w}",
    "an image of a handwritten {d}",
    "number {d}, handwritten",
    "a digit {w}",
)


def caption(digit: int, template: str) -> str:
    """One caption for ``digit`` from a phrasing template."""
    word = DIGIT_WORDS[digit]
    article = "an" if word[0] in "aeiou" else "a"
    return template.format(w=word, d=str(digit), a=article)


def train_captions(digit: int) -> list[str]:
    """All training phrasings of ``digit``."""
    return [caption(digit, t) for t in TRAIN_TEMPLATES]


def heldout_captions(digit: int) -> list[str]:
    """All held-out phrasings of ``digit``."""
    return [caption(digit, t) for t in HELDOUT_TEMPLATES]


def caption_vocabulary() -> list[str]:
    """Every token of every caption, in first-seen order (words plus the comma)."""
    seen: dict[str, None] = {}
    for digit in range(10):
        for text in train_captions(digit) + heldout_captions(digit):
            for word in text.replace(",", " ,").split():
                seen.setdefault(word, None)
    return list(seen)


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits: images ``[1797, 8, 8]`` float32 in 0–16 and labels ``[1797]`` int64."""
    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def upsample(images8: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """8×8 digits in 0–16 (``[B, 8, 8]``) to ``[B, 1, size, size]`` in ``[0, 1]`` (bilinear)."""
    x = images8.float().unsqueeze(1) / 16.0
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def to_model_range(images01: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` in ``[0, 1]`` to ``[B, 3, H, W]`` in ``[-1, 1]``."""
    return (images01 * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()


@dataclass(frozen=True)
class Augment:
    """Random affine jitter, in the units of the 32×32 image."""

    max_rotate_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_shift_px: float = 1.5
    max_shear: float = 0.1

    def __call__(self, images01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Jitter ``[B, 1, H, W]`` images in ``[0, 1]`` (background 0 stays 0)."""
        b, _, h, w = images01.shape

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(b, generator=generator)

        angle = uniform(-self.max_rotate_deg, self.max_rotate_deg) * (math.pi / 180.0)
        scale = uniform(*self.scale_range)
        shear = uniform(-self.max_shear, self.max_shear)
        tx = uniform(-self.max_shift_px, self.max_shift_px) * 2.0 / w
        ty = uniform(-self.max_shift_px, self.max_shift_px) * 2.0 / h
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [
                torch.stack([cos, -sin + shear, tx], dim=1),
                torch.stack([sin, cos, ty], dim=1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta, list(images01.shape), align_corners=False)
        return F.grid_sample(images01, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augmented_dataset(copies: int, seed: int, augment: Augment | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole dataset ``copies`` times: copy 0 unjittered, the rest jittered with a seeded generator.

    Returns images ``[copies·1797, 3, 32, 32]`` in ``[-1, 1]`` and labels.
    """
    images8, labels = load_digit_arrays()
    base = upsample(torch.from_numpy(images8))
    augment = augment or Augment()
    generator = torch.Generator().manual_seed(seed)
    parts = [base] + [augment(base, generator) for _ in range(copies - 1)]
    images = to_model_range(torch.cat(parts))
    return images, torch.from_numpy(labels).repeat(copies)
