"""Yardsticks for generated digits: a digit classifier, and PSNR / SSIM fidelity between two runs.

Images may be what the pipelines return (a list of PIL images, an ``np`` array
``[B, H, W, C]`` in ``[0, 1]``, or a ``pt`` tensor ``[B, C, H, W]`` in ``[0, 1]``); they are read
as ``[B, C, H, W]`` float64 in ``[0, 1]``. Ink is bright, as in the bundled digits.

The classifier is an RBF support-vector machine fitted in about a second on the bundled
8×8 digits (a fixed seeded split, :data:`HELDOUT` images kept out), plus the same digits
taken through the 32×32 upsample / 8×8 area-pool round trip, plus one seeded jittered copy.
Generated images are area-pooled to 8×8 and scaled to the digits' 0–16 range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

ImageBatch = Union[torch.Tensor, np.ndarray, Sequence[Any]]

SEED = 0
HELDOUT = 297
_CLASSIFIER_C = 10.0
_CLASSIFIER_GAMMA = 0.001


def as_tensor(images: ImageBatch) -> torch.Tensor:
    """Images as ``[B, C, H, W]`` float64 in ``[0, 1]`` (PIL lists and uint8 arrays are scaled by 1/255)."""
    if isinstance(images, torch.Tensor):
        x = images.detach().to("cpu", torch.float64)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4:
            raise ValueError(f"expected a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
        return x
    if isinstance(images, np.ndarray):
        arr = images
    else:
        arr = np.stack([np.asarray(im) for im in images])
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float64) / scale
    if x.ndim == 3:  # [B, H, W]
        return x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"expected [B, H, W, C] images, got shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).contiguous()


def to_digit_features(images: ImageBatch) -> np.ndarray:
    """Grey level, area-pooled to 8×8 and scaled to 0–16: ``[B, 64]`` like ``load_digits().data``."""
    x = as_tensor(images).mean(dim=1, keepdim=True)
    pooled = F.adaptive_avg_pool2d(x, 8) * 16.0
    return pooled.reshape(len(x), 64).numpy()


def _round_trip(images8: np.ndarray, size: int = 32) -> torch.Tensor:
    """8×8 digits (0–16) upsampled bilinearly to ``[B, 1, size, size]`` in ``[0, 1]``."""
    x = torch.from_numpy(images8).to(torch.float64).unsqueeze(1) / 16.0
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def _jitter(images: torch.Tensor, seed: int, max_deg: float = 10.0, max_shift: float = 0.05) -> torch.Tensor:
    """Seeded small rotation and shift of ``[B, 1, H, W]`` images (background 0)."""
    g = torch.Generator().manual_seed(seed)
    b = len(images)
    angle = (torch.rand(b, generator=g, dtype=torch.float64) * 2 - 1) * math.radians(max_deg)
    shift = (torch.rand(b, 2, generator=g, dtype=torch.float64) * 2 - 1) * max_shift * 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@lru_cache(maxsize=1)
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    perm = np.random.default_rng(SEED).permutation(len(digits.target))
    train, held = perm[HELDOUT:], perm[:HELDOUT]
    images = digits.images.astype(np.float64)
    return images[train], digits.target[train], images[held], digits.target[held]


def heldout_digits(size: int = 32) -> tuple[torch.Tensor, np.ndarray]:
    """The real digits kept out of the classifier, upsampled: ``[HELDOUT, 1, size, size]`` in ``[0, 1]``, labels."""
    _, _, images, labels = _split()
    return _round_trip(images, size), labels.copy()


@lru_cache(maxsize=1)
def classifier() -> Any:
    """The fitted digit classifier (built once per process)."""
    from sklearn.svm import SVC

    images, labels, _, _ = _split()
    up = _round_trip(images)
    features = [
        images.reshape(len(images), 64),
        to_digit_features(up),
        to_digit_features(_jitter(up, SEED + 1)),
    ]
    model = SVC(C=_CLASSIFIER_C, gamma=_CLASSIFIER_GAMMA)
    model.fit(np.concatenate(features), np.tile(labels, len(features)))
    return model


def classify(images: ImageBatch) -> np.ndarray:
    """The digit (0–9) each image shows, ``[B]`` int64."""
    return classifier().predict(to_digit_features(images)).astype(np.int64)


def accuracy(images: ImageBatch, wanted: Sequence[int] | np.ndarray) -> float:
    """Fraction of ``images`` classified as the digit requested for each."""
    wanted = np.asarray(wanted, dtype=np.int64)
    predicted = classify(images)
    if predicted.shape != wanted.shape:
        raise ValueError(f"{len(predicted)} images but {len(wanted)} wanted labels")
    return float((predicted == wanted).mean())


def _pair(a: ImageBatch, b: ImageBatch) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = as_tensor(a), as_tensor(b)
    if x.shape != y.shape:
        raise ValueError(f"image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def psnr(a: ImageBatch, b: ImageBatch, *, per_image: bool = False) -> float | np.ndarray:
    """Peak signal-to-noise ratio in dB for data range 1.

    By default one number from the mean squared error over the whole batch (``inf`` only
    when the batches are identical); ``per_image=True`` gives one value per image.
    """
    x, y = _pair(a, b)
    if per_image:
        mse = ((x - y) ** 2).flatten(1).mean(dim=1).numpy()
        with np.errstate(divide="ignore"):
            return np.where(mse == 0, np.inf, -10.0 * np.log10(np.where(mse == 0, 1.0, mse)))
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0.0 else -10.0 * math.log10(mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    a: ImageBatch,
    b: ImageBatch,
    *,
    window: int = 11,
    sigma: float = 1.5,
    per_image: bool = False,
) -> float | np.ndarray:
    """Structural similarity (Wang et al. 2004): Gaussian window 11, σ 1.5, K1 0.01, K2 0.03, range 1.

    Local statistics over every full window position (no padding), averaged over positions
    and channels; by default also over the batch, ``per_image=True`` gives one value per image.
    """
    x, y = _pair(a, b)
    n, c, h, w = x.shape
    if h < window or w < window:
        raise ValueError(f"images of {h}×{w} are smaller than the {window}×{window} SSIM window")
    kernel = _gaussian_window(window, sigma).expand(c, 1, window, window)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    values = ssim_map.flatten(1).mean(dim=1).numpy()
    return values if per_image else float(values.mean())
