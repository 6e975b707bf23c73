"""The greedy DiTFastAttn search, driven by the pipeline's own transformer calls.

While a real diffusers pipeline generates the calibration batch, every call of its
transformer (one denoising step ``t``) is intercepted: at ``t >= 1`` the search runs
trial forwards through the runtime's processors to choose each layer's method, then
the step's real forward runs under the chosen methods and its output goes back to
the pipeline, so the trajectory advances under the plan being built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from planner import distributed
from runtime.recording import Recorder
from runtime.runner import Runner
from runtime.state import GenerationState
from schemas import PlanError

CANDIDATES = ("ast", "wars_asc", "wars", "asc")  # most compressive first
CFG_SHARING = ("wars_asc", "asc")

Progress = Callable[[int, int, str, "float | None"], None]


def rel_l1_terms(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Sum and count of ``clip(|a - b| / (max(|a|, |b|) + 1e-6), 0, 10)`` over all elements."""
    a, b = a.float(), b.float()
    err = ((a - b).abs() / (torch.maximum(a.abs(), b.abs()) + 1e-6)).clamp(0.0, 10.0)
    return float(err.sum(dtype=torch.float64)), err.numel()


def rel_l1_sums(outputs: list[torch.Tensor], references: list[torch.Tensor]) -> tuple[float, int]:
    """Sum and count of :func:`rel_l1_terms` over a batch given in chunks."""
    total, count = 0.0, 0
    for out, ref in zip(outputs, references):
        s, n = rel_l1_terms(out, ref)
        total, count = total + s, count + n
    return total, count


def rel_l1(outputs: list[torch.Tensor], references: list[torch.Tensor]) -> float:
    """Relative L1 over the whole calibration batch: the mean over every element of its
    chunks and, in a data-parallel run, of every rank's (a collective: all ranks call it)."""
    [(total, count)] = distributed.sum_pairs([rel_l1_sums(outputs, references)])
    return total / count


class Chunks:
    """The rows of a transformer batch, split into calibration chunks of whole prompts.

    With CFG a batch of ``2B`` rows holds the same ``B`` prompts twice, one half per
    branch; a chunk takes both halves' rows of its prompts, in the batch's order, so
    CFG sharing still sees a conditional and an unconditional half. ``share`` (default:
    all) is the range of prompts this rank runs in a data-parallel run; the other rows
    are left out of every chunk.
    """

    def __init__(self, rows: int, cfg: bool, size: int | None, share: range | None = None) -> None:
        self.rows = rows
        prompts = rows // 2 if cfg else rows
        share = range(prompts) if share is None else share
        self.whole = len(share) == prompts
        size = min(size or len(share), len(share))
        self.index: list[torch.Tensor] = []
        for start in range(share.start, share.stop, size):
            picked = torch.arange(start, min(start + size, share.stop))
            self.index.append(torch.cat([picked, picked + prompts]) if cfg else picked)
        self.picked = torch.cat(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def split(self, args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
        """Per chunk, the call's arguments restricted to its rows."""
        if len(self) == 1 and self.whole:
            return [(args, kwargs)]
        return [
            (tuple(self._rows(a, idx) for a in args), {k: self._rows(v, idx) for k, v in kwargs.items()})
            for idx in self.index
        ]

    def join(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The chunks' outputs as one batch, in the original row order; rows outside the
        share are zeros (the pipeline carries them along, nothing reads them)."""
        if len(outputs) == 1 and self.whole:
            return outputs[0]
        joined = torch.cat(outputs)
        batch = joined.new_zeros((self.rows, *joined.shape[1:]))
        return batch.index_copy_(0, self.picked.to(joined.device), joined)

    def _rows(self, value: Any, idx: torch.Tensor) -> Any:
        if isinstance(value, dict):
            return {k: self._rows(v, idx) for k, v in value.items()}
        if torch.is_tensor(value) and value.ndim and value.shape[0] == self.rows:
            return value.index_select(0, idx.to(value.device))
        return value


class ChunkedForward:
    """Routes a transformer's forward through ``_step`` while ``attached``.

    The calibration batch (this rank's share of it in a data-parallel run) is split into
    chunks (:class:`Chunks`), each run on its own generation state, so per-chunk caches
    stay apart; subclasses decide what a step does. A step is one transformer call, or,
    with CFG in separate calls, the pair of calls: the conditional call gets back a tensor
    that is filled when the unconditional call has arrived and the step has run (the
    pipeline combines the two only after both calls, so it reads the filled values).
    """

    def __init__(self, runner: Runner, transformer: torch.nn.Module, calib_batch: int | None) -> None:
        self.runner = runner
        self.transformer = transformer
        self.calib_batch = calib_batch
        self._original = transformer.forward
        self._chunks: Chunks | None = None
        self._states: list[GenerationState] = []
        self._waiting: tuple[list[tuple[tuple, dict]], torch.Tensor] | None = None

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Route the transformer's forward through this object for the duration of the block."""
        self.transformer.forward = self._forward
        try:
            yield
            if self._waiting is not None:
                raise PlanError(
                    "$.sampling.cfg_mode: the last step ran one transformer call; 'separate' CFG runs two"
                )
        finally:
            del self.transformer.forward
            self._chunks, self._states, self._waiting = None, [], None

    def _forward(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        parts = self._split(args, kwargs)
        if self.runner.cfg_mode == "separate" and self._waiting is None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._waiting = parts, hidden.new_empty(hidden.shape)
            sample = self._waiting[1]
        else:
            first, self._waiting = self._waiting, None
            calls = [parts] if first is None else [first[0], parts]
            runner = self.runner
            outer = runner.state
            try:
                outputs = self._step(outer.step, calls)
            finally:
                runner.state, runner.recorder = outer, None
            if first is not None:
                first[1].copy_(outputs[0])
            sample = outputs[-1]
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    def _step(self, step: int, calls: list[list[tuple[tuple, dict]]]) -> list[torch.Tensor]:
        """Run denoising step ``step`` on its calls' chunks; the output of each call."""
        raise NotImplementedError

    def _split(self, args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
        """A call's inputs per chunk; the chunks and their states are made at the first call."""
        if self._chunks is None:
            rows = (args[0] if args else kwargs["hidden_states"]).shape[0]
            cfg = self.runner.cfg_mode == "batched"
            share = distributed.share(rows // 2 if cfg else rows)
            self._chunks = Chunks(rows, cfg, self.calib_batch, share)
            self._states = [GenerationState() for _ in range(len(self._chunks))]
            self._chunks_made(len(self._chunks))
        return self._chunks.split(args, kwargs)

    def _chunks_made(self, count: int) -> None:
        """Hook: ``count`` chunks were made."""

    def _join(self, outputs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Each call's chunk outputs as one batch."""
        return [self._chunks.join(chunks) for chunks in outputs]

    def _run(
        self,
        step: int,
        calls: list[list[tuple[tuple, dict]]],
        overrides: dict[int, str] | None,
        recorders: list[Recorder] | None = None,
        ffn: dict[int, str] | None = None,
    ) -> list[list[torch.Tensor]]:
        """Outputs per call and chunk at ``step``: a trial with ``overrides``, or the real
        forward (recorded by the chunk's recorder when ``recorders`` is given); ``ffn``
        overrides feed-forward layers in a trial. A trial runs
        each chunk's calls in order, so a separate step's second call can share the first's."""
        runner = self.runner
        outputs: list[list[torch.Tensor]] = [[] for _ in calls]
        for i, state in enumerate(self._states):
            runner.state, state.step = state, step
            for call, parts in enumerate(calls):
                args, kwargs = parts[i]
                state.call = call
                if overrides is None:
                    runner.recorder = recorders[i] if recorders is not None else None
                    outputs[call].append(self._original(*args, return_dict=False, **kwargs)[0])
                    runner.recorder = None
                else:
                    with runner.trying(overrides, ffn):
                        outputs[call].append(self._original(*args, return_dict=False, **kwargs)[0])
            state.call = 0
        return outputs


class GreedySearch(ChunkedForward):
    """Chooses a method per (step, layer) while the pipeline runs (DESIGN §2).

    Writes its choices into ``runner.schedule.methods`` (a ``keep_all`` schedule that
    starts all ``full``) and the loss of each kept choice into ``losses`` (``None`` where
    nothing was measured: step 0, and every step when δ = 1 leaves no budget).
    ``allowed`` limits the candidates (to those faster than ``full`` on the device).
    """

    def __init__(
        self,
        runner: Runner,
        transformer: torch.nn.Module,
        *,
        delta: float,
        calib_batch: int | None = None,
        progress: Progress | None = None,
        allowed: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(runner, transformer, calib_batch)
        self.delta = delta
        self.progress = progress
        self.methods = runner.schedule.methods
        self.num_layers = len(self.methods[0])
        self.losses: list[list[float | None]] = [[None] * self.num_layers for _ in self.methods]
        self.candidates = tuple(
            m for m in CANDIDATES if (runner.cfg or m not in CFG_SHARING) and (allowed is None or m in allowed)
        )

    # -- one denoising step --------------------------------------------------
    def _step(self, step: int, calls: list[list[tuple[tuple, dict]]]) -> list[torch.Tensor]:
        if step > 0 and self.delta < 1.0:
            self._decide(step, calls)
        else:  # step 0 stays full; δ = 1 leaves no budget to spend
            for layer in range(self.num_layers):
                self._report(step, layer)
        return self._join(self._run(step, calls, None))

    def _decide(self, step: int, calls: list[list[tuple[tuple, dict]]]) -> None:
        layers = self.num_layers
        reference = flat(self._run(step, calls, {i: "full" for i in range(layers)}))
        loss = 0.0  # loss of the current choices: all full so far
        for layer in range(layers):
            budget = (layer + 1) / layers * (1.0 - self.delta)
            for candidate in self.candidates:
                trial = rel_l1(flat(self._run(step, calls, {layer: candidate})), reference)
                if trial <= budget:
                    self.methods[step][layer], loss = candidate, trial
                    break
            self.losses[step][layer] = loss
            self._report(step, layer)

    def _report(self, step: int, layer: int) -> None:
        if self.progress is not None:
            self.progress(step, layer, self.methods[step][layer], self.losses[step][layer])


def flat(outputs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Every call's chunk outputs in one list (a loss covers both calls of a separate step)."""
    return [chunk for call in outputs for chunk in call]
