"""The window of a calibration run: ``--window``'s forms, ``auto``'s candidates and its choice.

``--window`` takes ``auto`` (the default), a band (``band:W``, or ``W`` alone: a
half-width in tokens) or a tiled shape without its grid (``tiles1d:T:K``,
``tiles2d:THxTW:K``, ``tiles3d:TFxTHxTW:K``; ``schemas/windows.py``), which the model's
patch grid completes. ``auto`` measures, during one all-``full`` generation of the
calibration batch, the residual error of ``wars`` under each candidate of about the
band's pair count (the band of ``window_frac`` of the tokens and the closest tilings of
the grid), and keeps the smallest: per candidate, the mean over steps ``t >= 1`` and
layers of ``||P(W_t + R_{t-1}) - O_t|| / ||O_t||``, the profile's ``wars`` measure at
lag 1 (``runtime/recording.py``), computed with the runtime's own kernels.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

import runtime
from planner import distributed
from planner.search import ChunkedForward
from runtime.recording import Recorder
from runtime.runner import Runner
from runtime.schedule import Schedule
from runtime.arrow import bind_arrow
from runtime.windows import BoundKernel, bind_window
from schemas import Plan, Tiles1d, Tiles2d, Tiles3d, WindowShape, plan_layers, window_name, window_pairs
from schemas.plan import MAX_WINDOW
from schemas.windows import MAX_GRID, MAX_REACH, tiles_problem

KINDS = ("auto", "band", "tiles1d", "tiles2d", "tiles3d")
TILED_FORMS = {"tiles1d": "tiles1d:T:K", "tiles2d": "tiles2d:THxTW:K", "tiles3d": "tiles3d:TFxTHxTW:K"}
FORMS = f"auto, W, band:W, {', '.join(list(TILED_FORMS.values())[:-1])} or {TILED_FORMS['tiles3d']}"
MIN_TILE = 16  # tokens per tile of auto's candidates: smaller tiles leave a fused kernel little to do
MAX_K = 3  # tiles on each side of auto's candidates: beyond, a tiling is a coarse band
MAX_ASPECT = 4  # longest over shortest tile side of auto's 2D and 3D candidates: tiles, not strips
PAIRS_RANGE = (0.8, 1.25)  # auto's candidates keep this share of the band's pairs
PER_KIND = 2  # candidates of each tiled kind, closest to the band's pairs first


@dataclass(frozen=True)
class WindowOption:
    """A parsed ``--window``: ``auto``, a band of ``width`` tokens, or tiles of ``tile`` with ``k``."""

    kind: str
    width: int | None = None
    tile: tuple[int, ...] = ()
    k: int = 0

    def __str__(self) -> str:
        if self.kind == "auto":
            return "auto"
        if self.kind == "band":
            return f"band:{self.width}"
        return f"{self.kind}:{'x'.join(map(str, self.tile))}:{self.k}"


def _count(text: str, what: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise ValueError(f"{what} must be a whole number, not {text!r}")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{what} must be in {low} … {high}")
    return value


def parse_window(value: str | int | WindowOption) -> WindowOption:
    """``--window``'s value as a ``WindowOption``; ``ValueError`` says what is wrong (without
    the value, which the caller shows)."""
    if isinstance(value, WindowOption):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected {FORMS}")
    text = str(value).strip().lower()
    if text == "auto":
        return WindowOption("auto")
    parts = text.split(":")
    if len(parts) == 1 and re.fullmatch(r"-?[0-9]+", text):
        return WindowOption("band", width=_count(parts[0], "the band half-width", 1, MAX_WINDOW))
    kind = parts[0]
    if kind == "band" and len(parts) == 2:
        return WindowOption("band", width=_count(parts[1], "the band half-width", 1, MAX_WINDOW))
    axes = {"tiles1d": 1, "tiles2d": 2, "tiles3d": 3}.get(kind)
    if axes is None or len(parts) != 3:
        raise ValueError(f"expected {FORMS}")
    sizes = parts[1].split("x")
    if len(sizes) != axes:
        raise ValueError(f"{kind} takes {'one tile size' if axes == 1 else f'{axes} tile sizes'}: {TILED_FORMS[kind]}")
    tile = tuple(_count(s, "a tile size", 1, MAX_GRID) for s in sizes)
    return WindowOption(kind, tile=tile, k=_count(parts[2], "k", 0, MAX_REACH))


# ---------------------------------------------------------------------------
# the window of a run


def band_width(num_tokens: int, width: int | None, window_frac: float) -> int:
    """The band half-width: as asked, else ``window_frac`` of the tokens; at least 1."""
    return max(width if width is not None else int(num_tokens * window_frac), 1)


def shape_for(option: WindowOption, num_tokens: int, grid: tuple[int, ...], window_frac: float) -> WindowShape:
    """The window ``option`` asks for on a layer of ``num_tokens`` tokens on the patch ``grid``
    (``auto``: the band it starts from); ``ValueError`` when it does not fit."""
    if option.kind in ("auto", "band"):
        width = band_width(num_tokens, option.width, window_frac)
        if width > num_tokens - 1:
            raise ValueError(f"{width} tokens exceeds num_tokens - 1 = {num_tokens - 1} at this resolution")
        return width
    if option.kind == "tiles1d":
        shape: WindowShape = Tiles1d(option.tile[0], option.k)
    elif option.kind == "tiles2d" and len(grid) == 2:
        shape = Tiles2d(grid, option.tile, option.k)
    elif option.kind == "tiles3d" and len(grid) == 3:
        shape = Tiles3d(grid, option.tile, option.k)
    else:
        have = "frames x height x width" if len(grid) == 3 else "height x width"
        raise ValueError(f"{option.kind} does not fit layers that attend over {have} (use tiles{len(grid)}d)")
    problem = tiles_problem(shape, num_tokens)
    if problem is not None:
        raise ValueError(problem.split(": ", 1)[1])
    return shape


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(num_tokens: int, grid: tuple[int, ...], band: int) -> list[WindowShape]:
    """``auto``'s candidates: the band, then of each tiled kind the tiling closest to the
    band's pair count for each ``k`` (ties: squarer, then larger tiles), the ``PER_KIND``
    closest of those, all within ``PAIRS_RANGE`` of the band's pairs. Tiles hold at least
    ``MIN_TILE`` tokens, sides within ``MAX_ASPECT`` of each other, and see at most ``MAX_K``
    tiles each side; a 2D tiling whose tiles span whole rows is a 1D one and is left out."""
    target = window_pairs(num_tokens, band)
    tilings: dict[str, list[WindowShape]] = {"tiles1d": [], "tiles2d": [], "tiles3d": []}
    for t in _divisors(num_tokens):
        tilings["tiles1d"] += [Tiles1d(t, k) for k in range(MAX_K + 1)]
    if len(grid) == 2:
        rows, cols = grid
        for th in _divisors(rows):
            for tw in _divisors(cols)[:-1]:  # tw = cols: a 1D tiling
                tilings["tiles2d"] += [Tiles2d(tuple(grid), (th, tw), k) for k in range(MAX_K + 1)]
    if len(grid) == 3:
        frames, rows, cols = grid
        for tf in _divisors(frames):
            for th in _divisors(rows):
                for tw in _divisors(cols)[:-1]:
                    tilings["tiles3d"] += [Tiles3d(tuple(grid), (tf, th, tw), k) for k in range(MAX_K + 1)]
    picked: list[WindowShape] = [band]
    low, high = PAIRS_RANGE
    for shapes in tilings.values():
        fitting = []
        for shape in shapes:
            tile = (shape.tile,) if isinstance(shape, Tiles1d) else shape.tile
            pairs = window_pairs(num_tokens, shape)
            if math.prod(tile) < MIN_TILE or max(tile) > MAX_ASPECT * min(tile):
                continue
            if not low <= pairs / target <= high or pairs >= num_tokens**2:
                continue
            fitting.append((abs(math.log(pairs / target)), max(tile) / min(tile), -math.prod(tile), shape))
        fitting.sort(key=lambda x: x[:3])
        closest_per_k = {}
        for *_, shape in fitting:
            closest_per_k.setdefault(shape.k, shape)
        picked += [s for *_, s in fitting if closest_per_k[s.k] is s][:PER_KIND]
    return picked


# ---------------------------------------------------------------------------
# auto: measure the candidates on the calibration batch


class _Windowed:
    """The runner, with another window kernel per layer (what a ``Recorder`` reads)."""

    def __init__(self, runner: Runner, kernels: list[BoundKernel]) -> None:
        self._runner, self._kernels = runner, kernels

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def window_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        return self._kernels[layer](q, k, v)


class _Candidates:
    """One recorder per candidate window, fed the same full layer-steps."""

    def __init__(self, kernels: list[list[BoundKernel]]) -> None:
        self.kernels = kernels
        self.recorders = [Recorder(1) for _ in kernels]

    def record(self, runner: Runner, layer: int, *tensors: Any) -> None:
        for kernels, recorder in zip(self.kernels, self.recorders):
            recorder.record(_Windowed(runner, kernels), layer, *tensors)


class WindowTrial(ChunkedForward):
    """Runs the calibration batch all ``full``, recording each candidate window's residual error."""

    def __init__(
        self, runner: Runner, transformer: torch.nn.Module, kernels: list[list[BoundKernel]], calib_batch: int | None
    ) -> None:
        super().__init__(runner, transformer, calib_batch)
        self.kernels = kernels
        self.chunks: list[_Candidates] = []

    def _chunks_made(self, count: int) -> None:
        self.chunks = [_Candidates(self.kernels) for _ in range(count)]

    def _step(self, step: int, calls: list[list[tuple[tuple, dict]]]) -> list[torch.Tensor]:
        return self._join(self._run(step, calls, None, self.chunks))

    def errors(self, steps: int, layers: int) -> list[float]:
        """Per candidate: the mean over steps ``t >= 1`` and layers of its ``wars`` distance."""
        out = []
        for c in range(len(self.kernels)):
            total = Recorder(1)
            for chunk in self.chunks:
                total.merge(chunk.recorders[c])
            total.reduce(distributed.sum_floats)
            cells = [total.distance("wars", t, i, 1) for t in range(1, steps) for i in range(layers)]
            cells = [d for d in cells if d is not None]
            out.append(sum(cells) / len(cells) if cells else math.inf)
        return out


def candidate_kernels(runner: Runner, plan: Plan, window: WindowShape, kernel: str = "auto") -> list[BoundKernel]:
    """Per layer of ``plan``: the kernel of ``window`` on spatial layers, its arrow on joint
    layers (text where ``runner``'s adapter puts it), their own band on temporal ones."""
    kernels = []
    for i, x in enumerate(plan_layers(plan)):
        if x.kind == "joint":
            text_first = runner.adapters[i].text_first
            kernels.append(bind_arrow(window, x.num_tokens, x.text_tokens, text_first, kernel, "$.window"))
        else:
            kernels.append(bind_window(window if x.kind == "spatial" else x.window, x.num_tokens, kernel))
    return kernels


def measure_windows(
    pipe: Any, draft: Plan, shapes: list[WindowShape], call: dict[str, Any], calib_batch: int | None
) -> dict[str, float]:
    """Each candidate's residual error (``window_name`` → error) on one all-``full`` generation
    of the calibration batch under ``draft`` (an all-``full`` plan); the pipeline is left as found."""
    handle = runtime.apply(draft, pipe)
    try:
        handle.runner.schedule = Schedule([list(row) for row in draft.methods])
        trial = WindowTrial(
            handle.runner, pipe.transformer, [candidate_kernels(handle.runner, draft, s) for s in shapes], calib_batch
        )
        with trial.attached():
            pipe(**call)
    finally:
        handle.remove()
    errors = trial.errors(draft.sampling.num_steps, draft.model.num_layers)
    return {window_name(s): e for s, e in zip(shapes, errors)}


def best(shapes: list[WindowShape], errors: dict[str, float]) -> WindowShape:
    """The candidate of least error (the first, the band, on ties)."""
    return min(shapes, key=lambda s: errors[window_name(s)])
