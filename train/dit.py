"""Train ``dit-digits``: a class-conditional DiTTransformer2DModel on the digits' VAE latents.

    .venv/bin/python -m train.dit            # needs models/vae-digits/; writes models/dit-digits/

Classes 0–9; label 1000 is the null class the stock ``DiTPipeline`` uses for CFG (10 % label
dropout to it during training, applied to the whole sample, not per block). Epsilon
prediction, ``out_channels == in_channels`` (no learned variance).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import DiTPipeline, DiTTransformer2DModel

from train.data import DIGIT_WORDS
from train.diffusion import (
    EMA,
    training_arguments,
    checkpoint_path,
    fit,
    inference_scheduler,
    latent_dataset,
    min_snr_weights,
    noisy_batch,
    training_scheduler,
    weighted_mse,
)
from train.vae import load_vae

OUT_DIR = Path("models/dit-digits")
NULL_CLASS = 1000


def build_transformer(width: int, heads: int, layers: int) -> DiTTransformer2DModel:
    """DiT on 16×16×4 latents with patch 1: N = 256 tokens."""
    return DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        sample_size=16,
        patch_size=1,
        num_embeds_ada_norm=1000,
    )


def id2label() -> dict[int, str]:
    """Class names for ``DiTPipeline.get_label_ids``: "seven" and "7" both map to 7."""
    return {i: f"{word}, {i}" for i, word in enumerate(DIGIT_WORDS)}


def train(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    latents, labels = latent_dataset(copies=args.copies, seed=args.seed)
    print(f"{len(latents)} latents {tuple(latents.shape[1:])} encoded in {time.perf_counter() - start:.0f}s")

    model = build_transformer(args.width, args.heads, args.layers)
    # No dropout anywhere; eval mode also switches off the per-block label dropout of
    # diffusers' LabelEmbedding, replaced below by one consistent dropout per sample.
    model.eval()
    print(f"dit: width {args.width}, {args.layers} layers, {sum(p.numel() for p in model.parameters()):,} parameters")
    ema = EMA(model, decay=args.ema)
    sched = training_scheduler()
    gen = torch.Generator().manual_seed(args.seed + 1)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(len(latents), (args.batch,), generator=gen)
        y = labels[idx].clone()
        y[torch.rand(args.batch, generator=gen) < args.label_dropout] = NULL_CLASS
        xt, t, noise = noisy_batch(sched, latents[idx], gen)
        return weighted_mse(model(xt, timestep=t, class_labels=y).sample, noise, min_snr_weights(sched, t))

    fit(
        model,
        ema,
        loss_fn,
        gen,
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        checkpoint=None if args.no_resume else checkpoint_path("dit", args),
        start=start,
    )

    pipe = DiTPipeline(transformer=ema.model, vae=load_vae(), scheduler=inference_scheduler(), id2label=id2label())
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"saved {args.out}  training time {time.perf_counter() - start:.0f}s wall, {time.process_time():.0f}s CPU")


def main() -> None:
    parser = training_arguments(__doc__, out=OUT_DIR, steps=1000, width=64, heads=4, layers=6)
    parser.add_argument("--label-dropout", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
