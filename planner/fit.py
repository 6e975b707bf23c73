"""Whether a plan fits a model: every check that ``runtime.apply`` and ``planner eval`` make.

``planner validate --model`` runs them on the model's configs alone (no weights), and
``planner eval`` on the loaded pipeline, so a plan that validates against a model runs
on it.
"""

from __future__ import annotations

from typing import Any

import runtime
from planner.build import geometry
from planner.errors import PlannerError, bad_input
from planner.registry import ModelSpec
from schemas import Plan, PlanError

EVAL_SEED_OFFSET = 1000  # the first evaluation seed is the calibration seed + this
MIN_TORCH_SEED, MAX_TORCH_SEED = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


def check_model_fit(
    plan: Plan, spec: ModelSpec, transformer: Any, vae_scale: int, scheduler_config: dict[str, Any]
) -> None:
    """Raise ``PlanError`` naming the plan field that does not fit ``spec``'s model.

    ``transformer`` may be a skeleton on the meta device; ``vae_scale`` is the VAE's
    pixels per latent; ``scheduler_config`` the model's scheduler configuration.
    """
    import diffusers

    runtime.apply(plan, transformer).remove()  # layers, heads, head dim, kinds, class, config
    sampling = plan.sampling
    if sampling.cfg and sampling.cfg_order != spec.family.cfg_order:
        raise PlanError(
            f"$.sampling.cfg_order: plan says {sampling.cfg_order!r}, "
            f"{spec.family.pipeline} batches {spec.family.cfg_order!r}"
        )
    guidance = sampling.guidance_scale if sampling.guidance_scale is not None else spec.guidance
    if sampling.cfg != spec.family.runs_cfg(guidance):
        raise PlanError(
            f"$.sampling.cfg: plan says {str(sampling.cfg).lower()}, but guidance {guidance} "
            f"{'turns CFG on' if sampling.cfg is False else 'runs without CFG'} in {spec.family.pipeline}"
        )
    scheduler = getattr(diffusers, sampling.scheduler, None)
    if scheduler is None or not hasattr(scheduler, "from_config"):
        raise PlanError(f"$.sampling.scheduler: unknown diffusers scheduler {sampling.scheduler!r}")
    timesteps = scheduler_config.get("num_train_timesteps")
    if timesteps is not None and sampling.num_steps > timesteps:
        raise PlanError(
            f"$.sampling.num_steps: {sampling.num_steps} exceeds the model's {timesteps} training timesteps"
        )
    tokens = plan.tokens
    if tokens.height is not None and tokens.width is not None:
        try:
            expected, _, _ = geometry(spec.family, transformer, vae_scale, tokens.height, tokens.width)
        except PlannerError as exc:  # a size the model cannot generate
            raise PlanError(f"$.tokens.height: {exc}") from None
        if expected != tokens.num_tokens:
            raise PlanError(
                f"$.tokens.num_tokens: plan has {tokens.num_tokens}, the model makes {expected} "
                f"at {tokens.height}x{tokens.width}"
            )
    seed = plan.calibration.seed if plan.calibration is not None else 0
    if seed + EVAL_SEED_OFFSET > MAX_TORCH_SEED:
        raise PlanError(f"$.calibration.seed: {seed} leaves no evaluation seeds below 2**64")


def check_eval_seeds(first: int, count: int) -> None:
    """Refuse evaluation seeds that torch cannot take."""
    if first < MIN_TORCH_SEED or first + count - 1 > MAX_TORCH_SEED:
        raise bad_input(f"seed: evaluation seeds {first}…{first + count - 1} are outside -2**63…2**64-1")
