"""Yardsticks for generated moving-digit videos: per-frame digit accuracy, motion consistency, PSNR.

Videos may be what ``LattePipeline`` returns (``np`` ``[B, F, H, W, C]`` in ``[0, 1]``, or a
``pt`` tensor ``[B, F, C, H, W]``); they are read as grey ``[B, F, H, W]`` float64. Ink is bright.

- Per-frame accuracy: each frame is cropped around its ink centre of mass to a
  ``CROP_PX`` square (the size the training digits are drawn at), resized to 32×32 and
  classified by :func:`planner.yardstick.classify`; the fraction of frames showing the
  requested digit.
- Motion consistency: the ink centre of mass of each frame, weighted by
  ``max(grey − INK_FLOOR, 0)``, is fitted by a least-squares line over the frame index;
  its displacement from the first to the last frame, projected on the captioned
  direction, is ``along``, and perpendicular to it ``across``. A video is consistent when
  ``along ≥ MIN_TRAVEL_PX`` and ``|across| < along``. The score is the fraction of
  consistent videos. (Training videos travel 7 × 1.5 ± 0.25 px ≈ 10.5 px.)
- Fidelity: :func:`planner.yardstick.psnr` over all frames (planned vs raw video).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from planner import yardstick

CROP_PX = 18.0
INK_FLOOR = 0.2
MIN_TRAVEL_PX = 4.0
DIRECTION_VECTORS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}


def as_grey_video(videos: Any) -> torch.Tensor:
    """Videos as grey ``[B, F, H, W]`` float64 in ``[0, 1]``."""
    if isinstance(videos, torch.Tensor):
        x = videos.detach().to("cpu", torch.float64)
        if x.ndim != 5:
            raise ValueError(f"expected a [B, F, C, H, W] tensor, got shape {tuple(x.shape)}")
        return x.mean(dim=2)
    arr = np.asarray(videos, dtype=np.float64)
    if arr.ndim != 5:
        raise ValueError(f"expected [B, F, H, W, C] videos, got shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).mean(dim=-1)


def frames_of(videos: Any) -> np.ndarray:
    """All frames as ``np`` images ``[B·F, H, W, 3]`` (for the image yardsticks)."""
    grey = as_grey_video(videos)
    return grey.reshape(-1, *grey.shape[2:]).unsqueeze(-1).expand(-1, -1, -1, 3).numpy()


def centres_of_mass(videos: Any) -> torch.Tensor:
    """Ink centre of mass ``[B, F, 2]`` (x, y in pixels, pixel centres at +0.5); canvas centre if no ink."""
    grey = as_grey_video(videos)
    h, w = grey.shape[-2:]
    weight = (grey - INK_FLOOR).clamp(min=0.0)
    ys = torch.arange(h, dtype=torch.float64) + 0.5
    xs = torch.arange(w, dtype=torch.float64) + 0.5
    mass = weight.sum(dim=(-1, -2))
    safe = mass.clamp(min=1e-9)
    cx = (weight.sum(dim=-2) * xs).sum(dim=-1) / safe
    cy = (weight.sum(dim=-1) * ys).sum(dim=-1) / safe
    centre = torch.stack([cx, cy], dim=-1)
    empty = (mass <= 1e-9)[..., None]
    return torch.where(empty, torch.tensor([w / 2, h / 2], dtype=torch.float64), centre)


def crop_digits(videos: Any, crop_px: float = CROP_PX, size: int = 32) -> torch.Tensor:
    """Each frame cropped to a ``crop_px`` square around its ink centre, resized: ``[B·F, 1, size, size]``."""
    grey = as_grey_video(videos)
    b, f, h, w = grey.shape
    centre = centres_of_mass(grey.unsqueeze(2)).reshape(-1, 2)
    norm = torch.stack([centre[:, 0] / w * 2 - 1, centre[:, 1] / h * 2 - 1], dim=-1)
    theta = torch.zeros(b * f, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = crop_px / w
    theta[:, 1, 1] = crop_px / h
    theta[:, :, 2] = norm
    frames = grey.reshape(b * f, 1, h, w)
    grid = F.affine_grid(theta, [b * f, 1, size, size], align_corners=False)
    return F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def frame_accuracy(videos: Any, digits: Sequence[int] | np.ndarray) -> float:
    """Fraction of frames (all videos) classified as the digit requested for their video."""
    crops = crop_digits(videos)
    frames = crops.shape[0] // len(digits)
    wanted = np.repeat(np.asarray(digits, dtype=np.int64), frames)
    return float((yardstick.classify(crops) == wanted).mean())


def displacements(videos: Any, directions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Fitted first-to-last displacement along and across each captioned direction, in pixels."""
    centre = centres_of_mass(videos)  # [B, F, 2]
    f = centre.shape[1]
    t = torch.arange(f, dtype=torch.float64) - (f - 1) / 2
    slope = (centre * t[None, :, None]).sum(dim=1) / (t * t).sum()  # [B, 2] px per frame
    travel = slope * (f - 1)
    vec = torch.tensor([DIRECTION_VECTORS[d] for d in directions], dtype=torch.float64)
    along = (travel * vec).sum(dim=-1)
    across = (travel * vec.flip(-1)).sum(dim=-1)
    return along.numpy(), across.numpy()


def motion_consistency(videos: Any, directions: Sequence[str]) -> float:
    """Fraction of videos whose ink moves in the captioned direction (module docstring)."""
    along, across = displacements(videos, directions)
    return float(((along >= MIN_TRAVEL_PX) & (np.abs(across) < along)).mean())


def video_psnr(a: Any, b: Any) -> float:
    """PSNR in dB (data range 1) between two batches of videos, over all frames."""
    return float(yardstick.psnr(frames_of(a), frames_of(b)))


def direction_of(caption: str) -> str:
    """The direction word a caption ends with ("a seven moving left" → "left")."""
    word = caption.strip().split()[-1]
    if word not in DIRECTION_VECTORS:
        raise ValueError(f"caption {caption!r} names no direction")
    return word
