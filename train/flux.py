"""Train ``flux-digits``: a caption-conditioned FluxTransformer2DModel with a tiny CLIP and a tiny T5 encoder.

    .venv/bin/python -m train.flux           # needs models/vae-digits/; writes models/flux-digits/

The stock ``FluxPipeline`` packs the 16×16×4 latents into 2×2 patches (N = 64 image tokens of
16 channels, 2D rotary positions), feeds the T5 encoder's outputs as the text sequence (call
with ``max_sequence_length=8``: 8 text tokens, no mask) and the CLIP encoder's pooled output
into AdaLN. No guidance embedding (``guidance_embeds=False``): CFG is the pipeline's "true
CFG", a second transformer call on the negative prompt, enabled by ``negative_prompt=""`` and
``true_cfg_scale > 1``. Both encoders (word-level tokenizers built offline) are first
pretrained to tell the caption's digit, CLIP from its pooled output, T5 from every output
token, and then frozen. The transformer learns rectified flow (:mod:`train.flow`) with 10 %
of captions dropped to "".
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline, FluxTransformer2DModel

from train.data import TRAIN_TEMPLATES
from train.diffusion import EMA, caption_arguments, checkpoint_path, fit, latent_dataset, training_arguments
from train.flow import inference_scheduler, noisy_batch
from train.pixart import build_text_encoder as build_t5_encoder
from train.pixart import build_tokenizer as build_t5_tokenizer
from train.text import build_clip_text_encoder, build_clip_tokenizer, caption_table, pretrain_text_encoders
from train.vae import load_vae

OUT_DIR = Path("models/flux-digits")
CLIP_TOKENS = 8
T5_TOKENS = 8
LATENT_SIDE = 16


def build_transformer(
    width: int, heads: int, double_layers: int, single_layers: int, text_width: int
) -> FluxTransformer2DModel:
    """FLUX on packed 2×2 latent patches (64 tokens × 16 channels); rotary axes (4, 6, 6) per 16-wide head."""
    head_dim = width // heads
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=double_layers,
        num_single_layers=single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_width,
        pooled_projection_dim=text_width,
        guidance_embeds=False,
        axes_dims_rope=(head_dim - 12, 6, 6),
    )


def build_pipeline(args: argparse.Namespace) -> FluxPipeline:
    """The untrained pipeline: transformer, text encoders (seeded), the digits VAE, Euler scheduler."""
    tokenizer = build_clip_tokenizer(CLIP_TOKENS)
    torch.manual_seed(args.seed + 10)
    clip = build_clip_text_encoder(len(tokenizer), args.text_width, 2, CLIP_TOKENS, projection=False)
    t5_tokenizer = build_t5_tokenizer()
    t5 = build_t5_encoder(len(t5_tokenizer), args.text_width)
    torch.manual_seed(args.seed)
    vae = load_vae()
    vae.register_to_config(shift_factor=0.0)  # the pipeline decodes latents / scaling_factor + shift_factor
    return FluxPipeline(
        scheduler=inference_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=build_transformer(args.width, args.heads, args.double_layers, args.single_layers, args.text_width),
    )


def train(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    latents, labels = latent_dataset(copies=args.copies, seed=args.seed)
    print(f"{len(latents)} latents {tuple(latents.shape[1:])} encoded in {time.perf_counter() - start:.0f}s")
    packed = FluxPipeline._pack_latents(latents, len(latents), latents.shape[1], LATENT_SIDE, LATENT_SIDE)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, LATENT_SIDE // 2, LATENT_SIDE // 2, "cpu", torch.float32)

    pipe = build_pipeline(args)
    model = pipe.transformer
    texts, classes = caption_table()
    clip_ids = pipe.tokenizer(texts, padding="max_length", max_length=CLIP_TOKENS, return_tensors="pt").input_ids
    t5_ids = pipe.tokenizer_2(texts, padding="max_length", max_length=T5_TOKENS, return_tensors="pt").input_ids
    assert clip_ids.shape[1] == CLIP_TOKENS and t5_ids.shape[1] == T5_TOKENS
    assert not (t5_ids == pipe.tokenizer_2.unk_token_id).any(), "caption vocabulary misses a word"
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    both = torch.nn.ModuleDict({"transformer": model, "text_encoder": encoders[0], "text_encoder_2": encoders[1]})
    both.eval()
    print(
        f"flux: width {args.width}, {args.double_layers} double + {args.single_layers} single blocks, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; "
        f"clip: {sum(p.numel() for p in encoders[0].parameters()):,} parameters, vocabulary {len(pipe.tokenizer)}; "
        f"t5: {sum(p.numel() for p in encoders[1].parameters()):,} parameters, vocabulary {len(pipe.tokenizer_2)}"
    )
    checkpoint = None if args.no_resume else checkpoint_path("flux", args)
    if checkpoint is None or not checkpoint.is_file():  # a checkpoint holds the pretrained encoders
        pretrain_text_encoders(
            encoders,
            lambda rows: [encoders[0](clip_ids[rows]).pooler_output, encoders[1](t5_ids[rows]).last_hidden_state],
            classes,
            steps=args.text_pretrain_steps,
            generator=torch.Generator().manual_seed(args.seed + 2),
        )
    for enc in encoders:
        enc.requires_grad_(False)
    ema = EMA(both, decay=args.ema)
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_templates = len(TRAIN_TEMPLATES)
    null_row = len(texts) - 1
    table: dict[str, torch.Tensor] = {}

    def embed() -> None:
        """Caption embeddings exactly as the pipeline computes them (after ``fit`` restored the encoders)."""
        with torch.no_grad():
            text, pooled, txt_ids = pipe.encode_prompt(texts, max_sequence_length=T5_TOKENS)
        table.update(text=text, pooled=pooled, txt_ids=txt_ids)
        print(f"caption table {tuple(text.shape)}, pooled {tuple(pooled.shape)}")

    def loss_fn(step: int) -> torch.Tensor:
        if not table:
            embed()
        idx = torch.randint(len(latents), (args.batch,), generator=gen)
        rows = labels[idx] * n_templates + torch.randint(n_templates, (args.batch,), generator=gen)
        rows[torch.rand(args.batch, generator=gen) < args.caption_dropout] = null_row
        xt, sigma, target = noisy_batch(packed[idx], gen)
        pred = model(
            hidden_states=xt,
            timestep=sigma,
            encoder_hidden_states=table["text"][rows],
            pooled_projections=table["pooled"][rows],
            txt_ids=table["txt_ids"],
            img_ids=img_ids,
        ).sample
        return F.mse_loss(pred, target)

    fit(both, ema, loss_fn, gen, steps=args.steps, lr=args.lr, warmup=args.warmup, checkpoint=checkpoint, start=start)

    pipe.transformer = ema.model["transformer"]
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"saved {args.out}  training time {time.perf_counter() - start:.0f}s wall, {time.process_time():.0f}s CPU")


def main() -> None:
    parser = training_arguments(
        __doc__, out=OUT_DIR, steps=1500, width=96, heads=6, double_layers=2, single_layers=4
    )
    caption_arguments(parser, text_width=64, pretrain_steps=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
