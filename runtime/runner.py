"""The per-model executor shared by all processors: step counting, caches, CFG rows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from runtime.kernels import resolve_window_kernel
from runtime.recording import Recorder
from runtime.schedule import Schedule
from runtime.state import GenerationState, Residual
from schemas import Layer, PlanError


class Runner:
    """Executes a ``Schedule`` on one transformer: the single executor of every method.

    One transformer forward is one denoising step. During a trial (``trying``) the
    processors read the caches but write none and the step does not advance. With a
    ``recorder`` set, every ``full`` layer-step that writes is also measured by it.
    """

    def __init__(
        self,
        schedule: Schedule,
        *,
        window: int,
        cfg: bool,
        cfg_order: str | None,
        num_tokens: int | None = None,
        kernel: str = "auto",
        null_class: int | None = None,
        layers: list[Layer] | None = None,
    ) -> None:
        self.schedule = schedule
        self.window = window
        self.cfg = cfg
        self.cfg_order = cfg_order
        self.num_tokens = num_tokens
        self.layers = layers
        self.null_class = null_class
        self.state = GenerationState()
        self.trial = False
        self.overrides: dict[int, str] = {}
        self.recorder: Recorder | None = None  # recording mode (runtime/recording.py)
        self._window_kernel = resolve_window_kernel(kernel)
        self._kernel_name = kernel

    # -- what to run -------------------------------------------------------
    def method(self, layer: int) -> str:
        if layer in self.overrides:
            return self.overrides[layer]
        return self.schedule.method(self.state.step, layer)

    @contextmanager
    def trying(self, overrides: dict[int, str]) -> Iterator[None]:
        """Run forwards with ``overrides`` at the current step, writing no cache."""
        self.trial, self.overrides = True, dict(overrides)
        try:
            yield
        finally:
            self.trial, self.overrides = False, {}

    def window_of(self, layer: int) -> int:
        """Band half-width of ``layer``, in its own tokens."""
        return self.layers[layer].window if self.layers else self.window

    def window_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int
    ) -> torch.Tensor:
        return self._window_kernel(q, k, v, self.window_of(layer))

    # -- CFG halves --------------------------------------------------------
    def cond_rows(self, batch: int) -> slice:
        """Rows of the conditional half in a CFG batch of ``batch`` rows."""
        if not self.cfg or batch % 2:
            raise PlanError(
                f"$.sampling.cfg: CFG sharing needs an even CFG batch, got {batch} rows "
                f"with cfg={self.cfg}"
            )
        half = batch // 2
        return slice(half, batch) if self.cfg_order == "uncond_cond" else slice(0, half)

    @staticmethod
    def copy_to_both_halves(cond: torch.Tensor) -> torch.Tensor:
        return torch.cat([cond, cond], dim=0)

    # -- caches ------------------------------------------------------------
    def store_residual(self, layer: int, residual: torch.Tensor, *, cond_only: bool) -> None:
        self.state.residuals[layer] = Residual(residual, cond_only)
        self.state.note_cache()

    def residual_for(self, layer: int, rows: slice, o_rows: int) -> torch.Tensor:
        """The residual for the computed rows: all rows (``wars``) or the conditional ones."""
        cached = self.state.residuals.get(layer)
        if cached is None:
            raise PlanError(
                f"$.methods[{self.state.step}][{layer}]: 'wars' has no residual from an "
                "earlier full step"
            )
        r = cached.tensor
        sharing = rows != slice(None)
        if sharing:
            return r if cached.cond_only else r[self.cond_rows(r.shape[0])]
        if cached.cond_only:
            r = self.copy_to_both_halves(r)
        if r.shape[0] != o_rows:
            raise PlanError(
                f"layer {layer}: residual has {r.shape[0]} rows, the batch has {o_rows}; "
                "the batch size changed within a generation"
            )
        return r

    # -- checks ------------------------------------------------------------
    def check_tokens(self, layer: int, num_tokens: int) -> None:
        if self.layers:
            expected = self.layers[layer].num_tokens
            if num_tokens != expected:
                raise PlanError(
                    f"$.layers[{layer}].num_tokens: plan has {expected} tokens, layer {layer} "
                    f"({self.layers[layer].kind}) runs {num_tokens}"
                )
        elif self.num_tokens is not None and num_tokens != self.num_tokens:
            raise PlanError(
                f"$.tokens.num_tokens: plan has {self.num_tokens} tokens, layer {layer} "
                f"runs {num_tokens}"
            )

    def check_inputs(self, hidden_states: torch.Tensor, class_labels: Any) -> None:
        """First-step checks: a CFG batch iff the plan uses CFG, in the plan's order."""
        batch = hidden_states.shape[0]
        half = batch // 2
        is_cfg = batch % 2 == 0 and torch.equal(hidden_states[:half], hidden_states[half:])
        if self.cfg and not is_cfg:
            raise PlanError(
                f"$.sampling.cfg: plan is calibrated with CFG but the batch of {batch} rows "
                "is not two equal latent halves"
            )
        if not self.cfg and is_cfg and batch > 1:
            raise PlanError(
                "$.sampling.cfg: plan is calibrated without CFG but the model runs a CFG batch"
            )
        if self.cfg and self.null_class is not None and torch.is_tensor(class_labels):
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

    # -- transformer hooks -------------------------------------------------
    def before_forward(self, hidden_states: torch.Tensor, class_labels: Any) -> None:
        state = self.state
        if state.in_forward:  # the previous forward raised: that generation is over
            state.reset()
        if state.step >= self.schedule.num_steps:
            raise PlanError(
                f"$.sampling.num_steps: plan has {self.schedule.num_steps} steps, this is "
                f"forward {state.step + 1} of the generation; call reset() between generations"
            )
        if not self.trial and not state.checked_inputs:
            self.check_inputs(hidden_states, class_labels)
            state.checked_inputs = True
        state.in_forward = True

    def after_forward(self) -> None:
        state = self.state
        state.in_forward = False
        if self.trial:
            return
        step = state.step
        for layer in range(len(self.schedule.methods[step])):
            free_residual, free_output = self.schedule.frees_after(step, layer)
            if free_residual:
                state.residuals.pop(layer, None)
            if free_output:
                state.outputs.pop(layer, None)
        if step == 0:
            state.stats.generations += 1
        state.stats.steps += 1
        state.step += 1
