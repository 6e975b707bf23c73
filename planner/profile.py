"""Profile a model once on its calibration batch, through the runtime's processors.

The pipeline generates the calibration batch under an all-``full`` plan with the
runtime in recording mode (``runtime/recording.py``): at every step each layer's
full output is compared with what ``ast``, ``wars``, ``wars_asc`` and ``asc`` would
have returned from the caches of up to ``lags`` earlier steps, and per head with what
that head alone running ``ast`` or ``wars`` from the previous step would give
(``head_ast``, ``head_wars``: per-head plans). Before each step's
real forward, one trial forward per layer and probed method (default: ``ast``) runs
that method on that layer alone, as the greedy search would, and its loss against
the full output gives the layer's gain: how much of a layer error reaches the
transformer output. ``planner.compile`` turns the profile into a plan for any δ.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import torch

import runtime
from planner import distributed
from planner.build import BuildRequest, generation_kwargs, own_output, settle_window
from planner.costs import measure_costs
from planner.errors import bad_input
from planner.latency import measure_latency
from planner.output import write_atomic
from planner.search import CANDIDATES, CFG_SHARING, ChunkedForward, flat, rel_l1_sums
from planner.sensitivity import step_weights
from runtime.feedforward import feed_forward_layers
from runtime.recording import Recorder
from runtime.runner import Runner
from runtime.schedule import Schedule
from schemas import (
    PROFILE_SCHEMA_VERSION,
    Measurements,
    Profile,
    ProfileCalibration,
    encode_profile,
    with_figures,
)

DEFAULT_LAGS = 4
DEFAULT_PROBES: tuple[str, ...] = ("ast",)

ProfileProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class ProfileResult:
    """The profile, the calibration batch's pipeline output (``own_output``), and the profiling time."""

    profile: Profile
    images: torch.Tensor
    seconds: float


def check_probes(probes: tuple[str, ...], cfg: bool) -> tuple[str, ...]:
    """The probed methods, in the search's order; refuses unknown ones and CFG sharing without CFG."""
    for probe in probes:
        if probe not in CANDIDATES:
            raise bad_input(f"probes: unknown method {probe!r}; choose from {', '.join(CANDIDATES)}")
        if probe in CFG_SHARING and not cfg:
            raise bad_input(f"probes: {probe!r} shares across CFG halves but CFG is off")
    if not probes:
        raise bad_input("probes: give at least one method to probe")
    return tuple(m for m in CANDIDATES if m in probes)


class ProfileSession(ChunkedForward):
    """Records every step of the calibration trajectory and probes each layer's gain.

    Intercepts the transformer's forward like the greedy search does: per step, the
    probe trials run first (they read the caches of the previous step and write
    none), then the real all-``full`` forward, recorded, whose output the pipeline
    gets and the probes are scored against.
    """

    def __init__(
        self,
        runner: Runner,
        transformer: torch.nn.Module,
        *,
        lags: int,
        probes: tuple[str, ...],
        calib_batch: int | None = None,
        progress: ProfileProgress | None = None,
        ffn_layers: int = 0,
        heads: bool = True,
    ) -> None:
        super().__init__(runner, transformer, calib_batch)
        self.heads = heads
        self.ffn_layers = ffn_layers
        self.lags = lags
        self.probes = probes
        self.progress = progress
        self.num_steps = runner.schedule.num_steps
        self.num_layers = len(runner.schedule.methods[0])
        self.losses: dict[str, list[list[float | None]]] = {
            m: [[None] * self.num_layers for _ in range(self.num_steps)] for m in probes
        }
        self.ffn_losses: list[list[float | None]] = [[None] * ffn_layers for _ in range(self.num_steps)]
        self.recorders: list[Recorder] = []

    def _chunks_made(self, count: int) -> None:
        self.recorders = [Recorder(self.lags, heads=self.heads) for _ in range(count)]

    def recorder(self) -> Recorder:
        """All chunks' measurements together, and every rank's in a data-parallel run."""
        total = Recorder(self.lags, heads=self.heads)
        for recorder in self.recorders:
            total.merge(recorder)
        total.reduce(distributed.sum_floats)
        return total

    def _step(self, step: int, calls: list[list[tuple[tuple, dict]]]) -> list[torch.Tensor]:
        trials = {}
        if step > 0:
            for layer in range(self.num_layers):
                for probe in self.probes:
                    trials[layer, probe] = flat(self._run(step, calls, {layer: probe}))
            for j in range(self.ffn_layers):
                trials[j, "ffn"] = flat(self._run(step, calls, {}, ffn={j: "reuse"}))
        outputs = self._run(step, calls, None, self.recorders)
        if trials:  # one collective per step: the loss of every trial over the whole batch
            reference = flat(outputs)
            sums = distributed.sum_pairs([rel_l1_sums(trial, reference) for trial in trials.values()])
            for (layer, probe), (total, count) in zip(trials, sums):
                grid = self.ffn_losses if probe == "ffn" else self.losses[probe]
                grid[step][layer] = total / count
        if self.progress is not None:
            for layer in range(self.num_layers):
                self.progress(step, layer)
        return self._join(outputs)


def profile_model(
    pipe: Any,
    request: BuildRequest,
    *,
    lags: int = DEFAULT_LAGS,
    probes: tuple[str, ...] = DEFAULT_PROBES,
    progress: ProfileProgress | None = None,
    weights: bool = True,
    ffn: bool = True,
    weights_progress: Callable[[int, int], None] | None = None,
    heads: bool = True,
) -> ProfileResult:
    """Profile ``pipe`` on the calibration batch of ``request`` (its δ is not used).

    ``progress(step, layer)`` is called once per measured layer-step. With ``weights``,
    the steps' weights on the final result are measured too (``planner/sensitivity.py``;
    ``weights_progress(done, total)`` follows them); with ``ffn``, the feed-forward layers'
    reuse and forecast, and the gain of each (a ``reuse`` trial per layer and step); with
    ``heads``, the per-head ``head_ast``/``head_wars`` (two output projections per head and
    layer-step). The
    transformer's FLOPs are counted for ``$.costs`` (``planner/costs.py``). The pipeline is
    left as it was found.
    """
    if lags < 1:
        raise bad_input(f"lags: must be >= 1 (got {lags})")
    draft = settle_window(pipe, request)  # --window auto measures its candidates first
    cfg = draft.sampling.cfg
    probes = check_probes(tuple(probes), cfg)
    latency = measure_latency(pipe, draft, generation_kwargs(pipe, request)) if request.latency else None
    call = generation_kwargs(pipe, request)
    costs = measure_costs(pipe, draft, call)
    width = len(feed_forward_layers(pipe.transformer)) if ffn else 0
    steps = draft.sampling.num_steps
    if width:
        draft = msgspec.structs.replace(draft, ffn=[["compute"] * width for _ in range(steps)])
    handle = runtime.apply(with_figures(draft), pipe)
    try:
        handle.runner.schedule = Schedule([list(row) for row in draft.methods], keep_all=True)
        if width:
            handle.runner.ffn_schedule = Schedule([["full"] * width for _ in range(steps)], keep_all=True)
        session = ProfileSession(
            handle.runner,
            pipe.transformer,
            lags=lags,
            probes=probes,
            calib_batch=request.calib_batch,
            progress=progress,
            ffn_layers=width,
            heads=heads,
        )
        start = time.perf_counter()
        with session.attached():
            images = own_output(pipe, pipe(**generation_kwargs(pipe, request)), request)
        seconds = time.perf_counter() - start
    finally:
        handle.remove()
    step_weight = step_weights(pipe, request, progress=weights_progress) if weights else None
    recorder = session.recorder()
    grids = recorder.grids(steps, draft.model.num_layers)
    ffn_grids = recorder.ffn_grids(steps, width) if width else {"ffn_reuse": None, "ffn_forecast": None}
    cfg_grid = (lambda name: grids[name]) if cfg else (lambda name: None)
    calibration = draft.calibration
    profile = Profile(
        format="ditfastattn-profile",
        schema_version=PROFILE_SCHEMA_VERSION,
        tool_version=draft.tool_version,
        model=draft.model,
        tokens=draft.tokens,
        sampling=draft.sampling,
        window=draft.window,
        calibration=ProfileCalibration(
            metric="rel_l1",
            prompts_hash=calibration.prompts_hash,
            num_prompts=calibration.num_prompts,
            seed=calibration.seed,
            world_size=calibration.world_size,
            window_errors=calibration.window_errors,
        ),
        lags=lags,
        measurements=Measurements(
            ast=grids["ast"],
            wars=grids["wars"],
            wars_after_asc=cfg_grid("wars_after_asc"),
            wars_asc=cfg_grid("wars_asc"),
            asc=cfg_grid("asc"),
            output_norm=grids["norm"],
            loss=session.losses,
            forecast=grids["forecast"],
            step_weight=step_weight,
            ffn_reuse=ffn_grids["ffn_reuse"],
            ffn_forecast=ffn_grids["ffn_forecast"],
            ffn_loss=session.ffn_losses if width else None,
            head_ast=grids["head_ast"],
            head_wars=grids["head_wars"],
        ),
        layers=draft.layers,
        latency=latency,
        costs=costs,
    )
    return ProfileResult(profile=profile, images=images, seconds=seconds)


def write_profile(profile: Profile, path: Path) -> int:
    """Write ``profile`` (msgpack) atomically; returns its size in bytes."""
    data = encode_profile(profile)
    write_atomic(data, path)
    return len(data)
