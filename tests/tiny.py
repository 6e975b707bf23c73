"""Tiny diffusers DiT pipelines built offline from configs (random weights)."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    LattePipeline,
    LatteTransformer3DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from transformers import T5Config, T5EncoderModel, T5Tokenizer

CAPTION_DIM = 32
WORDS = "a an the photo of cat dog red blue house tree sky under over big small".split()


def tiny_tokenizer() -> T5Tokenizer:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"\u2581{w}", -float(i + 1)) for i, w in enumerate(WORDS)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_text_encoder(seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(WORDS) + 3,
        d_model=CAPTION_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
    )
    return T5EncoderModel(config).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


def tiny_pixart_transformer(seed: int = 0, *, layers: int = 3, sample_size: int = 8) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=sample_size,
        patch_size=1,
        cross_attention_dim=16,
        caption_channels=CAPTION_DIM,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    ).eval()


def tiny_dit_transformer(seed: int = 0, *, layers: int = 3, sample_size: int = 8) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=sample_size,
        patch_size=1,
        num_embeds_ada_norm=1000,
    ).eval()


def tiny_pixart_pipeline(seed: int = 0) -> PixArtSigmaPipeline:
    return PixArtSigmaPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_text_encoder(seed),
        vae=tiny_vae(seed),
        transformer=tiny_pixart_transformer(seed),
        scheduler=DPMSolverMultistepScheduler(),
    ).to("cpu")


def tiny_dit_pipeline(seed: int = 0) -> DiTPipeline:
    pipe = DiTPipeline(
        transformer=tiny_dit_transformer(seed),
        vae=tiny_vae(seed),
        scheduler=DPMSolverMultistepScheduler(),
        id2label={i: f"class{i}" for i in range(10)},
    )
    return pipe.to("cpu")


def tiny_pixart_alpha_pipeline(seed: int = 0) -> PixArtAlphaPipeline:
    return PixArtAlphaPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_text_encoder(seed),
        vae=tiny_vae(seed),
        transformer=tiny_pixart_transformer(seed),
        scheduler=DPMSolverMultistepScheduler(),
    ).to("cpu")


FRAMES = 4


def tiny_latte_transformer(seed: int = 0, *, layers: int = 2, sample_size: int = 8) -> LatteTransformer3DModel:
    torch.manual_seed(seed)
    return LatteTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=sample_size,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=CAPTION_DIM,
        norm_type="ada_norm_single",
        video_length=FRAMES,
    ).eval()


def tiny_latte_pipeline(seed: int = 0) -> LattePipeline:
    return LattePipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_text_encoder(seed),
        vae=tiny_vae(seed),
        transformer=tiny_latte_transformer(seed),
        scheduler=DPMSolverMultistepScheduler(),
    ).to("cpu")
