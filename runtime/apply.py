"""Install a plan on a diffusers transformer or pipeline, and take it off again."""

from __future__ import annotations

import functools
from typing import Any

import torch

from runtime.kernels import KERNELS
from runtime.processor import FastAttnProcessor
from runtime.runner import Runner
from runtime.schedule import Schedule
from runtime.state import RunStats
from schemas import Plan, PlanError, config_hash

# CFG batch order of the diffusers pipelines we know, by class name (no diffusers import).
PIPELINE_CFG_ORDER = {
    "PixArtSigmaPipeline": "uncond_cond",
    "PixArtAlphaPipeline": "uncond_cond",
    "DiTPipeline": "cond_uncond",
    "LattePipeline": "uncond_cond",
}


def find_transformer(target: Any) -> torch.nn.Module:
    """The transformer of a pipeline, or ``target`` itself when it is one."""
    model = getattr(target, "transformer", target)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "transformer_blocks"):
        raise TypeError(
            f"target: expected a diffusers DiT pipeline or transformer, got {type(target).__name__}"
        )
    return model


def self_attention_layers(model: torch.nn.Module) -> list[Any]:
    """``attn1`` of each transformer block, in the order the model runs them.

    Video DiTs with ``temporal_transformer_blocks`` (Latte) alternate: spatial block
    ``i``, then temporal block ``i``.
    """
    spatial = [block.attn1 for block in model.transformer_blocks]
    temporal = getattr(model, "temporal_transformer_blocks", None)
    if temporal is None:
        return spatial
    return [attn for pair in zip(spatial, (b.attn1 for b in temporal)) for attn in pair]


def layer_kinds(model: torch.nn.Module) -> list[str]:
    """``spatial`` or ``temporal`` for each entry of ``self_attention_layers``."""
    count = len(model.transformer_blocks)
    if getattr(model, "temporal_transformer_blocks", None) is None:
        return ["spatial"] * count
    return ["spatial", "temporal"] * count


def _check_model(plan: Plan, model: torch.nn.Module, layers: list[Any], strict: bool) -> None:
    info = plan.model
    if len(layers) != info.num_layers:
        raise PlanError(f"$.model.num_layers: plan has {info.num_layers}, model has {len(layers)}")
    for i, attn in enumerate(layers):
        if attn.heads != info.num_heads:
            raise PlanError(f"$.model.num_heads: plan has {info.num_heads}, layer {i} has {attn.heads}")
        head_dim = attn.to_q.out_features // attn.heads
        if head_dim != info.head_dim:
            raise PlanError(f"$.model.head_dim: plan has {info.head_dim}, layer {i} has {head_dim}")
        if attn.is_cross_attention or attn.residual_connection or attn.spatial_norm is not None:
            raise PlanError(f"layer {i}: attn1 is not a plain self-attention module")
        if attn.group_norm is not None:
            raise PlanError(f"layer {i}: attn1 with group norm is not supported")
    kinds = layer_kinds(model)
    planned = [layer.kind for layer in plan.layers] if plan.layers else ["spatial"] * len(layers)
    for i, (want, have) in enumerate(zip(planned, kinds)):
        if want != have:
            field = f"$.layers[{i}].kind" if plan.layers else "$.layers"
            raise PlanError(f"{field}: plan has a {want} layer {i}, the model's layer {i} is {have}")
    if strict:
        name = type(model).__name__
        if name != info.class_name:
            raise PlanError(f"$.model.class_name: plan is for {info.class_name}, model is {name}")
        config = getattr(model, "config", None)
        if config is not None and config_hash(dict(config)) != info.config_hash:
            raise PlanError(
                f"$.model.config_hash: plan was calibrated for another {name} configuration "
                "(pass strict=False to run it anyway)"
            )


class FastAttnHandle:
    """A plan installed on a model. Remove it with ``remove()`` or by leaving a ``with`` block.

    Generations: one transformer forward is one denoising step. On a pipeline the
    count restarts whenever the pipeline sets its scheduler's timesteps (each call).
    On a bare transformer, call ``reset()`` before each new generation; a forward that
    raised also ends its generation, so the next forward is step 0 again.
    """

    def __init__(self, plan: Plan, target: Any, *, kernel: str = "auto", strict: bool = True):
        if kernel not in KERNELS:
            raise ValueError(f"kernel: unknown kernel {kernel!r}; choose from {KERNELS}")
        self.plan = plan
        self.transformer = model = find_transformer(target)
        layers = self_attention_layers(model)
        _check_model(plan, model, layers, strict)
        expected = PIPELINE_CFG_ORDER.get(type(target).__name__)
        if plan.sampling.cfg and expected and expected != plan.sampling.cfg_order:
            raise PlanError(
                f"$.sampling.cfg_order: plan says {plan.sampling.cfg_order!r}, "
                f"{type(target).__name__} batches {expected!r}"
            )
        config = getattr(model, "config", {}) or {}
        self.runner = Runner(
            Schedule([list(row) for row in plan.methods]),
            window=plan.window,
            cfg=plan.sampling.cfg,
            cfg_order=plan.sampling.cfg_order,
            num_tokens=plan.tokens.num_tokens,
            kernel=kernel,
            null_class=config.get("num_embeds_ada_norm") if "class_labels" in _forward_args(model) else None,
            layers=list(plan.layers) if plan.layers else None,
        )
        self._scheduler = getattr(target, "scheduler", None) if target is not model else None
        self._installed = install(self.runner, model, layers)
        self._hook_scheduler()

    # -- lifecycle ---------------------------------------------------------
    def remove(self) -> None:
        """Restore the original processors and hooks; idempotent."""
        if self._installed is None:
            return
        self._installed.remove()
        self._installed = None
        if self._scheduler is not None and "set_timesteps" in vars(self._scheduler):
            del self._scheduler.set_timesteps
        self.runner.state.reset()

    def __enter__(self) -> FastAttnHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def reset(self, *, stats: bool = False) -> None:
        """Start a new generation at step 0 (and clear the statistics if ``stats``)."""
        self.runner.state.reset()
        if stats:
            self.runner.state.stats = RunStats()

    def stats(self) -> RunStats:
        """What ran since the plan was applied: per-method counts, FLOPs, peak cache bytes."""
        return self.runner.state.stats

    @property
    def step(self) -> int:
        """The next denoising step of the current generation."""
        return self.runner.state.step

    def _hook_scheduler(self) -> None:
        scheduler = self._scheduler
        if scheduler is None or not hasattr(scheduler, "set_timesteps"):
            return
        original = scheduler.set_timesteps
        runner, steps = self.runner, self.plan.sampling.num_steps

        @functools.wraps(original)
        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            runner.state.reset()
            count = len(getattr(scheduler, "timesteps", ()))
            if count and count != steps:
                raise PlanError(
                    f"$.sampling.num_steps: plan has {steps} steps, the pipeline runs {count}"
                )
            return result

        scheduler.set_timesteps = set_timesteps


class Installed:
    """Processors and hooks put on one transformer, with what they replaced."""

    def __init__(self, layers: list[Any], originals: list[Any], hooks: list[Any]) -> None:
        self.layers, self.originals, self.hooks = layers, originals, hooks

    def remove(self) -> None:
        for attn, original in zip(self.layers, self.originals):
            attn.set_processor(original)
        for hook in self.hooks:
            hook.remove()


def install(runner: Runner, model: torch.nn.Module, layers: list[Any]) -> Installed:
    """Put one ``FastAttnProcessor`` on each self-attention layer and the step hooks on ``model``."""
    originals = [attn.processor for attn in layers]
    for i, attn in enumerate(layers):
        attn.set_processor(FastAttnProcessor(runner, i))

    @torch.compiler.disable
    def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        runner.before_forward(hidden, kwargs.get("class_labels"))

    @torch.compiler.disable
    def post(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        runner.after_forward()

    hooks = [
        model.register_forward_pre_hook(pre, with_kwargs=True),
        model.register_forward_hook(post, with_kwargs=True),
    ]
    return Installed(layers, originals, hooks)


def _forward_args(model: torch.nn.Module) -> tuple[str, ...]:
    code = type(model).forward.__code__
    return code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


def apply(plan: Plan, target: Any, *, kernel: str = "auto", strict: bool = True) -> FastAttnHandle:
    """Execute ``plan`` on a diffusers pipeline (its ``.transformer``) or a transformer.

    Checks the plan against the model first (layers, heads, head dim, model class and
    config when ``strict``) and on the first step (tokens, CFG and batch order);
    every mismatch raises ``PlanError`` naming the plan field. ``kernel`` picks the
    window kernel (``auto``, ``chunked``, ``dense``).
    """
    return FastAttnHandle(plan, target, kernel=kernel, strict=strict)
