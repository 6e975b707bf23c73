"""Train ``latte-digits``: a caption-conditioned LatteTransformer3DModel on moving digits.

    .venv/bin/python -m train.latte          # needs models/vae-digits/; writes models/latte-digits/
    .venv/bin/python -m train.latte --evaluate --videos 40   # per-frame accuracy, motion consistency
    .venv/bin/python -m train.latte --evaluate --out /tmp/latte-new   # a folder not yet shipped

Videos are 8 frames of 32×32 (:mod:`train.moving`), encoded once by the shared VAE into
``[4, 8, 16, 16]`` latents. Captions ("a seven moving left", "the digit 7 sliding left", ...)
come from :data:`train.moving.TRAIN_TEMPLATES`; :data:`train.moving.HELDOUT_TEMPLATES` never
appear in training. The tokenizer is the PixArt word-level vocabulary plus the motion words;
the T5 encoder starts from ``models/pixart-digits``' when that exists (embeddings resized),
else (or with ``--fresh-text-encoder``) from scratch. It first learns for a few hundred cheap
steps to tell the caption's digit and direction from every output token the transformer will see
(two linear heads, discarded) and then stays frozen by default (``--text-lr-scale 0``: trained
jointly, it collapsed the caption signal). The transformer's caption projection is initialised
orthogonally and scaled so those tokens reach cross-attention at unit RMS
(:func:`train.diffusion.init_caption_projection`; diffusers' default init passes them well below
unit scale, and a model trained from it learned to ignore the captions). ``--text-lr-scale`` and
``--caption-lr-scale`` multiply the learning rates of the T5 encoder and of the caption projection
and cross-attention.

Text is fed exactly as ``LattePipeline(..., mask_feature=False)`` feeds it: prompts padded to
120 tokens and encoded with the attention mask, every one of the 120 outputs kept (pad
positions attend to the caption, so all carry it); the unconditional input (10 % caption
dropout) is the 120-token encoding of "" (the pipeline's negative prompt); the transformer
gets no encoder mask. With ``--mask-feature`` the prompt outputs are zeroed at pads, as the
pipeline's default ``mask_feature=True`` does for batches > 1 (batch 1 truncates instead);
the caption's few tokens then drown among ~115 identical pad keys in cross-attention, and
a short training learns to ignore the text, which is why the shipped model does not use it. The transformer predicts
8 channels of which the pipeline keeps the first 4 (epsilon), so only those are trained.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import LattePipeline, LatteTransformer3DModel
from transformers import T5EncoderModel, T5Tokenizer

from train.diffusion import (
    EMA,
    checkpoint_path,
    fit,
    inference_scheduler,
    init_caption_projection,
    min_snr_weights,
    noisy_batch,
    training_scheduler,
    weighted_mse,
)
from train.moving import DIRECTIONS, FRAMES, MOTION_WORDS, TRAIN_TEMPLATES, encode_videos, video_caption, video_dataset
from train.pixart import build_text_encoder
from train.pixart import build_tokenizer as build_pixart_tokenizer
from train.vae import load_vae

OUT_DIR = Path("models/latte-digits")
PIXART_DIR = Path("models/pixart-digits")
MAX_TOKENS = 120  # LattePipeline.encode_prompt's fixed padding length
SEED = 0


def build_tokenizer() -> T5Tokenizer:
    """The PixArt word-level Unigram vocabulary (same ids) followed by the motion words."""
    base = build_pixart_tokenizer()
    vocab = [(tok, score) for tok, score in zip(base.convert_ids_to_tokens(list(range(len(base)))), _scores(base))]
    known = {tok for tok, _ in vocab}
    last = min(score for _, score in vocab)
    for word in MOTION_WORDS:
        piece = f"\u2581{word}"
        if piece not in known:
            last -= 1.0
            vocab.append((piece, last))
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _scores(tokenizer: T5Tokenizer) -> list[float]:
    """Unigram scores of the PixArt vocabulary as :func:`train.pixart.build_tokenizer` assigns them."""
    return [0.0, 0.0, 0.0] + [-float(i + 1) for i in range(len(tokenizer) - 3)]


def build_transformer(
    width: int, heads: int, layers: int, caption_channels: int, patch: int, frames: int = FRAMES
) -> LatteTransformer3DModel:
    """Latte on ``[4, frames, 16, 16]`` latents: (16/patch)² tokens per frame, ``layers`` spatial + temporal blocks."""
    return LatteTransformer3DModel(
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        cross_attention_dim=width,
        sample_size=16,
        patch_size=patch,
        norm_type="ada_norm_single",
        caption_channels=caption_channels,
        video_length=frames,
    )


def initial_text_encoder(vocab_size: int, width: int, fresh: bool = False) -> tuple[T5EncoderModel, str]:
    """PixArt-digits' T5 encoder with resized embeddings if it is there (and not ``fresh``), else a fresh one."""
    if not fresh and (PIXART_DIR / "text_encoder").is_dir():
        enc = T5EncoderModel.from_pretrained(PIXART_DIR / "text_encoder")
        if enc.config.d_model == width:
            enc.resize_token_embeddings(vocab_size)
            return enc, f"initialised from {PIXART_DIR / 'text_encoder'}"
    return build_text_encoder(vocab_size, width), "random init"


def pretrain_text_encoder(
    text_encoder: T5EncoderModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    keep: torch.Tensor,
    digits: torch.Tensor,
    directions: torch.Tensor,
    *,
    steps: int,
    generator: torch.Generator,
    batch: int = 64,
    lr: float = 3e-3,
) -> float:
    """Teach every kept output token (``keep``: the positions the transformer sees) the caption's digit
    and direction (per-token cross-entropy, two linear heads); returns the final token accuracy (both right)."""
    width = text_encoder.config.d_model
    digit_head, dir_head = torch.nn.Linear(width, 10), torch.nn.Linear(width, len(DIRECTIONS))
    params = [*text_encoder.parameters(), *digit_head.parameters(), *dir_head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    acc = 0.0
    for step in range(steps):
        rows = torch.randint(len(ids), (batch,), generator=generator)
        k = keep[rows].bool()
        hidden = text_encoder(ids[rows], attention_mask=mask[rows]).last_hidden_state[k]
        d, m = digits[rows, None].expand_as(k)[k], directions[rows, None].expand_as(k)[k]
        d_logits, m_logits = digit_head(hidden), dir_head(hidden)
        loss = F.cross_entropy(d_logits, d) + F.cross_entropy(m_logits, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step == steps - 1:
            with torch.no_grad():
                acc = float(((d_logits.argmax(-1) == d) & (m_logits.argmax(-1) == m)).float().mean())
            print(f"text encoder step {step + 1:4d}/{steps}  loss {loss.item():.4f}  token accuracy {acc:.3f}")
    return acc


def lr_scale(name: str, text: float, caption: float) -> float:
    """Learning-rate multiplier of a parameter of ``{"transformer": ..., "text_encoder": ...}``: ``text`` for
    the T5 encoder, ``caption`` for the caption projection and cross-attention, 1 elsewhere."""
    if name.startswith("text_encoder."):
        return text
    return caption if ".caption_projection." in name or ".attn2." in name else 1.0


def train(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    vae = load_vae()
    videos, labels, directions = video_dataset(copies=args.copies, seed=args.seed)
    latents = encode_videos(vae, videos)
    del videos
    print(f"{len(latents)} video latents {tuple(latents.shape[1:])} encoded in {time.perf_counter() - start:.0f}s")

    tokenizer = build_tokenizer()
    n_dir, n_tpl = len(DIRECTIONS), len(TRAIN_TEMPLATES)
    # Row (d·4 + m)·T + j: digit d, direction m, template j; the last row is "" (unconditional).
    texts = [video_caption(d, m, t) for d in range(10) for m in DIRECTIONS for t in TRAIN_TEMPLATES] + [""]
    tokens = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    assert not (tokens.input_ids == tokenizer.unk_token_id).any(), "caption vocabulary misses a word"
    null_row = len(texts) - 1

    if args.init is not None:  # continue from a saved pipeline (same tokenizer)
        text_encoder = T5EncoderModel.from_pretrained(args.init / "text_encoder")
        model = LatteTransformer3DModel.from_pretrained(args.init / "transformer")
        origin = f"initialised from {args.init}"
    else:
        text_encoder, origin = initial_text_encoder(len(tokenizer), args.text_width, args.fresh_text_encoder)
        model = build_transformer(args.width, args.heads, args.layers, text_encoder.config.d_model, args.patch)
    both = torch.nn.ModuleDict({"transformer": model, "text_encoder": text_encoder}).eval()
    print(
        f"latte: width {args.width}, {args.layers}+{args.layers} layers, patch {args.patch}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; t5 ({origin}): "
        f"{sum(p.numel() for p in text_encoder.parameters()):,} parameters; vocabulary {len(tokenizer)}"
    )
    checkpoint = None if args.no_resume else checkpoint_path("latte", args)
    if args.init is None and (checkpoint is None or not checkpoint.is_file()):  # a checkpoint holds both inits
        # Positions the transformer sees: all 120 (mask_feature=False), else the caption's tokens.
        keep = tokens.attention_mask if args.mask_feature else torch.ones_like(tokens.attention_mask)
        if args.text_pretrain_steps > 0:
            row = torch.arange(null_row)  # caption rows only
            pretrain_text_encoder(
                text_encoder,
                tokens.input_ids[:null_row],
                tokens.attention_mask[:null_row],
                keep[:null_row],
                row // (n_dir * n_tpl),
                row // n_tpl % n_dir,
                steps=args.text_pretrain_steps,
                generator=torch.Generator().manual_seed(args.seed + 2),
            )
        if not args.default_caption_init:
            with torch.no_grad():
                enc = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
                enc = enc[keep.bool() | (torch.arange(len(texts)) == null_row)[:, None]]
            factor = init_caption_projection(model.caption_projection, enc)
            print(f"caption projection: orthogonal, linear_2 scaled by {factor:.2f} to unit output RMS")
    ema = EMA(both, decay=args.ema)
    sched = training_scheduler()
    gen = torch.Generator().manual_seed(args.seed + 1)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(len(latents), (args.batch,), generator=gen)
        rows = (labels[idx] * n_dir + directions[idx]) * n_tpl + torch.randint(n_tpl, (args.batch,), generator=gen)
        drop = torch.rand(args.batch, generator=gen) < args.caption_dropout
        rows[drop] = null_row
        uniq, inverse = torch.unique(rows, return_inverse=True)
        ids, mask = tokens.input_ids[uniq], tokens.attention_mask[uniq]
        enc = text_encoder(ids, attention_mask=mask).last_hidden_state
        if args.mask_feature:  # pipeline with mask_feature=True: prompts zeroed at pads, "" left unmasked
            keep = torch.where(uniq[:, None] == null_row, torch.ones_like(mask), mask)
            enc = enc * keep[..., None].to(enc.dtype)
        text = enc[inverse]
        xt, t, noise = noisy_batch(sched, latents[idx], gen)
        pred = model(xt, timestep=t, encoder_hidden_states=text).sample
        if args.min_snr:
            return weighted_mse(pred[:, :4], noise, min_snr_weights(sched, t))
        return F.mse_loss(pred[:, :4], noise)

    fit(
        both,
        ema,
        loss_fn,
        gen,
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        lr_scale=lambda name: lr_scale(name, args.text_lr_scale, args.caption_lr_scale),
        checkpoint=checkpoint,
        start=start,
    )

    pipe = LattePipeline(
        tokenizer=tokenizer,
        text_encoder=ema.model["text_encoder"],
        vae=vae,
        transformer=ema.model["transformer"],
        scheduler=inference_scheduler(),
    )
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"saved {args.out}  training time {time.perf_counter() - start:.0f}s")


def evaluate(args: argparse.Namespace) -> None:
    """Per-frame accuracy and motion consistency of sampled videos (and of real moving digits, for scale)."""
    import numpy as np

    from planner import video_yardstick
    from planner.embedded import embedded_model, generate, load_embedded
    from train.moving import HELDOUT_TEMPLATES, moving_videos

    name = "latte-digits"
    model = embedded_model(name)
    templates = HELDOUT_TEMPLATES if args.phrasings == "heldout" else TRAIN_TEMPLATES
    gen = torch.Generator().manual_seed(args.seed + 7)
    prompts, digits, dirs = [], [], []
    for i in range(args.videos):
        d, m = i % 10, DIRECTIONS[int(torch.randint(len(DIRECTIONS), (1,), generator=gen))]
        prompts.append(video_caption(d, m, templates[int(torch.randint(len(templates), (1,), generator=gen))]))
        digits.append(d)
        dirs.append(m)
    if args.out.resolve() == model.folder.resolve():
        pipe = load_embedded(name)
    else:  # a trained folder not yet shipped: loaded the same way
        pipe = LattePipeline.from_pretrained(str(args.out), local_files_only=True, low_cpu_mem_usage=False)
        pipe.set_progress_bar_config(disable=True)
    print(f"evaluating {args.out}")
    start = time.perf_counter()
    videos = []
    for i in range(0, len(prompts), args.eval_batch):
        part = prompts[i : i + args.eval_batch]
        kwargs = {"guidance_scale": args.guidance} if args.guidance is not None else {}
        videos.append(generate(pipe, name, part, seed=args.eval_seed + i, **kwargs))
    video = np.concatenate(videos)
    guidance = args.guidance if args.guidance is not None else model.guidance
    acc = video_yardstick.frame_accuracy(video, digits)
    motion = video_yardstick.motion_consistency(video, dirs)
    print(f"{len(prompts)} videos ({args.phrasings} phrasings, guidance {guidance}, {model.steps} steps, "
          f"seeds {args.eval_seed}+i) in {time.perf_counter() - start:.0f}s: "
          f"per-frame accuracy {acc:.3f}, motion consistency {motion:.3f}")
    idx = torch.arange(len(prompts)) * 37 % 1797
    real, labels, real_dirs = moving_videos(idx, args.eval_seed, torch.tensor([DIRECTIONS.index(m) for m in dirs]))
    real = real.permute(0, 2, 1, 3, 4).expand(-1, -1, 3, -1, -1)
    print(f"real moving digits, same directions: per-frame accuracy "
          f"{video_yardstick.frame_accuracy(real, labels.numpy()):.3f}, motion consistency "
          f"{video_yardstick.motion_consistency(real, [DIRECTIONS[int(k)] for k in real_dirs]):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--patch", type=int, default=2, help="latent patch size: (16/patch)² tokens per frame")
    parser.add_argument("--text-width", type=int, default=64)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--copies", type=int, default=2, help="copies of the dataset (random directions) to encode")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="pipeline folder to write (with --evaluate: to measure)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    parser.add_argument(
        "--mask-feature",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train for LattePipeline(mask_feature=True) (prompt embeddings zeroed at pads); default: unmasked",
    )
    parser.add_argument("--fresh-text-encoder", action="store_true", help="random T5 even if pixart-digits exists")
    parser.add_argument("--text-pretrain-steps", type=int, default=300, help="digit + direction pretraining of T5")
    parser.add_argument(
        "--default-caption-init", action="store_true", help="keep diffusers' caption projection init (the old model)"
    )
    parser.add_argument(
        "--text-lr-scale", type=float, default=0.0, help="lr multiplier of the T5 encoder (0: frozen after pretraining)"
    )
    parser.add_argument("--caption-lr-scale", type=float, default=1.0, help="lr multiplier: caption projection, attn2")
    parser.add_argument("--min-snr", action=argparse.BooleanOptionalAction, default=True, help="min-SNR-5 weighting")
    parser.add_argument("--no-resume", action="store_true", help="ignore and do not write build/train/ checkpoints")
    parser.add_argument("--init", type=Path, default=None, help="start from this saved latte pipeline folder")
    parser.add_argument("--evaluate", action="store_true", help="measure the saved model instead of training")
    parser.add_argument("--videos", type=int, default=40, help="with --evaluate: videos to sample")
    parser.add_argument("--phrasings", choices=("heldout", "train"), default="heldout")
    parser.add_argument("--guidance", type=float, default=None, help="with --evaluate: override the card's")
    parser.add_argument("--eval-seed", type=int, default=500)
    parser.add_argument("--eval-batch", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    evaluate(args) if args.evaluate else train(args)


if __name__ == "__main__":
    main()
