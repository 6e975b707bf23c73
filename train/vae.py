"""Train the small AutoencoderKL shared by both digit pipelines (32×32 RGB ↔ 16×16×4 latents).

    .venv/bin/python -m train.vae            # writes models/vae-digits/

Loss: L1 reconstruction + a small KL term. After training, the per-channel mean and std of
the posterior means over the dataset are folded into ``quant_conv`` / ``post_quant_conv``
(reconstructions unchanged), so latents come out zero-mean with unit variance per channel
and ``scaling_factor`` is 1 (the stock pipelines scale but never shift latents).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from planner import yardstick
from train.data import augmented_dataset, load_digit_arrays, to_model_range, upsample

VAE_DIR = Path("models/vae-digits")
SEED = 0


def build_vae() -> AutoencoderKL:
    """The digits VAE: two stages (×2 downsampling), 16 and 32 channels, 4 latent channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def load_vae(path: str | Path = VAE_DIR) -> AutoencoderKL:
    """The trained VAE, frozen, in eval mode."""
    vae = AutoencoderKL.from_pretrained(path).eval()
    vae.requires_grad_(False)
    return vae


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Scaled posterior means ``[B, 4, 16, 16]`` of images in ``[-1, 1]``."""
    out = [vae.encode(images[i : i + batch]).latent_dist.mode() for i in range(0, len(images), batch)]
    return torch.cat(out) * vae.config.scaling_factor


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Images in ``[0, 1]`` from scaled latents, as the pipelines decode them."""
    out = [vae.decode(latents[i : i + batch] / vae.config.scaling_factor).sample for i in range(0, len(latents), batch)]
    return (torch.cat(out) / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def standardize_latents(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold per-channel latent standardization into the 1×1 convs around the latent; returns (mean, std) folded.

    New posterior mean = (old − m) / s (log-variance − 2 log s); ``post_quant_conv`` absorbs
    ``z_old = s·z_new + m``, so decoding is unchanged. Sets ``scaling_factor`` to 1.
    """
    vae.register_to_config(scaling_factor=1.0)
    old = encode(vae, images)
    c = old.shape[1]
    m, s = old.mean(dim=(0, 2, 3)), old.std(dim=(0, 2, 3))
    q, p = vae.quant_conv, vae.post_quant_conv
    p.bias += p.weight[:, :, 0, 0] @ m
    p.weight *= s[None, :, None, None]
    q.weight[:c] /= s[:, None, None, None]
    q.bias[:c] = (q.bias[:c] - m) / s
    q.bias[c:] -= 2.0 * torch.log(s)
    return m, s


def train(steps: int, batch: int, lr: float, kl_weight: float, seed: int, out: Path) -> None:
    start = time.perf_counter()
    torch.manual_seed(seed)
    images, _ = augmented_dataset(copies=8, seed=seed)
    vae = build_vae()
    print(f"vae: {sum(p.numel() for p in vae.parameters()):,} parameters, {len(images)} training images")
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    gen = torch.Generator().manual_seed(seed + 1)
    pixels = images[0].numel()
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=gen)
        recon = vae.decode(z).sample
        rec = (recon - x).abs().mean()
        kl = post.kl().mean() / pixels
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  l1 {rec.item():.4f}  kl/pixel {kl.item():.3f}  {time.perf_counter() - start:6.0f}s")

    vae.eval()
    images8, labels = load_digit_arrays()
    clean = to_model_range(upsample(torch.from_numpy(images8)))
    before = decode(vae, encode(vae, clean))
    mean, std = standardize_latents(vae, images)
    recon = decode(vae, encode(vae, clean))
    latents = encode(vae, images)
    print(f"folded latent mean {[round(v, 3) for v in mean.tolist()]}, std {[round(v, 3) for v in std.tolist()]}")
    print(f"latents now: mean {float(latents.mean()):+.4f}, std {float(latents.std()):.4f}, "
          f"reconstruction change {float((recon - before).abs().max()):.1e}")
    target = (clean / 2 + 0.5).clamp(0, 1)
    print(f"reconstruction PSNR {yardstick.psnr(recon, target):.2f} dB, SSIM {yardstick.ssim(recon, target):.4f}")
    print(f"classifier accuracy on reconstructions {yardstick.accuracy(recon, labels):.4f}")
    vae.save_pretrained(out, safe_serialization=True)
    print(f"saved {out}  training time {time.perf_counter() - start:.0f}s wall, {time.process_time():.0f}s CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=VAE_DIR)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args.steps, args.batch, args.lr, args.kl_weight, args.seed, args.out)


if __name__ == "__main__":
    main()
