"""Measure a shipped model: classifier accuracy of its samples, and (optionally) attention locality.

    .venv/bin/python -m train.evaluate dit-digits --per-digit 10
    .venv/bin/python -m train.evaluate pixart-digits --per-digit 10 --phrasings heldout --locality
    .venv/bin/python -m train.evaluate sd3-digits --per-digit 10

Samples are generated through the stock pipeline loaded by :func:`planner.embedded.load_embedded`
(the model's default steps and guidance unless overridden), image i with seed ``seed + i``.
Locality (DiT and PixArt): for every self-attention layer, the attention mass a query puts on
its 3×3 token neighbourhood and on the w = N/8 band, each divided by what uniform attention would give.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from planner import yardstick
from planner.embedded import EMBEDDED_MODELS, embedded_model, generate, load_embedded
from train.data import DIGIT_WORDS, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, caption


class LocalityProbe:
    """Self-attention processor computing attention explicitly and accumulating locality ratios.

    Ratios are averaged over the first ``rows`` batch rows (conditional rows for DiT's
    ``[cond, uncond]`` batches, unconditional ones for PixArt's ``[uncond, cond]``).
    """

    def __init__(self, side: int, window: int, rows: int = 8) -> None:
        n = side * side
        self.rows = rows
        idx = torch.arange(n)
        r, c = idx // side, idx % side
        self.near = ((r[:, None] - r[None, :]).abs() <= 1) & ((c[:, None] - c[None, :]).abs() <= 1)
        self.band = (idx[:, None] - idx[None, :]).abs() <= window
        self.near_uniform = self.near.sum(-1).float() / n
        self.band_uniform = self.band.sum(-1).float() / n
        self.near_ratio: list[float] = []
        self.band_ratio: list[float] = []

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, **_: Any) -> torch.Tensor:
        assert encoder_hidden_states is None and attn.group_norm is None and attn.norm_q is None
        assert not attn.residual_connection and attn.rescale_output_factor == 1.0
        b, n, _ = hidden_states.shape
        h = attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, n, h, -1).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        p = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)
        sub = p[: self.rows]
        self.near_ratio.append(float(((sub * self.near).sum(-1) / self.near_uniform).mean()))
        self.band_ratio.append(float(((sub * self.band).sum(-1) / self.band_uniform).mean()))
        out = (p @ v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def prompts_for(name: str, per_digit: int, phrasings: str) -> tuple[list[Any], list[int]]:
    """``per_digit`` prompts for each digit 0–9 (class ids for DiT, captions for the others)."""
    digits = [d for d in range(10) for _ in range(per_digit)]
    if embedded_model(name).pipeline == "DiTPipeline":
        return list(digits), digits
    templates = HELDOUT_TEMPLATES if phrasings == "heldout" else TRAIN_TEMPLATES
    texts = [caption(d, templates[i % len(templates)]) for d in range(10) for i in range(per_digit)]
    return texts, digits


def save_grid(images: np.ndarray, per_row: int, path: Path) -> None:
    """Images ``[B, H, W, 3]`` in ``[0, 1]`` tiled row by row into one PNG."""
    from PIL import Image

    b, hgt, wid, _ = images.shape
    rows = (b + per_row - 1) // per_row
    grid = np.zeros((rows * hgt, per_row * wid, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, per_row)
        grid[r * hgt : (r + 1) * hgt, c * wid : (c + 1) * wid] = (im * 255).round().astype(np.uint8)
    Image.fromarray(grid).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=list(EMBEDDED_MODELS))
    parser.add_argument("--per-digit", type=int, default=10)
    parser.add_argument("--phrasings", choices=["heldout", "train"], default="heldout", help="caption models")
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--locality", action="store_true", help="also measure attention locality")
    parser.add_argument("--grid", type=Path, default=None, help="write the samples as a PNG grid")
    parser.add_argument("--folder", type=Path, default=None, help="evaluate this pipeline folder instead")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    model = embedded_model(args.name)
    if args.locality and model.pipeline not in ("DiTPipeline", "PixArtSigmaPipeline"):
        parser.error("--locality probes DiT and PixArt self-attention only")
    if args.folder is None:
        pipe = load_embedded(args.name)
    else:
        import diffusers

        cls = getattr(diffusers, model.pipeline)
        pipe = cls.from_pretrained(str(args.folder), local_files_only=True, low_cpu_mem_usage=False)
        pipe.set_progress_bar_config(disable=True)
    prompts, digits = prompts_for(args.name, args.per_digit, args.phrasings)
    overrides: dict[str, Any] = {}
    if args.guidance is not None:
        overrides[model.guidance_arg] = args.guidance
    if args.steps is not None:
        overrides["num_inference_steps"] = args.steps

    probe = None
    if args.locality:
        probe = LocalityProbe(side=int(model.tokens**0.5), window=model.window)
        for block in pipe.transformer.transformer_blocks:
            block.attn1.set_processor(probe)

    start = time.perf_counter()
    chunks = []
    for i in range(0, len(prompts), args.batch):
        chunks.append(generate(pipe, args.name, prompts[i : i + args.batch], seed=args.seed + i, **overrides))
    images = np.concatenate(chunks)
    elapsed = time.perf_counter() - start

    predicted = yardstick.classify(images)
    wanted = np.asarray(digits)
    per_digit = [float((predicted[wanted == d] == d).mean()) for d in range(10)]
    guidance = overrides.get(model.guidance_arg, model.guidance)
    steps = overrides.get("num_inference_steps", model.steps)
    print(f"{args.name}: {len(images)} samples, guidance {guidance}, {steps} steps, {elapsed:.0f}s")
    if model.pipeline != "DiTPipeline":
        print(f"captions: {args.phrasings} phrasings, e.g. {prompts[0]!r}, {prompts[-1]!r}")
    print(f"accuracy {yardstick.accuracy(images, digits):.3f}")
    print("per digit " + " ".join(f"{DIGIT_WORDS[d]}:{a:.2f}" for d, a in enumerate(per_digit)))
    if probe is not None:
        layers = len(pipe.transformer.transformer_blocks)
        near = np.asarray(probe.near_ratio).reshape(-1, layers).mean(0)
        band = np.asarray(probe.band_ratio).reshape(-1, layers).mean(0)
        print("3x3-neighbourhood mass / uniform, per layer: " + " ".join(f"{x:.2f}" for x in near))
        print(f"band |i-j|<={model.window} mass / uniform, per layer: " + " ".join(f"{x:.2f}" for x in band))
    if args.grid is not None:
        save_grid(images, args.per_digit, args.grid)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
