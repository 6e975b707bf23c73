from __future__ import annotations

import functools

import pytest
import torch

from tests.tiny import (
    tiny_dit_pipeline,
    tiny_dit_transformer,
    tiny_pixart_pipeline,
    tiny_pixart_transformer,
)

@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; a shared machine makes more threads spin
    (modules that want it: ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LATENT = (4, 8, 8)  # channels, height, width: 64 tokens with patch size 1
CAPTION_TOKENS = 5


@functools.cache
def float64_model(kind: str) -> torch.nn.Module:
    build = tiny_pixart_transformer if kind == "pixart" else tiny_dit_transformer
    return build(seed=1).double()


def step_inputs(kind: str, step: int, *, cfg: bool, order: str, prompts: int = 2, dtype=torch.float64) -> dict:
    """Deterministic transformer inputs of one denoising step (a CFG batch if ``cfg``)."""
    g = torch.Generator().manual_seed(1000 + step)
    latents = torch.randn(prompts, *LATENT, generator=g, dtype=dtype)
    rows = 2 * prompts if cfg else prompts
    inputs = {
        "hidden_states": torch.cat([latents, latents]) if cfg else latents,
        "timestep": torch.full((rows,), 900.0 - 200 * step, dtype=dtype),
    }
    if kind == "pixart":
        g_text = torch.Generator().manual_seed(7)
        inputs["encoder_hidden_states"] = torch.randn(rows, CAPTION_TOKENS, 32, generator=g_text, dtype=dtype)
        inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    else:
        labels = torch.tensor([3, 7, 1, 4][:prompts])
        null = torch.full((prompts,), 1000)
        if cfg:
            labels = torch.cat([labels, null]) if order == "cond_uncond" else torch.cat([null, labels])
        inputs["class_labels"] = labels
    return inputs


def run_steps(model: torch.nn.Module, kind: str, steps: int, *, cfg: bool = True, order: str = "uncond_cond") -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**step_inputs(kind, t, cfg=cfg, order=order)).sample for t in range(steps)]


@pytest.fixture(scope="session")
def pixart_pipe():
    return tiny_pixart_pipeline(seed=0)


@pytest.fixture(scope="session")
def dit_pipe():
    return tiny_dit_pipeline(seed=0)


PIXART_CALL = dict(
    height=8, width=8, use_resolution_binning=False, clean_caption=False,
    max_sequence_length=16, output_type="pt",
)


def generate_pixart(pipe, steps: int = 4, seed: int = 0, **kwargs) -> torch.Tensor:
    call = {**PIXART_CALL, **kwargs}
    return pipe(
        ["a photo of a cat", "a red house under the sky"], num_inference_steps=steps,
        guidance_scale=4.5, generator=torch.Generator().manual_seed(seed), **call,
    ).images


def generate_dit(pipe, steps: int = 4, seed: int = 0, guidance: float = 4.0) -> torch.Tensor:
    return torch.from_numpy(
        pipe([1, 2], num_inference_steps=steps, guidance_scale=guidance, output_type="np",
             generator=torch.Generator().manual_seed(seed)).images
    )
