"""The shipped digit models load offline through the stock pipelines and reach their cards' accuracy;
the yardsticks (classifier, PSNR, SSIM) behave as specified."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from PIL import Image

from planner import yardstick
from planner.embedded import EMBEDDED_MODELS, embedded_model, generate, load_embedded
from runtime.apply import self_attention_layers
from train.data import DIGIT_WORDS, heldout_captions, train_captions

ACCURACY_MARGIN = 0.15  # 20 seeded samples may miss up to 3 more than the 100-sample card rate
CAPTIONED = [name for name, model in EMBEDDED_MODELS.items() if model.pipeline != "DiTPipeline"]


@pytest.fixture(scope="module")
def pipes() -> dict[str, object]:
    """Every pipeline, loaded with HF_HUB_OFFLINE=1 and every socket connection refused."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access during offline model loading")

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)
    try:
        return {name: load_embedded(name) for name in EMBEDDED_MODELS}
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def samples(pipes: dict[str, object]) -> dict[str, np.ndarray]:
    """20 seeded samples per model: DiT two per class, the caption models one per held-out caption."""
    out = {}
    for name, pipe in pipes.items():
        model = embedded_model(name)
        prompts = list(range(10)) * 2 if model.pipeline == "DiTPipeline" else list(model.eval_prompts)
        out[name] = (generate(pipe, name, prompts, seed=500), prompts)
    return out


def _digits_of(name: str, prompts: list) -> list[int]:
    if embedded_model(name).pipeline == "DiTPipeline":
        return [int(p) for p in prompts]
    return list(embedded_model(name).eval_digits)


@pytest.mark.parametrize("name", list(EMBEDDED_MODELS))
def test_loaded_pipeline_matches_its_facts(pipes: dict[str, object], name: str) -> None:
    pipe, model = pipes[name], embedded_model(name)
    assert type(pipe).__name__ == model.pipeline
    cfg = pipe.transformer.config
    side = model.height // 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # latent side
    assert model.height == model.width and cfg.get("sample_size", side) == side
    patch = 2 if model.pipeline == "FluxPipeline" else cfg.patch_size  # FLUX packs 2×2 latent patches
    assert (side // patch) ** 2 == model.tokens >= 64
    assert model.window == model.tokens // 8
    assert len(self_attention_layers(pipe.transformer)) == model.layers
    assert pipe.transformer.dtype == torch.float32
    assert model.steps == 20 and model.guidance > 1


@pytest.mark.parametrize("name", list(EMBEDDED_MODELS))
def test_weights_are_at_most_20_mb(name: str) -> None:
    folder = embedded_model(name).folder
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, size


@pytest.mark.parametrize("name", list(EMBEDDED_MODELS))
def test_samples_reach_card_accuracy(samples: dict, name: str) -> None:
    images, prompts = samples[name]
    model = embedded_model(name)
    assert images.shape == (len(prompts), model.height, model.width, 3)
    assert 0.0 <= images.min() and images.max() <= 1.0
    acc = yardstick.accuracy(images, _digits_of(name, prompts))
    assert acc >= model.accuracy - ACCURACY_MARGIN, f"{name}: {acc:.2f} vs card {model.accuracy:.2f}"


@pytest.mark.parametrize("name", list(EMBEDDED_MODELS))
def test_cfg_facts_match_the_stock_pipeline(pipes: dict[str, object], name: str) -> None:
    """Batched CFG rows come in ``cfg_order``; FLUX's true CFG runs the "" prompt in a second call."""
    pipe, model = pipes[name], embedded_model(name)
    seen: list[dict] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(kwargs)

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generate(pipe, name, model.calibration_prompts[:2], seed=0, num_inference_steps=2, output_type="latent")
    finally:
        handle.remove()
    if model.cfg_mode == "separate":
        assert model.cfg_order is None and len(seen) == 4
        cond, uncond = seen[0]["encoder_hidden_states"], seen[1]["encoder_hidden_states"]
        assert len(seen[0]["hidden_states"]) == len(seen[1]["hidden_states"]) == 2
        assert not torch.equal(cond[0], cond[-1]) and torch.equal(uncond[0], uncond[-1])
        return
    assert len(seen) == 2
    if model.pipeline == "DiTPipeline":
        labels = seen[0]["class_labels"]
        null_second = bool((labels[2:] == 1000).all()) and not bool((labels[:2] == 1000).any())
        assert model.cfg_order == ("cond_uncond" if null_second else "uncond_cond")
    elif seen[0].get("encoder_attention_mask") is not None:
        tokens_per_row = seen[0]["encoder_attention_mask"].sum(dim=1)
        empty_first = bool((tokens_per_row[:2] == 1).all()) and bool((tokens_per_row[2:] > 1).all())
        assert model.cfg_order == ("uncond_cond" if empty_first else "cond_uncond")
    else:  # no mask (SD3): the two "" rows are identical, the two captions are not
        text = seen[0]["encoder_hidden_states"]
        empty_first = torch.equal(text[0], text[1]) and not torch.equal(text[2], text[3])
        assert model.cfg_order == ("uncond_cond" if empty_first else "cond_uncond")


@pytest.mark.parametrize("name", list(EMBEDDED_MODELS))
def test_generation_is_reproducible_per_seed(pipes: dict[str, object], name: str) -> None:
    prompts = embedded_model(name).calibration_prompts[:2]
    a = generate(pipes[name], name, prompts, seed=3, num_inference_steps=4)
    b = generate(pipes[name], name, prompts, seed=3, num_inference_steps=4)
    c = generate(pipes[name], name, prompts, seed=4, num_inference_steps=4)
    assert yardstick.psnr(a, b) == float("inf")
    assert yardstick.psnr(a, c) < 40


def _tokenizers(pipe: object) -> list:
    return [t for t in (getattr(pipe, n, None) for n in ("tokenizer", "tokenizer_2", "tokenizer_3")) if t is not None]


@pytest.mark.parametrize("name", CAPTIONED)
def test_eval_captions_are_held_out_and_one_token_per_word(pipes: dict[str, object], name: str) -> None:
    model = embedded_model(name)
    trained = {c for d in range(10) for c in train_captions(d)}
    heldout = {c for d in range(10) for c in heldout_captions(d)}
    assert set(model.calibration_prompts) <= trained
    assert set(model.eval_prompts) <= heldout and not set(model.eval_prompts) & trained
    prompts, digits = model.calibration_prompts + model.eval_prompts, model.calibration_digits + model.eval_digits
    for text, digit in zip(prompts, digits):
        words = text.replace(",", " ").split()
        assert DIGIT_WORDS[digit] in words or str(digit) in words
    texts = sorted(trained | heldout)  # every caption, so every word in context
    for tok in _tokenizers(pipes[name]):
        specials = len(tok("").input_ids)  # CLIP: bos and eos (its unk); T5: eos
        body = slice(1, -1) if tok.unk_token_id == tok.eos_token_id else slice(None)
        for text, ids in zip(texts, tok(texts).input_ids):
            assert len(ids) - specials == len(text.replace(",", " ,").split()), (type(tok).__name__, text)
            assert tok.unk_token_id not in ids[body], (type(tok).__name__, text)


def test_dit_eval_classes_are_held_out() -> None:
    model = embedded_model("dit-digits")
    assert not set(model.eval_prompts) & set(model.calibration_prompts)
    assert set(model.eval_prompts) | set(model.calibration_prompts) <= set(range(10))


# ---- yardstick ----------------------------------------------------------------------------------


def _ssim_reference(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM of two 2D images by explicit loops over every full window (float64)."""
    ax = np.arange(size) - (size - 1) / 2
    g = np.exp(-(ax**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            a, b = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def _digits_batch() -> tuple[torch.Tensor, np.ndarray]:
    images, labels = yardstick.heldout_digits()
    return images[:16].expand(-1, 3, -1, -1), labels[:16]


def test_identical_images_have_infinite_psnr_and_unit_ssim() -> None:
    x, _ = _digits_batch()
    assert yardstick.psnr(x, x.clone()) == float("inf")
    assert np.isinf(yardstick.psnr(x, x, per_image=True)).all()
    assert yardstick.ssim(x, x.clone()) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_a_constant_offset_is_known() -> None:
    x = torch.full((2, 3, 32, 32), 0.5, dtype=torch.float64)
    assert yardstick.psnr(x, x + 0.1) == pytest.approx(20.0)


def test_more_noise_lowers_psnr_and_ssim() -> None:
    x, _ = _digits_batch()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
    noisy = [(x + s * noise).clamp(0, 1) for s in (0.02, 0.1, 0.3)]
    psnrs = [yardstick.psnr(x, n) for n in noisy]
    ssims = [yardstick.ssim(x, n) for n in noisy]
    assert psnrs[0] > psnrs[1] > psnrs[2]
    assert 1.0 > ssims[0] > ssims[1] > ssims[2]
    assert yardstick.ssim(x, noisy[1]) == pytest.approx(yardstick.ssim(noisy[1], x))


def test_ssim_matches_a_loop_reference() -> None:
    x, _ = _digits_batch()
    g = torch.Generator().manual_seed(1)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    per_image = yardstick.ssim(x[:3, :1], y[:3, :1], per_image=True)
    expected = [_ssim_reference(x[i, 0].numpy(), y[i, 0].numpy()) for i in range(3)]
    np.testing.assert_allclose(per_image, expected, rtol=1e-9)


def test_classifier_is_accurate_on_held_out_real_digits() -> None:
    images, labels = yardstick.heldout_digits()
    assert len(labels) == yardstick.HELDOUT
    assert yardstick.accuracy(images, labels) >= 0.97


def test_classifier_reads_every_pipeline_output_format() -> None:
    x, labels = _digits_batch()
    as_np = x.permute(0, 2, 3, 1).numpy()
    as_pil = [Image.fromarray((im * 255).round().astype(np.uint8)) for im in as_np]
    expected = yardstick.classify(x)
    np.testing.assert_array_equal(yardstick.classify(as_np), expected)
    np.testing.assert_array_equal(yardstick.classify(as_pil), expected)
    assert (expected == labels).mean() >= 0.9


def test_classifier_output_depends_on_the_image() -> None:
    x, labels = _digits_batch()
    assert len(set(yardstick.classify(x).tolist())) >= 5
    assert yardstick.accuracy(x, labels) > yardstick.accuracy(x, (labels + 1) % 10)


def test_accuracy_rejects_mismatched_lengths() -> None:
    x, labels = _digits_batch()
    with pytest.raises(ValueError):
        yardstick.accuracy(x, labels[:-1])

