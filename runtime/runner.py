"""The per-model executor shared by all processors: step counting, caches, CFG rows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from runtime.adapters import Adapter, Outputs, map_outputs
from runtime.arrow import bind_arrow
from runtime.merge import RefreshKernel, bind_refresh
from runtime.recording import Recorder
from runtime.schedule import COMPUTES_FULL, Schedule
from runtime.state import GenerationState, LayerCache
from runtime.windows import BoundKernel, bind_window
from schemas import Layer, PlanError, WindowShape
from schemas.plan import FFN_AS_ATTENTION, REUSES_OUTPUT

FFN_FROM_ATTENTION = {v: k for k, v in FFN_AS_ATTENTION.items()}

if TYPE_CHECKING:
    from runtime.processor import FastAttnProcessor


@dataclass(frozen=True)
class LayerStep:
    """What one layer does at one step, resolved eagerly by ``Runner.layer_step``.

    Compiled code reads ``method``, ``refresh``, ``keep``, ``writes``, ``num_tokens``,
    ``text_tokens``, ``second`` and whether ``recorder`` is set as guards, ``cache``'s
    (and ``partner``'s) tensors as graph inputs, and calls ``window``, the layer's kernel
    (``Runner.window_kernel``: one object for all layers with the same window): none of
    them names the layer, so layers that do the same thing share a graph. ``step`` and
    ``layer`` only go into error messages.

    ``second``: with CFG in separate calls, this is the step's unconditional call, whose
    ``asc``/``wars_asc`` return the conditional call's output kept in ``partner`` (that
    call's ``LayerCache`` of the layer).
    """

    method: str
    refresh: bool  # a full/asc step that stores R = full - window
    keep: bool  # a computed step whose output a later ast reads
    writes: bool  # False during trials: read the caches, write none
    cache: LayerCache
    window: BoundKernel
    merged_refresh: RefreshKernel | None  # full and window in one pass (runtime/merge.py), where it applies
    num_tokens: int | None  # what the plan expects, checked at every call
    text_tokens: int  # text tokens of a joint layer's sequence, per the plan
    second: bool
    partner: LayerCache | None
    recorder: Recorder | None
    step: int
    layer: int
    coefficient: torch.Tensor | None = None  # forecast: (τ_t − τ_a) / (τ_a − τ_b), a 0-dim float64
    heads: tuple[tuple[int, ...], ...] | None = None  # a per-head cell's (full, wars, ast) heads
    keep_heads: bool = False  # a computed step whose per-head output a later cell's ast heads read


class Runner:
    """Executes a ``Schedule`` on one transformer: the single executor of every method.

    One transformer forward is one denoising step, or, with ``cfg_mode`` ``separate``,
    one of its two calls (conditional first, then unconditional, with the same timestep).
    During a trial (``trying``) the processors read the caches but write none and the step
    does not advance. With a ``recorder`` set, every ``full`` layer-step that writes is
    also measured by it. ``adapters`` are the layers' processor families (default: plain
    self-attention), whose joint layers' windows run as arrows.
    """

    def __init__(
        self,
        schedule: Schedule,
        *,
        window: WindowShape,
        cfg: bool,
        cfg_order: str | None,
        num_tokens: int | None = None,
        kernel: str = "auto",
        null_class: int | None = None,
        layers: list[Layer] | None = None,
        cfg_mode: str | None = None,
        adapters: list[Adapter] | None = None,
        merged_refresh: bool = False,
        ffn_schedule: Schedule | None = None,
    ) -> None:
        self.schedule = schedule
        self.ffn_schedule = ffn_schedule  # over $.ffn read as full/ast/forecast (runtime/feedforward.py)
        self.window = window
        self.cfg = cfg
        self.cfg_order = cfg_order
        self.cfg_mode = cfg_mode or ("batched" if cfg else "none")
        self.adapters = adapters
        self.num_tokens = num_tokens
        self.layers = layers
        self.null_class = null_class
        self.state = GenerationState()
        self.timesteps: dict[int, Any] = {}  # step -> the ``timestep`` its forward got, as given
        self._times: dict[int, float] = {}  # step -> that timestep as a number, once read
        self.trial = False
        self.overrides: dict[int, str] = {}
        self.ffn_overrides: dict[int, str] = {}
        self.recorder: Recorder | None = None  # recording mode (runtime/recording.py)
        self.processors: list[FastAttnProcessor] = []  # installed, in layer order
        self._kernel_name = kernel
        self._window_kernels = self._bind_windows(kernel)  # per layer, resolved once
        self._refresh_kernels = (
            self._bind_refreshes(kernel) if merged_refresh else [None] * len(self._window_kernels)
        )

    # -- what to run -------------------------------------------------------
    def method(self, layer: int) -> str:
        if layer in self.overrides:
            return self.overrides[layer]
        return self.schedule.method(self.state.step, layer)

    def layer_step(self, layer: int) -> LayerStep:
        """What ``layer`` does at the current step (with this trial's overrides)."""
        state, schedule = self.state, self.schedule
        step = state.step
        second = self.cfg_mode == "separate" and state.call == 1
        method = self.method(layer)
        cache = state.cache(layer)
        return LayerStep(
            method=method,
            refresh=schedule.refreshes_residual(step, layer),
            keep=schedule.keeps_output(step, layer),
            writes=not self.trial,
            cache=cache,
            window=self.window_kernel(layer),
            merged_refresh=self._refresh_kernels[layer],
            num_tokens=self.layers[layer].num_tokens if self.layers else self.num_tokens,
            text_tokens=self.text_tokens(layer),
            second=second,
            partner=state.cache(layer, 0) if second else None,
            recorder=None if self.trial else self.recorder,
            step=step,
            layer=layer,
            coefficient=self.forecast_coefficient(step, cache) if method == "forecast" else None,
            heads=None if layer in self.overrides else schedule.head_groups(step, layer),
            keep_heads=schedule.keeps_head_output(step, layer),
        )

    def forecast_coefficient(self, step: int, cache: LayerCache) -> torch.Tensor | None:
        """``(τ_t − τ_a) / (τ_a − τ_b)`` for a ``forecast`` at ``step`` from the outputs of steps
        ``a`` (``cache.output_step``) and ``b`` (``cache.previous_step``), ``τ`` their timesteps;
        0 (a copy) where the two timesteps are equal. ``None`` without two kept outputs."""
        return None if cache.previous is None else self.coefficient(step, cache.output_step, cache.previous_step)

    def coefficient(self, step: int, a: int, b: int) -> torch.Tensor | None:
        """``(τ_t − τ_a) / (τ_a − τ_b)`` from the timesteps the forwards of steps ``t``, ``a``, ``b``
        got, as a 0-dim float64 tensor (0 where ``τ_a = τ_b``); ``None`` if one was not seen. The
        timesteps are read here, not at each forward, so a plan without forecasts never waits
        for the device to hand one over."""
        if not {step, a, b} <= self.timesteps.keys():
            return None
        t, ta, tb = (self._time(s) for s in (step, a, b))
        value = (t - ta) / (ta - tb) if ta != tb else 0.0
        return torch.tensor(value, dtype=torch.float64)

    def _time(self, step: int) -> float:
        """Step ``step``'s timestep as a number, read once per forward."""
        if step not in self._times:
            self._times[step] = _time_value(self.timesteps[step], step)
        return self._times[step]

    def ffn_method(self, layer: int) -> str:
        """Feed-forward layer ``layer``'s method at the current step (with this trial's overrides)."""
        if layer in self.ffn_overrides:
            return self.ffn_overrides[layer]
        return FFN_FROM_ATTENTION[self.ffn_schedule.method(self.state.step, layer)]

    @contextmanager
    def trying(self, overrides: dict[int, str], ffn: dict[int, str] | None = None) -> Iterator[None]:
        """Run forwards with ``overrides`` (and feed-forward ``ffn`` overrides) at the current
        step, writing no cache."""
        self.trial, self.overrides, self.ffn_overrides = True, dict(overrides), dict(ffn or {})
        try:
            yield
        finally:
            self.trial, self.overrides, self.ffn_overrides = False, {}, {}

    def text_tokens(self, layer: int) -> int:
        """Text tokens in ``layer``'s attention sequence (0 but for joint layers)."""
        return self.layers[layer].text_tokens if self.layers else 0

    def window_of(self, layer: int) -> WindowShape:
        """The window of ``layer``: a band half-width in its own tokens, or a tiled shape."""
        return self.layers[layer].window if self.layers else self.window

    def _bind_windows(self, kernel: str) -> list[BoundKernel]:
        """Each layer's window kernel (``runtime/windows.py``; an arrow, ``runtime/arrow.py``,
        on joint layers), shared by layers with equal windows; a tiled window that does not
        fit its layer is a ``PlanError`` here."""
        count = len(self.layers) if self.layers else len(self.schedule.methods[0])
        bound: dict[tuple[WindowShape, int | None, int, bool], BoundKernel] = {}
        kernels = []
        for layer in range(count):
            window, text = self.window_of(layer), self.text_tokens(layer)
            tokens = self.layers[layer].num_tokens if self.layers else self.num_tokens
            text_first = bool(self.adapters) and self.adapters[layer].text_first
            key = (window, tokens, text, text_first)
            if key not in bound:
                field = f"$.layers[{layer}].window" if self.layers else "$.window"
                bound[key] = (
                    bind_arrow(window, tokens, text, text_first, kernel, field)
                    if text
                    else bind_window(window, tokens, kernel, field)
                )
            kernels.append(bound[key])
        return kernels

    def _bind_refreshes(self, kernel: str) -> list[RefreshKernel | None]:
        """Each layer's merged refresh (``runtime/merge.py``): the full output and the window's
        in about one full attention; ``None`` for joint layers (arrows) and the ``dense`` kernel."""
        count = len(self._window_kernels)
        if kernel == "dense":
            return [None] * count
        bound: dict[tuple[WindowShape, int | None], RefreshKernel] = {}
        kernels: list[RefreshKernel | None] = []
        for layer in range(count):
            if self.text_tokens(layer):
                kernels.append(None)
                continue
            window = self.window_of(layer)
            tokens = self.layers[layer].num_tokens if self.layers else self.num_tokens
            if (window, tokens) not in bound:
                bound[window, tokens] = bind_refresh(window, tokens)
            kernels.append(bound[window, tokens])
        return kernels

    def window_kernel(self, layer: int) -> BoundKernel:
        """``layer``'s window kernel, bound at construction: ``kernel(q, k, v)``."""
        return self._window_kernels[layer]

    def window_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int
    ) -> torch.Tensor:
        return self._window_kernels[layer](q, k, v)

    # -- CFG halves --------------------------------------------------------
    def cond_rows(self, batch: int) -> slice:
        """Rows of the conditional half in a CFG batch of ``batch`` rows."""
        if self.cfg_mode != "batched" or batch % 2:
            raise PlanError(
                f"$.sampling.cfg: CFG sharing needs an even CFG batch, got {batch} rows "
                f"with cfg={self.cfg}"
            )
        half = batch // 2
        return slice(half, batch) if self.cfg_order == "uncond_cond" else slice(0, half)

    @staticmethod
    def copy_to_both_halves(cond: Outputs) -> Outputs:
        return map_outputs(lambda x: torch.cat([x, x], dim=0), cond)

    # -- caches ------------------------------------------------------------
    def residual_for(self, todo: LayerStep, rows: slice, o_rows: int) -> torch.Tensor:
        """The residual for the computed rows: all rows (``wars``) or the conditional ones."""
        cache = todo.cache
        r = cache.residual
        if r is None:
            raise PlanError(
                f"$.methods[{todo.step}][{todo.layer}]: 'wars' has no residual from an "
                "earlier full step"
            )
        sharing = rows != slice(None)
        if sharing:
            return r if cache.residual_cond_only else r[self.cond_rows(r.shape[0])]
        if cache.residual_cond_only:
            r = self.copy_to_both_halves(r)
        if r.shape[0] != o_rows:
            raise PlanError(
                f"layer {todo.layer}: residual has {r.shape[0]} rows, the batch has {o_rows}; "
                "the batch size changed within a generation"
            )
        return r

    # -- checks ------------------------------------------------------------
    def check_tokens(self, layer: int, num_tokens: int, text_tokens: int = 0) -> None:
        if self.layers:
            entry = self.layers[layer]
            if num_tokens != entry.num_tokens:
                raise PlanError(
                    f"$.layers[{layer}].num_tokens: plan has {entry.num_tokens} tokens, layer {layer} "
                    f"({entry.kind}) runs {num_tokens}"
                )
            if text_tokens != entry.text_tokens:
                raise PlanError(
                    f"$.layers[{layer}].text_tokens: plan has {entry.text_tokens} text tokens, layer {layer} "
                    f"({entry.kind}) runs {text_tokens}"
                )
        elif self.num_tokens is not None and num_tokens != self.num_tokens:
            raise PlanError(
                f"$.tokens.num_tokens: plan has {self.num_tokens} tokens, layer {layer} "
                f"runs {num_tokens}"
            )

    def check_inputs(self, hidden_states: torch.Tensor, class_labels: Any) -> None:
        """First-step checks: a CFG batch iff CFG is batched, in the plan's order."""
        batch = hidden_states.shape[0]
        half = batch // 2
        is_cfg = batch % 2 == 0 and torch.equal(hidden_states[:half], hidden_states[half:])
        batched = self.cfg_mode == "batched"
        if batched and not is_cfg:
            raise PlanError(
                f"$.sampling.cfg: plan is calibrated with CFG but the batch of {batch} rows "
                "is not two equal latent halves"
            )
        if not batched and is_cfg and batch > 1:
            field, what = ("$.sampling.cfg_mode", "in separate calls") if self.cfg else ("$.sampling.cfg", "without CFG")
            raise PlanError(f"{field}: plan is calibrated {what} but the model runs a CFG batch")
        if batched and self.null_class is not None and torch.is_tensor(class_labels):
            labels = class_labels.reshape(-1)
            if labels.numel() == batch:
                null_first = bool((labels[:half] == self.null_class).all())
                null_last = bool((labels[half:] == self.null_class).all())
                order = "cond_uncond" if null_last else "uncond_cond" if null_first else None
                if order is not None and order != self.cfg_order:
                    raise PlanError(
                        f"$.sampling.cfg_order: plan says {self.cfg_order!r}, the class labels "
                        f"are ordered {order!r}"
                    )

    def _enter_call(self, key: Any) -> None:
        """CFG in separate calls: a call with the previous call's timestep (``key``) is that
        step's unconditional call, any other one starts a step; a step of one call, or of
        three, is a ``PlanError``."""
        state = self.state
        same = key is not None and state.call_key is not None and _same(key, state.call_key)
        if state.call == 1 and not same:
            raise PlanError(
                f"$.sampling.cfg_mode: step {state.step} ran one transformer call; 'separate' CFG runs "
                "two per step (conditional, then unconditional, at the same timestep)"
            )
        if state.call == 0 and state.step > 0 and same:
            raise PlanError(
                f"$.sampling.cfg_mode: a third transformer call at step {state.step - 1}; 'separate' "
                "CFG runs two per step"
            )
        state.call_key = key

    # -- transformer hooks -------------------------------------------------
    def before_forward(self, hidden_states: torch.Tensor, class_labels: Any, timestep: Any = None) -> None:
        """Checks, then binds each processor's ``LayerStep`` for this call (eager code).

        ``timestep`` tells the calls of a step apart with CFG in separate calls (the
        latents stand in when it is not given)."""
        state = self.state
        if state.in_forward:  # the previous forward raised: that generation is over
            state.reset()
        if not self.trial and self.cfg_mode == "separate":
            self._enter_call(hidden_states if timestep is None else timestep)
        if state.step >= self.schedule.num_steps:
            raise PlanError(
                f"$.sampling.num_steps: plan has {self.schedule.num_steps} steps, this is "
                f"forward {state.step + 1} of the generation; call reset() between generations"
            )
        if not self.trial:
            self.timesteps[state.step] = timestep
            self._times.pop(state.step, None)
        if not self.trial and not state.checked_inputs:
            self.check_inputs(hidden_states, class_labels)
            state.checked_inputs = True
        if not self.trial:
            state.step_started(len(self.schedule.methods[state.step]))
        for processor in self.processors:
            processor.bound = self.layer_step(processor.layer)
        state.in_forward = True

    def unbind(self) -> None:
        """Drop the processors' ``LayerStep`` (and so their hold on the caches) between steps."""
        for processor in self.processors:
            processor.bound = None

    def after_forward(self) -> None:
        """Counts what ran, notes the peak cache bytes, frees caches no later step reads.

        With CFG in separate calls, a step is counted once, after its second call, over
        the rows of both calls."""
        state = self.state
        state.in_forward = False
        self.unbind()
        if self.trial:
            return
        step, schedule = state.step, self.schedule
        row = schedule.methods[step]
        stores = []
        for layer, method in enumerate(row):
            if not state.cache(layer).rows:  # did not run (the planner runs chunks itself)
                continue
            refreshed = method in COMPUTES_FULL and schedule.refreshes_residual(step, layer)
            kept = method not in REUSES_OUTPUT and schedule.keeps_output(step, layer)
            stores.append((layer, refreshed, kept))
        state.note_stores(stores)
        for layer in range(len(row)):
            free_residual, free_output = schedule.frees_after(step, layer)
            cache = state.cache(layer)
            if free_residual:
                cache.residual = None
            if free_output:
                cache.free_outputs()
            if schedule.frees_head_output(step, layer):
                cache.head_output = None
        if self.ffn_schedule is not None:
            for j in range(len(self.ffn_schedule.methods[step])):
                if self.ffn_schedule.frees_after(step, j)[1]:
                    state.ffn_cache(j).free_outputs()
        if self.cfg_mode == "separate" and state.call == 0:
            state.call = 1
            return
        for layer, refreshed, _ in stores:
            rows = sum(state.cache(layer, call).rows for call in range(state.call + 1))
            state.count(
                row[layer], rows, state.cache(layer).tokens, self.window_of(layer), refreshed,
                self.text_tokens(layer), merged=state.cache(layer).merged_refresh,
                heads=schedule.heads.get((step, layer)),
            )
        state.call = 0
        if step == 0:
            state.stats.generations += 1
        state.stats.steps += 1
        state.step += 1


def _time_value(timestep: Any, step: int) -> float:
    """A step's timestep as a number (the first row's); the step index when the call has none."""
    if torch.is_tensor(timestep):
        return float(timestep.reshape(-1)[0]) if timestep.numel() else float(step)
    return float(timestep) if isinstance(timestep, (int, float)) else float(step)


def _same(a: Any, b: Any) -> bool:
    """Whether two timesteps (tensors or numbers) are equal."""
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool(torch.equal(a, b.to(a.device)))
    if torch.is_tensor(a) or torch.is_tensor(b):
        return False
    return a == b
