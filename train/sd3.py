"""Train ``sd3-digits``: a caption-conditioned SD3Transformer2DModel (MMDiT) with tiny CLIP and T5 encoders.

    .venv/bin/python -m train.sd3            # needs models/vae-digits/; writes models/sd3-digits/

The stock ``StableDiffusion3Pipeline`` joins the two CLIP encoders' penultimate hidden states
along channels (8 tokens), followed by the T5 encoder's outputs (call with
``max_sequence_length=8``): the joint sequence is 256 image + 16 text tokens. The CLIP
encoders' projected pooled outputs, concatenated, drive AdaLN. All three encoders (word-level
tokenizers built offline) are first pretrained to tell the caption's digit, the CLIP ones
from their pooled output, T5 from every output token, and then frozen. The transformer
learns rectified flow (:mod:`train.flow`) with 10 % of captions dropped to "", the
pipeline's default negative prompt, for batched CFG.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from train.data import TRAIN_TEMPLATES
from train.diffusion import EMA, caption_arguments, checkpoint_path, fit, latent_dataset, training_arguments
from train.flow import inference_scheduler, noisy_batch
from train.pixart import build_text_encoder as build_t5_encoder
from train.pixart import build_tokenizer as build_t5_tokenizer
from train.text import build_clip_text_encoder, build_clip_tokenizer, caption_table, pretrain_text_encoders
from train.vae import load_vae

OUT_DIR = Path("models/sd3-digits")
CLIP_TOKENS = 8
T5_TOKENS = 8


def build_transformer(width: int, heads: int, layers: int, text_width: int) -> SD3Transformer2DModel:
    """MMDiT on 16×16×4 latents with patch 1 (N = 256); block 0 adds MMDiT-X image self-attention (``attn2``)."""
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=width // heads,
        num_attention_heads=heads,
        joint_attention_dim=2 * text_width,
        caption_projection_dim=width,
        pooled_projection_dim=2 * text_width,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def build_pipeline(args: argparse.Namespace) -> StableDiffusion3Pipeline:
    """The untrained pipeline: transformer, text encoders (seeded), the digits VAE, Euler scheduler."""
    tokenizer = build_clip_tokenizer(CLIP_TOKENS)
    encoders = []
    for i in range(2):
        torch.manual_seed(args.seed + 10 + i)
        encoders.append(build_clip_text_encoder(len(tokenizer), args.text_width, 2, CLIP_TOKENS, projection=True))
    t5_tokenizer = build_t5_tokenizer()
    t5 = build_t5_encoder(len(t5_tokenizer), 2 * args.text_width)
    torch.manual_seed(args.seed)
    vae = load_vae()
    vae.register_to_config(shift_factor=0.0)  # the pipeline decodes latents / scaling_factor + shift_factor
    return StableDiffusion3Pipeline(
        transformer=build_transformer(args.width, args.heads, args.layers, args.text_width),
        scheduler=inference_scheduler(),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=build_clip_tokenizer(CLIP_TOKENS),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )


def train(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    latents, labels = latent_dataset(copies=args.copies, seed=args.seed)
    print(f"{len(latents)} latents {tuple(latents.shape[1:])} encoded in {time.perf_counter() - start:.0f}s")

    pipe = build_pipeline(args)
    model = pipe.transformer
    texts, classes = caption_table()
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3)
    lengths = (CLIP_TOKENS, CLIP_TOKENS, T5_TOKENS)
    ids = [tok(texts, padding="max_length", max_length=n, return_tensors="pt").input_ids
           for tok, n in zip(tokenizers, lengths)]
    assert all(row.shape[1] == n for row, n in zip(ids, lengths))
    assert not (ids[2] == pipe.tokenizer_3.unk_token_id).any(), "caption vocabulary misses a word"
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    both = torch.nn.ModuleDict({"transformer": model, **dict(zip(names, encoders))})
    both.eval()
    print(
        f"sd3: width {args.width}, {args.layers} layers, {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"clip: 2 × {sum(p.numel() for p in encoders[0].parameters()):,} parameters, "
        f"vocabulary {len(pipe.tokenizer)}; "
        f"t5: {sum(p.numel() for p in encoders[2].parameters()):,} parameters, vocabulary {len(pipe.tokenizer_3)}"
    )
    checkpoint = None if args.no_resume else checkpoint_path("sd3", args)
    if checkpoint is None or not checkpoint.is_file():  # a checkpoint holds the pretrained encoders
        pretrain_text_encoders(
            encoders,
            lambda rows: [
                encoders[0](ids[0][rows]).text_embeds,
                encoders[1](ids[1][rows]).text_embeds,
                encoders[2](ids[2][rows]).last_hidden_state,
            ],
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
            text, _, pooled, _ = pipe.encode_prompt(
                texts, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS
            )
        table.update(text=text, pooled=pooled)
        print(f"caption table {tuple(text.shape)}, pooled {tuple(pooled.shape)}")

    def loss_fn(step: int) -> torch.Tensor:
        if not table:
            embed()
        idx = torch.randint(len(latents), (args.batch,), generator=gen)
        rows = labels[idx] * n_templates + torch.randint(n_templates, (args.batch,), generator=gen)
        rows[torch.rand(args.batch, generator=gen) < args.caption_dropout] = null_row
        xt, sigma, target = noisy_batch(latents[idx], gen)
        pred = model(
            hidden_states=xt,
            timestep=sigma * 1000,
            encoder_hidden_states=table["text"][rows],
            pooled_projections=table["pooled"][rows],
        ).sample
        return F.mse_loss(pred, target)

    fit(both, ema, loss_fn, gen, steps=args.steps, lr=args.lr, warmup=args.warmup, checkpoint=checkpoint, start=start)

    pipe.transformer = ema.model["transformer"]
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"saved {args.out}  training time {time.perf_counter() - start:.0f}s wall, {time.process_time():.0f}s CPU")


def main() -> None:
    parser = training_arguments(__doc__, out=OUT_DIR, steps=1000, width=64, heads=4, layers=4)
    caption_arguments(parser, text_width=32, pretrain_steps=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
