"""Tiny pipelines by family, and calibration runs on them written out plainly."""

from __future__ import annotations

import torch

from planner.build import BuildRequest
from planner.embedded import embedded_model
from planner.registry import embedded_spec
from tests.tiny import tiny_dit_pipeline, tiny_pixart_alpha_pipeline, tiny_pixart_pipeline

PIPELINES = {
    "pixart-sigma": tiny_pixart_pipeline,
    "pixart-alpha": tiny_pixart_alpha_pipeline,
    "dit": tiny_dit_pipeline,
}
CAPTIONS = ("a red cat under the tree", "the big blue house", "a photo of a small dog")
CLASSES = (3, 7, 1)


def request(pipe, **changes) -> BuildRequest:
    """A short calibration run (4 steps, 3 prompts) on a tiny pipeline."""
    inputs = CLASSES if type(pipe).__name__ == "DiTPipeline" else CAPTIONS
    settings = dict(name="tiny", inputs=inputs, delta=0.95, steps=4, guidance=4.5, seed=0)
    settings.update(changes)
    return BuildRequest(**settings)


def fresh_generation(pipe, req: BuildRequest) -> torch.Tensor:
    """The calibration batch generated again, written out independently of the planner."""
    generator = torch.Generator("cpu").manual_seed(req.seed)
    common = dict(num_inference_steps=req.steps, guidance_scale=req.guidance, generator=generator)
    if type(pipe).__name__ == "DiTPipeline":
        return pipe(class_labels=list(req.inputs), output_type="pt", **common).images
    return pipe(
        prompt=list(req.inputs),
        height=8,
        width=8,
        output_type="latent",
        use_resolution_binning=False,
        clean_caption=False,
        **common,
    ).images


def embedded_request(name: str, **changes) -> BuildRequest:
    """A short calibration run (4 steps, 2 prompts) on a shipped model, as the CLI builds it."""
    model = embedded_model(name)
    family = embedded_spec(model).family
    settings = dict(
        name=name,
        inputs=model.calibration_prompts[:2],
        delta=0.9,
        steps=4,
        guidance=model.guidance,
        height=model.height,
        width=model.width,
        call_kwargs=dict(family.call_kwargs),
        family=family,
    )
    settings.update(changes)
    return BuildRequest(**settings)
