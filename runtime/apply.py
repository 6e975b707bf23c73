"""Install a plan on a diffusers transformer or pipeline, and take it off again."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from runtime.adapters import Adapter, adapter_for
from runtime.feedforward import install_feed_forwards, remove_feed_forwards
from runtime.kernels import KERNELS
from runtime.processor import FastAttnProcessor
from runtime.runner import Runner
from runtime.schedule import Schedule
from runtime.state import RunStats
from schemas import Plan, PlanError, cfg_mode_of, config_hash, head_cells
from schemas.plan import FFN_AS_ATTENTION

# How the diffusers pipelines we know run CFG, by class name (no diffusers import): the
# row order of their CFG batch, or ``separate`` for one transformer call per CFG half
# (FLUX's true CFG, conditional call first).
PIPELINE_CFG_ORDER = {
    "PixArtSigmaPipeline": "uncond_cond",
    "PixArtAlphaPipeline": "uncond_cond",
    "DiTPipeline": "cond_uncond",
    "LattePipeline": "uncond_cond",
    "StableDiffusion3Pipeline": "uncond_cond",
    "FluxPipeline": "separate",
}

# The same for a bare transformer, by class name, for the classes whose every diffusers
# pipeline runs CFG one way (PixArt-α, PixArt-Σ, PAG-Σ, DiT, Latte, SD3/3.5, FLUX in
# diffusers 0.42). A pipeline's own entry above wins; a class missing here is checked at
# run time only (DiT's null class labels).
TRANSFORMER_CFG_ORDER = {
    "PixArtTransformer2DModel": "uncond_cond",
    "DiTTransformer2DModel": "cond_uncond",
    "LatteTransformer3DModel": "uncond_cond",
    "SD3Transformer2DModel": "uncond_cond",
    "FluxTransformer2DModel": "separate",
}

# Attribute that marks a transformer holding a live plan; its value is the handle.
APPLIED_ATTR = "_fastattn_handle"


def find_transformer(target: Any) -> torch.nn.Module:
    """The transformer of a pipeline, or ``target`` itself when it is one."""
    model = getattr(target, "transformer", target)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "transformer_blocks"):
        raise TypeError(
            f"target: expected a diffusers DiT pipeline or transformer, got {type(target).__name__}"
        )
    return model


def _block_layers(block: torch.nn.Module) -> list[tuple[Any, str]]:
    """A block's self-attention layers and their kinds, in the order the block runs them:
    ``attn1`` (PixArt, DiT, Latte; their ``attn2`` is cross-attention), else the joint
    ``attn`` (SD3, FLUX) and the MMDiT-X image-only ``attn2`` (SD3.5) when there is one."""
    if hasattr(block, "attn1"):
        return [(block.attn1, "spatial")]
    layers = [(block.attn, "joint")]
    if getattr(block, "attn2", None) is not None:
        layers.append((block.attn2, "spatial"))
    return layers


def _layers(model: torch.nn.Module) -> list[tuple[Any, str]]:
    temporal = getattr(model, "temporal_transformer_blocks", None)
    if temporal is not None:
        return [
            entry
            for pair in zip(model.transformer_blocks, temporal)
            for entry in ((pair[0].attn1, "spatial"), (pair[1].attn1, "temporal"))
        ]
    blocks = list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", ()))
    return [entry for block in blocks for entry in _block_layers(block)]


def self_attention_layers(model: torch.nn.Module) -> list[Any]:
    """The self-attention modules of ``model``, in the order the model runs them.

    ``attn1`` of each block; video DiTs with ``temporal_transformer_blocks`` (Latte)
    alternate: spatial block ``i``, then temporal block ``i``. MMDiTs: each block's joint
    ``attn`` then its ``attn2`` if any (SD3.5), FLUX's double-stream blocks then its
    single-stream ones.
    """
    return [attn for attn, _ in _layers(model)]


def layer_kinds(model: torch.nn.Module) -> list[str]:
    """``spatial``, ``temporal`` or ``joint`` for each entry of ``self_attention_layers``."""
    return [kind for _, kind in _layers(model)]


def _check_model(plan: Plan, model: torch.nn.Module, layers: list[Any], strict: bool) -> list[Adapter]:
    """The plan against the model; the layers' adapters."""
    info = plan.model
    if len(layers) != info.num_layers:
        raise PlanError(f"$.model.num_layers: plan has {info.num_layers}, model has {len(layers)}")
    for i, attn in enumerate(layers):
        if attn.heads != info.num_heads:
            raise PlanError(f"$.model.num_heads: plan has {info.num_heads}, layer {i} has {attn.heads}")
        head_dim = attn.to_q.out_features // attn.heads
        if head_dim != info.head_dim:
            raise PlanError(f"$.model.head_dim: plan has {info.head_dim}, layer {i} has {head_dim}")
    adapters = [adapter_for(attn, i) for i, attn in enumerate(layers)]
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
    return adapters


def _check_cfg_order(plan: Plan, target: Any, model: torch.nn.Module) -> None:
    """The plan's CFG mode and order against the pipeline's class, else the transformer's class."""
    mode = cfg_mode_of(plan.sampling)
    if mode == "none":
        return
    name = type(target).__name__
    expected = PIPELINE_CFG_ORDER.get(name) if target is not model else None
    if expected is None:
        name = type(model).__name__
        expected = TRANSFORMER_CFG_ORDER.get(name)
    if expected is None:
        return
    if (expected == "separate") != (mode == "separate"):
        runs = "in separate calls ('separate')" if expected == "separate" else f"batched ({expected!r})"
        raise PlanError(f"$.sampling.cfg_mode: plan says {mode!r}, {name} runs CFG {runs}")
    if mode == "batched" and expected != plan.sampling.cfg_order:
        raise PlanError(
            f"$.sampling.cfg_order: plan says {plan.sampling.cfg_order!r}, {name} batches {expected!r}"
        )


class FastAttnHandle:
    """A plan installed on a model. Remove it with ``remove()`` or by leaving a ``with`` block.

    Generations: one transformer forward is one denoising step. On a pipeline the
    count restarts whenever the pipeline sets its scheduler's timesteps (each call).
    On a bare transformer, call ``reset()`` before each new generation; a forward that
    raised also ends its generation, so the next forward is step 0 again.

    One live handle per transformer: the transformer carries it as ``APPLIED_ATTR``
    until ``remove()``.
    """

    def __init__(
        self,
        plan: Plan,
        target: Any,
        *,
        kernel: str = "auto",
        strict: bool = True,
        compile: bool | dict[str, Any] = False,
        merged_refresh: bool = False,
    ):
        if not isinstance(plan, Plan):
            raise TypeError(
                f"plan: expected a Plan (use runtime.load_plan(path) first), got {type(plan).__name__}"
            )
        if kernel not in KERNELS:
            raise ValueError(f"kernel: unknown kernel {kernel!r}; choose from {KERNELS}")
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile: expected a bool or a dict of torch.compile options, got {type(compile).__name__}")
        self.plan = plan
        self.transformer = model = find_transformer(target)
        if vars(model).get(APPLIED_ATTR) is not None:
            raise RuntimeError(
                "target: a plan is already applied to this transformer; remove its handle first"
            )
        layers = self_attention_layers(model)
        adapters = _check_model(plan, model, layers, strict)
        _check_cfg_order(plan, target, model)
        config = getattr(model, "config", {}) or {}
        self.runner = Runner(
            Schedule([list(row) for row in plan.methods], heads=head_cells(plan)),
            window=plan.window,
            cfg=plan.sampling.cfg,
            cfg_order=plan.sampling.cfg_order,
            num_tokens=plan.tokens.num_tokens,
            kernel=kernel,
            null_class=config.get("num_embeds_ada_norm") if "class_labels" in _forward_args(model) else None,
            layers=list(plan.layers) if plan.layers else None,
            cfg_mode=cfg_mode_of(plan.sampling),
            adapters=adapters,
            merged_refresh=merged_refresh,
            ffn_schedule=Schedule([[FFN_AS_ATTENTION[m] for m in row] for row in plan.ffn]) if plan.ffn else None,
        )
        self._scheduler = getattr(target, "scheduler", None) if target is not model else None
        self._timesteps_hook: TimestepsHook | None = None
        self._compiled: CompiledBlocks | None = None
        self._installed: Installed | None = install(self.runner, model, layers)
        self._feed_forwards: list[tuple[torch.nn.Module, Any]] = []
        try:
            if plan.ffn:
                self._feed_forwards = install_feed_forwards(self.runner, model, len(plan.ffn[0]))
            if self._scheduler is not None and hasattr(self._scheduler, "set_timesteps"):
                self._timesteps_hook = TimestepsHook.add(self._scheduler, self._timesteps_set)
            if compile is not False:
                options = compile if isinstance(compile, dict) else {}
                self._compiled = CompiledBlocks(model, options, graphs=expected_graphs(self.runner, model))
        except BaseException:
            self.remove()
            raise
        setattr(model, APPLIED_ATTR, self)

    # -- lifecycle ---------------------------------------------------------
    def remove(self) -> None:
        """Restore the original processors and hooks and unmark the transformer; idempotent."""
        if self._installed is None:
            return
        if self._compiled is not None:
            self._compiled.remove()
            self._compiled = None
        self._installed.remove()
        self._installed = None
        remove_feed_forwards(self._feed_forwards)
        self._feed_forwards = []
        if self._timesteps_hook is not None:
            self._timesteps_hook.discard(self._timesteps_set)
            self._timesteps_hook = None
        if vars(self.transformer).get(APPLIED_ATTR) is self:
            delattr(self.transformer, APPLIED_ATTR)
        self.runner.unbind()
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

    def _timesteps_set(self) -> None:
        """A new generation: step 0, and the pipeline's step count must be the plan's."""
        self.runner.state.reset()
        steps = self.plan.sampling.num_steps
        count = len(getattr(self._scheduler, "timesteps", ()))
        if count and count != steps:
            raise PlanError(f"$.sampling.num_steps: plan has {steps} steps, the pipeline runs {count}")


class TimestepsHook:
    """Stands in for a scheduler's ``set_timesteps``; calls each handle's callback after it.

    One per scheduler, shared by every handle on pipelines that share the scheduler;
    the last ``discard`` puts back what was there, whatever order the handles go in.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.previous = vars(scheduler).get("set_timesteps")  # an instance attribute, or None
        self.original = scheduler.set_timesteps
        self.callbacks: list[Callable[[], None]] = []
        functools.update_wrapper(self, self.original)  # inspect.signature sees the original's
        scheduler.set_timesteps = self

    @classmethod
    def add(cls, scheduler: Any, callback: Callable[[], None]) -> TimestepsHook:
        hook = vars(scheduler).get("set_timesteps")
        if not isinstance(hook, cls):
            hook = cls(scheduler)
        hook.callbacks.append(callback)
        return hook

    def discard(self, callback: Callable[[], None]) -> None:
        self.callbacks.remove(callback)
        if self.callbacks or vars(self.scheduler).get("set_timesteps") is not self:
            return
        if self.previous is None:
            del self.scheduler.set_timesteps
        else:
            self.scheduler.set_timesteps = self.previous

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.original(*args, **kwargs)
        errors = []
        for callback in list(self.callbacks):  # every handle restarts, even if one refuses
            try:
                callback()
            except PlanError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        return result


class Installed:
    """Processors and hooks put on one transformer, with what they replaced."""

    def __init__(self, layers: list[Any], originals: list[Any], hooks: list[Any]) -> None:
        self.layers, self.originals, self.hooks = layers, originals, hooks

    def remove(self) -> None:
        for attn, original in zip(self.layers, self.originals):
            attn.set_processor(original)
        for hook in self.hooks:
            hook.remove()


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks regional compilation compiles: the modules whose class the model lists in
    diffusers' ``_repeated_blocks``, else ``transformer_blocks`` (and ``temporal_transformer_blocks``)."""
    names = getattr(model, "_repeated_blocks", None)
    if names:
        return [m for m in model.modules() if type(m).__name__ in names]
    temporal = getattr(model, "temporal_transformer_blocks", None)
    return list(model.transformer_blocks) + (list(temporal) if temporal is not None else [])


def expected_graphs(runner: Runner, model: torch.nn.Module) -> int:
    """Graphs a compiled block class needs at most for the plan: one per distinct layer-step
    (``Schedule.variants``), window and layer kind (spatial and temporal blocks share a class),
    for each self-attention layer of a block (SD3.5's two) and each call of a step (separate CFG)."""
    layers = len(runner.schedule.methods[0])
    windows = len({id(runner.window_kernel(i)) for i in range(layers)})
    temporal = getattr(model, "temporal_transformer_blocks", None) is not None
    kinds = 2 if temporal else 1
    per_block = 1 if temporal else max(len(_block_layers(b)) for b in model.transformer_blocks)
    calls = 2 if runner.cfg_mode == "separate" else 1
    return (len(runner.schedule.variants()) * windows) ** per_block * kinds * calls


class CompiledBlocks:
    """``torch.compile`` of each repeated block of ``model`` (regional compilation), undone by ``remove``.

    Uses diffusers' ``compile_repeated_blocks`` where the model declares ``_repeated_blocks``,
    else ``Module.compile`` on each block of ``repeated_blocks``. The options default to
    ``dynamic=False`` (every layer-step has the same shapes) and a recompile limit of twice
    ``graphs`` (the graphs a block class is expected to need), so that no variant falls back
    to eager. A pre-forward hook makes each block's ``hidden_states`` contiguous: the first
    block's input is a transposed view, and a stride guard would otherwise compile every
    variant twice.
    """

    def __init__(self, model: torch.nn.Module, options: dict[str, Any], graphs: int = 1) -> None:
        self.blocks = repeated_blocks(model)
        self.previous = [vars(block).get("_compiled_call_impl") for block in self.blocks]
        limit = max(torch._dynamo.config.recompile_limit, 2 * graphs)
        if "recompile_limit" in inspect.signature(torch.compile).parameters:
            options = {"dynamic": False, "recompile_limit": limit, **options}
        else:  # older torch: only the global limit, raised for these blocks' variants
            torch._dynamo.config.recompile_limit = limit
            options = {"dynamic": False, **options}
        self.hooks: list[Any] = []
        try:
            if getattr(model, "_repeated_blocks", None):
                model.compile_repeated_blocks(**options)
            else:
                for block in self.blocks:
                    block.compile(**options)
            self.hooks = [b.register_forward_pre_hook(_contiguous_input, with_kwargs=True) for b in self.blocks]
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Put back each block's own (uncompiled, or the user's compiled) call."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        for block, previous in zip(self.blocks, self.previous):
            if previous is None:
                vars(block).pop("_compiled_call_impl", None)
            else:
                block._compiled_call_impl = previous


@torch.compiler.disable
def _contiguous_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if args and torch.is_tensor(args[0]) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:]), kwargs
    hidden = kwargs.get("hidden_states")
    if torch.is_tensor(hidden) and not hidden.is_contiguous():
        return args, {**kwargs, "hidden_states": hidden.contiguous()}
    return None


def install(runner: Runner, model: torch.nn.Module, layers: list[Any]) -> Installed:
    """Put one ``FastAttnProcessor`` on each self-attention layer (with the runner's adapter
    of its family) and the step hooks on ``model``."""
    originals = [attn.processor for attn in layers]
    adapters = runner.adapters or [adapter_for(attn, i) for i, attn in enumerate(layers)]
    processors = [FastAttnProcessor(runner, i, adapter) for i, adapter in enumerate(adapters)]
    try:
        for attn, processor in zip(layers, processors):
            attn.set_processor(processor)
    except BaseException:
        Installed(layers, originals, []).remove()
        raise
    runner.processors = processors

    @torch.compiler.disable
    def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        runner.before_forward(hidden, kwargs.get("class_labels"), kwargs.get("timestep"))

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


def apply(
    plan: Plan,
    target: Any,
    *,
    kernel: str = "auto",
    strict: bool = True,
    compile: bool | dict[str, Any] = False,
    merged_refresh: bool = False,
) -> FastAttnHandle:
    """Execute ``plan`` on a diffusers pipeline (its ``.transformer``) or a transformer.

    Checks the plan against the model first (layers and their kinds, heads, head dim,
    model class and config when ``strict``, CFG mode and batch order by pipeline class,
    else transformer class) and on the first step (tokens, text tokens, CFG and batch
    order); every mismatch raises ``PlanError`` naming the plan field. With CFG in
    separate calls (FLUX's true CFG) a step is two calls with the same timestep,
    conditional first; a step of one call or three is a ``PlanError``. ``kernel`` picks the window kernel (``auto``,
    ``chunked``, ``dense``).

    ``plan`` must be a ``Plan`` (``TypeError`` otherwise: use ``load_plan`` first). A
    transformer runs one plan at a time: while a handle is live, applying another raises
    ``RuntimeError`` ("target: a plan is already applied to this transformer; remove its
    handle first"). ``remove()`` puts back the original processor objects, hooks and the
    scheduler's ``set_timesteps``; a refused ``apply`` leaves the model untouched.

    ``compile=True`` (or a dict of ``torch.compile`` options) compiles the transformer's
    repeated blocks with the plan inside them (``CompiledBlocks``); ``remove()`` puts back
    the uncompiled blocks. Compiling the model yourself after ``apply`` works too.

    ``merged_refresh=True`` runs each residual refresh on the CPU as one merged pass
    (``runtime/merge.py``: about one full attention instead of full + window); its full
    output equals the plain one up to float rounding, not bit for bit, so the generation is
    no longer bit-identical to the calibration trajectory.
    """
    return FastAttnHandle(
        plan, target, kernel=kernel, strict=strict, compile=compile, merged_refresh=merged_refresh
    )
