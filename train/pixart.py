"""Train ``pixart-digits``: a caption-conditioned PixArtTransformer2DModel with a tiny T5 encoder.

    .venv/bin/python -m train.pixart         # needs models/vae-digits/; writes models/pixart-digits/

Captions are drawn from :data:`train.data.TRAIN_TEMPLATES` ("a handwritten seven", "the digit 7",
"number seven, handwritten", ...); :data:`train.data.HELDOUT_TEMPLATES` never appear in training.
10 % of captions are dropped to "" — the stock ``PixArtSigmaPipeline``'s default negative
prompt — so CFG works out of the box. The T5 encoder and its word-level Unigram tokenizer
are built offline; the encoder is first trained for a few hundred cheap steps to tell the
caption's digit from every output token (a linear head, discarded), then trained jointly
with the transformer.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from train.data import TRAIN_TEMPLATES, caption, caption_vocabulary
from train.diffusion import (
    EMA,
    caption_arguments,
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

OUT_DIR = Path("models/pixart-digits")
MAX_TOKENS = 16


def build_tokenizer() -> T5Tokenizer:
    """Word-level Unigram T5 tokenizer over the caption vocabulary (pad 0, eos 1, unk 2)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(w if w == "," else f"\u2581{w}", -float(i + 1)) for i, w in enumerate(caption_vocabulary())]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_text_encoder(vocab_size: int, width: int) -> T5EncoderModel:
    """A two-layer T5 encoder."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_kv=width // 4,
        d_ff=2 * width,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=MAX_TOKENS,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def build_transformer(width: int, heads: int, layers: int, caption_channels: int) -> PixArtTransformer2DModel:
    """PixArt on 16×16×4 latents with patch 1: N = 256 tokens."""
    return PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        cross_attention_dim=width,
        sample_size=16,
        patch_size=1,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
        caption_channels=caption_channels,
    )


def pretrain_text_encoder(
    text_encoder: T5EncoderModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    digits: torch.Tensor,
    *,
    steps: int,
    generator: torch.Generator,
) -> None:
    """Teach every output token of a caption to carry the caption's digit (per-token cross-entropy)."""
    head = torch.nn.Linear(text_encoder.config.d_model, 10)
    params = list(text_encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        rows = torch.randint(len(ids), (64,), generator=generator)
        m = mask[rows].bool()
        hidden = text_encoder(ids[rows], attention_mask=mask[rows]).last_hidden_state
        target = digits[rows, None].expand_as(m)
        loss = F.cross_entropy(head(hidden[m]), target[m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step == steps - 1:
            with torch.no_grad():
                acc = (head(hidden[m]).argmax(-1) == target[m]).float().mean()
            print(f"text encoder step {step + 1:4d}/{steps}  loss {loss.item():.4f}  token accuracy {acc:.3f}")


def train(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    latents, labels = latent_dataset(copies=args.copies, seed=args.seed)
    print(f"{len(latents)} latents {tuple(latents.shape[1:])} encoded in {time.perf_counter() - start:.0f}s")

    tokenizer = build_tokenizer()
    # Row d·T + j holds digit d in template j; the last row is the empty (unconditional) caption.
    texts = [caption(d, t) for d in range(10) for t in TRAIN_TEMPLATES] + [""]
    tokens = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    assert not (tokens.input_ids == tokenizer.unk_token_id).any(), "caption vocabulary misses a word"
    null_row = len(texts) - 1

    text_encoder = build_text_encoder(len(tokenizer), args.text_width)
    model = build_transformer(args.width, args.heads, args.layers, args.text_width)
    both = torch.nn.ModuleDict({"transformer": model, "text_encoder": text_encoder}).eval()
    print(
        f"pixart: width {args.width}, {args.layers} layers, {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"t5: {sum(p.numel() for p in text_encoder.parameters()):,} parameters; vocabulary {len(tokenizer)}"
    )
    checkpoint = None if args.no_resume else checkpoint_path("pixart", args)
    caption_digits = torch.arange(10).repeat_interleave(len(TRAIN_TEMPLATES))
    if checkpoint is None or not checkpoint.is_file():  # a checkpoint holds the pretrained encoder
        pretrain_text_encoder(
            text_encoder,
            tokens.input_ids[:null_row],
            tokens.attention_mask[:null_row],
            caption_digits,
            steps=args.text_pretrain_steps,
            generator=torch.Generator().manual_seed(args.seed + 2),
        )
    ema = EMA(both, decay=args.ema)
    sched = training_scheduler()
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_templates = len(TRAIN_TEMPLATES)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(len(latents), (args.batch,), generator=gen)
        rows = labels[idx] * n_templates + torch.randint(n_templates, (args.batch,), generator=gen)
        rows[torch.rand(args.batch, generator=gen) < args.caption_dropout] = null_row
        ids, mask = tokens.input_ids[rows], tokens.attention_mask[rows]
        text = text_encoder(ids, attention_mask=mask).last_hidden_state
        xt, t, noise = noisy_batch(sched, latents[idx], gen)
        pred = model(
            xt,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        return weighted_mse(pred, noise, min_snr_weights(sched, t))

    fit(both, ema, loss_fn, gen, steps=args.steps, lr=args.lr, warmup=args.warmup, checkpoint=checkpoint, start=start)

    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=ema.model["text_encoder"],
        vae=load_vae(),
        transformer=ema.model["transformer"],
        scheduler=inference_scheduler(),
    )
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"saved {args.out}  training time {time.perf_counter() - start:.0f}s wall, {time.process_time():.0f}s CPU")


def main() -> None:
    parser = training_arguments(__doc__, out=OUT_DIR, steps=1000, width=64, heads=4, layers=6)
    caption_arguments(parser, text_width=64, pretrain_steps=150)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
