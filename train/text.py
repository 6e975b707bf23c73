"""Offline text encoders for the MMDiT pipelines (sd3-digits, flux-digits).

A word-level CLIP tokenizer over the caption words (a BPE whose merges spell out each word,
so every word is one token), tiny CLIP text encoders, and a short pretraining that teaches
the encoders' outputs to tell a caption's digit (or the empty caption) apart. The encoders
are then frozen: the transformer trains on a fixed table of caption embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from train.data import TRAIN_TEMPLATES, caption, caption_vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EMPTY_CLASS = 10


def build_clip_tokenizer(max_length: int) -> CLIPTokenizer:
    """Word-level CLIP tokenizer over the caption vocabulary (bos 0, eos = pad = unk 1).

    Every caption word (and the comma) becomes a single token; ``max_length`` is the
    ``model_max_length`` the pipelines pad to (bos and eos included).
    """
    vocab = {BOS: 0, EOS: 1}
    merges: list[tuple[str, str]] = []
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in caption_vocabulary()]
    for symbols in words:
        for s in symbols:
            vocab.setdefault(s, len(vocab))
    for symbols in words:
        merged = symbols[0]
        for s in symbols[1:]:
            if (merged, s) not in merges:
                merges.append((merged, s))
            merged += s
            vocab.setdefault(merged, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_clip_text_encoder(
    vocab_size: int, width: int, layers: int, max_length: int, projection: bool
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A small causal CLIP text encoder (4 heads, MLP 2× width); with ``projection`` a
    ``CLIPTextModelWithProjection`` whose ``text_embeds`` have ``width`` channels."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        hidden_act="quick_gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def caption_table() -> tuple[list[str], torch.Tensor]:
    """Training captions and their classes: row d·T + j is digit d in template j; the last row is ""
    (class :data:`EMPTY_CLASS`), the empty prompt used for caption dropout and as negative prompt."""
    texts = [caption(d, t) for d in range(10) for t in TRAIN_TEMPLATES] + [""]
    classes = torch.cat([torch.arange(10).repeat_interleave(len(TRAIN_TEMPLATES)), torch.tensor([EMPTY_CLASS])])
    return texts, classes


def pretrain_text_encoders(
    encoders: Sequence[torch.nn.Module],
    features: Callable[[torch.Tensor], list[torch.Tensor]],
    classes: torch.Tensor,
    *,
    steps: int,
    generator: torch.Generator,
    batch: int = 64,
    lr: float = 3e-3,
    empty_rate: float = 0.1,
) -> None:
    """Teach each text feature (``[B, C]`` pooled or ``[B, L, C]`` per token, from ``features(rows)``)
    to carry its caption's class through a linear head per feature (discarded afterwards).

    Rows are drawn uniformly, the last (empty) row with probability ``empty_rate``.
    """
    with torch.no_grad():
        dims = [f.shape[-1] for f in features(torch.arange(2))]
    heads = torch.nn.ModuleList(torch.nn.Linear(d, EMPTY_CLASS + 1) for d in dims)
    params = [p for m in (*encoders, heads) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    empty = len(classes) - 1
    for step in range(steps):
        rows = torch.randint(empty, (batch,), generator=generator)
        rows[torch.rand(batch, generator=generator) < empty_rate] = empty
        losses, correct = [], []
        for head, f in zip(heads, features(rows)):
            target = classes[rows].view(-1, *[1] * (f.ndim - 2)).expand(f.shape[:-1])
            logits = head(f)
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)))
            correct.append((logits.argmax(-1) == target).float().mean())
        loss = torch.stack(losses).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step == steps - 1:
            acc = " ".join(f"{float(c):.3f}" for c in correct)
            print(f"text encoders step {step + 1:4d}/{steps}  loss {loss.item():.4f}  accuracy per feature {acc}")
