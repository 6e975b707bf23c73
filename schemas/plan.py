"""The plan artifact: msgspec types, strict decoding and cross-field rules.

A plan says, for every denoising step and every self-attention layer of one
diffusion transformer, which DiTFastAttn method runs. It is plain JSON, decoded
into typed structs: loading a plan never executes anything.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from schemas.latency import HEAD_LETTERS, Heads, Latency, check_latency, time_fraction
from schemas.windows import TILED, Tiles1d, Tiles2d, Tiles3d, tiled_name, tiled_pairs, tiles_problem

SCHEMA_VERSION = 5  # 2: tiled windows (schemas/windows.py); 3: joint layers, CFG modes; 4: forecast; 5: heads
READABLE_VERSIONS = (1, 2, 3, 4, 5)

Method = Literal["full", "wars", "ast", "asc", "wars_asc", "forecast"]
METHODS: tuple[str, ...] = ("full", "wars", "ast", "asc", "wars_asc", "forecast")
REUSES_OUTPUT = ("ast", "forecast")  # run no attention: the layer's earlier computed outputs
FfnMethod = Literal["compute", "reuse", "forecast"]
FFN_METHODS: tuple[str, ...] = ("compute", "reuse", "forecast")
# the attention method whose caching a feed-forward method follows (runtime/schedule.py)
FFN_AS_ATTENTION = {"compute": "full", "reuse": "ast", "forecast": "forecast"}
# share of a layer's q/k/v and output projections each attention method runs
PROJECTED = {"full": 1.0, "wars": 1.0, "asc": 0.5, "wars_asc": 0.5, "ast": 0.0, "forecast": 0.0}
CfgOrder = Literal["uncond_cond", "cond_uncond"]
CfgMode = Literal["batched", "separate", "none"]
CFG_MODES: tuple[str, ...] = ("batched", "separate", "none")
LayerKind = Literal["spatial", "temporal", "joint"]

# Limits on declared sizes and settings: decoding refuses a value past them before
# anything is built from it (a hostile file cannot make the checks allocate).
MAX_STEPS = 1000  # schedulers are trained on 1000 timesteps
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_TOKENS = 2**22
MAX_FRAMES = 4096
MAX_SIDE = 2**17  # height and width, in pixels
MAX_WINDOW = 2**22
MAX_SEQUENCES = 2**22
MAX_LAGS = 64
MAX_PROMPTS = 2**20
MAX_GUIDANCE = 100.0
MAX_SEED = 2**32 - 1  # what the planner takes; torch and numpy both accept 0 .. 2**32 - 1

PosInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]
Hex64 = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
NumSteps = Annotated[int, Meta(ge=1, le=MAX_STEPS)]
NumLayers = Annotated[int, Meta(ge=1, le=MAX_LAYERS)]
NumHeads = Annotated[int, Meta(ge=1, le=MAX_HEADS)]
HeadDim = Annotated[int, Meta(ge=1, le=MAX_HEAD_DIM)]
NumTokens = Annotated[int, Meta(ge=1, le=MAX_TOKENS)]
TextTokens = Annotated[int, Meta(ge=0, le=MAX_TOKENS)]
Frames = Annotated[int, Meta(ge=1, le=MAX_FRAMES)]
Side = Annotated[int, Meta(ge=1, le=MAX_SIDE)]
Window = Annotated[int, Meta(ge=0, le=MAX_WINDOW)]
Sequences = Annotated[int, Meta(ge=1, le=MAX_SEQUENCES)]
Lags = Annotated[int, Meta(ge=1, le=MAX_LAGS)]
NumPrompts = Annotated[int, Meta(ge=1, le=MAX_PROMPTS)]
Seed = Annotated[int, Meta(ge=0, le=MAX_SEED)]
GuidanceScale = Annotated[float, Meta(ge=0.0, le=MAX_GUIDANCE)]
# The window of ``wars``: a band's half-width (an integer, the paper's window) or a tiled
# shape (an object tagged by ``kind``, schema version 2).
WindowShape = Window | Tiles1d | Tiles2d | Tiles3d
# ``--window auto``'s measured residual error of each candidate window, by ``window_name``.
MAX_WINDOW_CANDIDATES = 64
WindowErrors = Annotated[
    dict[Annotated[str, Meta(min_length=1, max_length=64)], Annotated[float, Meta(ge=0.0)]],
    Meta(max_length=MAX_WINDOW_CANDIDATES),
]


class PlanError(ValueError):
    """A plan that cannot be read, is inconsistent, or does not fit the model."""


class ModelInfo(Struct, forbid_unknown_fields=True, frozen=True):
    """Which transformer the plan was calibrated for."""

    class_name: Annotated[str, Meta(min_length=1)]
    name: Annotated[str, Meta(min_length=1)]
    config_hash: Hex64
    num_layers: NumLayers
    num_heads: NumHeads
    head_dim: HeadDim


class Tokens(Struct, forbid_unknown_fields=True, frozen=True):
    """Image tokens N (per frame for video), the size that gave them, the frame count, and
    the text tokens of a joint (MMDiT) model's attention sequence (schema version 3)."""

    num_tokens: NumTokens
    height: Side | None = None
    width: Side | None = None
    frames: Frames | None = None
    text_tokens: NumTokens | None = None


class Layer(Struct, forbid_unknown_fields=True, frozen=True):
    """One self-attention layer of a video or joint-attention DiT.

    A ``spatial`` layer attends over the ``num_tokens`` image tokens of each frame
    (``sequences`` = frames per sample); a ``temporal`` layer attends over the frames
    of each token position (``num_tokens`` = frames, ``sequences`` = image tokens); a
    ``joint`` layer (MMDiT, schema version 3) attends over the ``num_tokens`` image
    tokens and ``text_tokens`` text tokens together.
    ``window`` is this layer's window: a band half-width in its own tokens (frames for
    temporal layers, which always keep a band), or a tiled shape of a spatial layer. On a
    joint layer it is an arrow: image queries see the window over the image tokens plus
    every text token, text queries see every token.
    """

    kind: LayerKind
    num_tokens: NumTokens
    window: WindowShape
    sequences: Sequences = 1
    text_tokens: TextTokens = 0


class Sampling(Struct, forbid_unknown_fields=True, frozen=True):
    """How the pipeline samples: scheduler, step count and classifier-free guidance.

    ``cfg_mode`` (schema version 3) says how CFG runs: ``batched`` (one transformer call
    per step, both halves in its batch, in ``cfg_order``), ``separate`` (two calls per
    step, conditional first) or ``none``. Absent, it is ``batched`` when ``cfg`` is on,
    else ``none`` (``cfg_mode_of``).
    """

    scheduler: Annotated[str, Meta(min_length=1)]
    num_steps: NumSteps
    cfg: bool
    cfg_order: CfgOrder | None = None
    guidance_scale: GuidanceScale | None = None
    cfg_mode: CfgMode | None = None


class Calibration(Struct, forbid_unknown_fields=True, frozen=True):
    """How the plan was searched. Absent for hand-written plans."""

    delta: Annotated[float, Meta(gt=0.0, le=1.0)]
    metric: Literal["rel_l1"]
    prompts_hash: Hex64
    num_prompts: NumPrompts
    seed: Seed
    search: Annotated[str, Meta(min_length=1)] = "greedy"
    world_size: PosInt = 1  # data-parallel ranks that shared the calibration prompts
    window_errors: WindowErrors | None = None  # --window auto: each candidate's error; the least won


class Costs(Struct, forbid_unknown_fields=True, frozen=True):
    """FLOPs of one transformer forward, counted on the model when it was planned (schema 4).

    ``attention[i]``: self-attention layer ``i``'s attention proper (scores and weighted
    values, all keys); ``projections[i]``: its q/k/v and output projections; ``ffn[j]``:
    feed-forward layer ``j``; ``other``: the rest (embeddings, norms, cross-attention, the
    output layer). Only their ratios are used.
    """

    attention: list[Annotated[float, Meta(ge=0.0)]]
    projections: list[Annotated[float, Meta(ge=0.0)]]
    ffn: list[Annotated[float, Meta(ge=0.0)]]
    other: Annotated[float, Meta(ge=0.0)]


class HeadCell(Struct, forbid_unknown_fields=True, frozen=True):
    """Per-head methods of one ``wars`` layer-step (schema version 5).

    ``methods`` has one letter per head: ``f`` full attention, ``w`` the window plus the
    head's part of the layer's residual, ``a`` the head's output (before the output
    projection) of the layer's last computed step. Heads of one letter run together.
    """

    step: NonNegInt
    layer: NonNegInt
    methods: Annotated[str, Meta(pattern="^[fwa]+$", max_length=MAX_HEADS)]


class Summary(Struct, forbid_unknown_fields=True, frozen=True):
    """Figures derived from the grid; checked against it on decode.

    ``ffn_flops_fraction`` (with ``$.ffn``): feed-forward FLOPs computed over all-``compute``;
    ``transformer_flops_fraction`` (with ``$.costs``): the whole transformer's FLOPs kept,
    attention, projections, feed-forward and the rest together.
    """

    attention_flops_fraction: Fraction
    method_counts: dict[Method, NonNegInt]
    time_fraction: Annotated[float, Meta(ge=0.0, le=100.0)] | None = None  # predicted, from $.latency
    ffn_flops_fraction: Fraction | None = None
    transformer_flops_fraction: Fraction | None = None


class Plan(Struct, forbid_unknown_fields=True, frozen=True):
    """A DiTFastAttn plan: a method per (step, layer) plus everything needed to trust it.

    ``methods[t][i]`` is the method of self-attention layer ``i`` at denoising step
    ``t`` (``forecast``, schema version 4: the layer's last two computed outputs
    extrapolated to this step's timestep, first order; ``runtime/processor.py``); ``window`` is the window of every ``wars`` step: an integer is the half-width
    ``w`` (in tokens) of the band, query ``i`` sees keys ``i - w .. i + w``; an object is
    a tiled shape (``schemas/windows.py``). ``losses[t][i]``, when present, is the
    calibration loss of the kept decision (``None`` where none was measured).
    ``layers`` describes each layer of a video DiT (kind, tokens, window); image
    plans leave it out, and every layer then attends over ``tokens.num_tokens`` with
    ``window``.
    ``ffn[t][j]`` (schema version 4) is the method of feed-forward layer ``j`` at step
    ``t`` (``runtime/feedforward.py``): ``compute``; ``reuse``, its last computed output;
    ``forecast``, its last two extrapolated to this step's timestep, first order.
    ``costs`` gives the FLOPs the summary's transformer fraction weighs by.
    ``heads`` (schema version 5) refines ``wars`` cells per head (``HeadCell``); a cell
    not listed runs its method on every head.
    """

    schema_version: int
    tool_version: Annotated[str, Meta(min_length=1)]
    model: ModelInfo
    tokens: Tokens
    sampling: Sampling
    window: WindowShape
    methods: list[list[Method]]
    summary: Summary
    calibration: Calibration | None = None
    losses: list[list[Annotated[float, Meta(ge=0.0)] | None]] | None = None
    layers: list[Layer] | None = None
    latency: Latency | None = None
    ffn: list[list[FfnMethod]] | None = None
    costs: Costs | None = None
    heads: Annotated[list[HeadCell], Meta(max_length=MAX_STEPS * MAX_LAYERS)] | None = None


def head_cells(plan: Plan) -> dict[tuple[int, int], str]:
    """The plan's per-head cells: ``(step, layer)`` -> one method letter per head."""
    return {(c.step, c.layer): c.methods for c in plan.heads or ()}


def head_cost(letters: str, num_tokens: int, window: WindowShape, text_tokens: int = 0) -> float:
    """Attention FLOPs of a per-head cell as a fraction of full: the mean of its heads' costs."""
    costs = {c: method_cost(m, num_tokens, window, text_tokens) for c, m in HEAD_LETTERS.items()}
    return sum(costs[c] for c in letters) / len(letters)


def with_latency(plan: Plan, latency: Latency | None) -> Plan:
    """``plan`` carrying ``latency`` and the time fraction it predicts for the grid."""
    heads = head_cells(plan)
    problem = check_latency(latency, plan.methods, plan.sampling.cfg, heads) if latency is not None else None
    if problem is not None:
        raise PlanError(f"$.latency.{problem}")
    fraction = time_fraction(plan.methods, latency, heads) if latency is not None else None
    summary = msgspec.structs.replace(plan.summary, time_fraction=fraction)
    return msgspec.structs.replace(plan, latency=latency, summary=summary)


def with_figures(plan: Plan) -> Plan:
    """``plan`` with its summary's feed-forward and transformer fractions derived from the grids."""
    ffn, total = flops_fractions(plan)
    summary = msgspec.structs.replace(plan.summary, ffn_flops_fraction=ffn, transformer_flops_fraction=total)
    return msgspec.structs.replace(plan, summary=summary)


def flops_fractions(plan: Plan) -> tuple[float | None, float | None]:
    """(feed-forward, transformer) FLOPs kept: ``None`` without ``$.ffn`` (resp. ``$.costs``).

    Feed-forward layers weigh by ``costs.ffn`` (equally without costs). The transformer
    fraction counts per step each attention layer's attention at its method's cost, its
    projections at ``PROJECTED``'s share, each feed-forward layer when computed, and the rest.
    """
    costs, steps = plan.costs, len(plan.methods)
    ffn_grid = plan.ffn
    ffn_weights = list(costs.ffn) if costs is not None else [1.0] * len(ffn_grid[0] if ffn_grid else ())
    ffn_kept = ffn_full = 0.0
    for t in range(steps):
        for j, weight in enumerate(ffn_weights):
            ffn_full += weight
            ffn_kept += weight if ffn_grid is None or ffn_grid[t][j] == "compute" else 0.0
    ffn = (ffn_kept / ffn_full if ffn_full else 1.0) if ffn_grid is not None else None
    if costs is None:
        return ffn, None
    layers, heads = plan_layers(plan), head_cells(plan)
    kept = steps * costs.other + ffn_kept
    full = steps * (costs.other + sum(costs.attention) + sum(costs.projections)) + ffn_full
    for t, row in enumerate(plan.methods):
        for i, m in enumerate(row):
            kept += costs.attention[i] * cell_cost(m, layers[i], heads.get((t, i)))
            kept += costs.projections[i] * PROJECTED[m]
    return ffn, (kept / full if full else 1.0)


def cfg_mode_of(sampling: Sampling) -> str:
    """The CFG mode: ``sampling.cfg_mode``, else ``batched`` with CFG and ``none`` without."""
    if sampling.cfg_mode is not None:
        return sampling.cfg_mode
    return "batched" if sampling.cfg else "none"


def plan_layers(plan: Plan) -> list[Layer]:
    """Every layer's kind, tokens and window; image plans give uniform spatial layers."""
    if plan.layers is not None:
        return list(plan.layers)
    return [Layer("spatial", plan.tokens.num_tokens, plan.window)] * plan.model.num_layers


class _Header(Struct):
    schema_version: Any = None


# ---------------------------------------------------------------------------
# derived figures


def window_pairs(num_tokens: int, window: WindowShape, text_tokens: int = 0) -> int:
    """Number of (query, key) pairs inside the window over N image tokens: for a band of
    half-width ``w``, those with ``|i - j| <= w``; for a tiled shape, N times the keys of
    each query. With ``T = text_tokens`` the window is an arrow over the joint sequence:
    the image pairs, plus N x T image-to-text pairs, plus T x (N + T) for the text queries."""
    if isinstance(window, TILED):
        image = tiled_pairs(window, num_tokens)
    else:
        n, w = num_tokens, min(window, num_tokens - 1)
        image = n * (2 * w + 1) - w * (w + 1)
    return image + num_tokens * text_tokens + text_tokens * (num_tokens + text_tokens)


def window_name(window: WindowShape) -> str:
    """``band:W``, ``tiles1d:T:K``, ``tiles2d:THxTW:K`` or ``tiles3d:TFxTHxTW:K`` (``--window``'s forms)."""
    return tiled_name(window) if isinstance(window, TILED) else f"band:{window}"


def method_cost(method: str, num_tokens: int, window: WindowShape, text_tokens: int = 0) -> float:
    """Attention FLOPs of one layer-step under ``method``, as a fraction of full attention
    (over the joint sequence of ``num_tokens + text_tokens`` tokens)."""
    total = num_tokens + text_tokens
    band = window_pairs(num_tokens, window, text_tokens) / (total * total)
    return {"full": 1.0, "asc": 0.5, "wars": band, "wars_asc": band / 2, "ast": 0.0, "forecast": 0.0}[method]


def cell_cost(method: str, layer: Layer, letters: str | None = None) -> float:
    """Attention FLOPs of one layer-step as a fraction of full: ``method``'s, or with
    per-head ``letters`` the mean of the heads' (``head_cost``)."""
    if letters is not None:
        return head_cost(letters, layer.num_tokens, layer.window, layer.text_tokens)
    return method_cost(method, layer.num_tokens, layer.window, layer.text_tokens)


def layer_weight(layer: Layer) -> int:
    """Full attention FLOPs of one layer per sample, in units of query-key pairs."""
    total = layer.num_tokens + layer.text_tokens
    return layer.sequences * total * total


def summarize(
    methods: list[list[str]],
    num_tokens: int,
    window: WindowShape,
    layers: list[Layer] | None = None,
    heads: Heads | None = None,
) -> Summary:
    """Attention FLOPs kept (weighted by each layer's full cost) and method counts for a
    grid; a per-head cell of ``heads`` (counted under its grid method) at its heads' mean."""
    counts = {m: 0 for m in METHODS}
    kept = total = 0.0
    uniform = Layer("spatial", num_tokens, window)
    for t, row in enumerate(methods):
        for i, m in enumerate(row):
            counts[m] += 1
            layer = layers[i] if layers is not None and i < len(layers) else None
            weight = layer_weight(layer) if layer is not None else 1
            kept += weight * cell_cost(m, layer or uniform, heads.get((t, i)) if heads else None)
            total += weight
    fraction = kept / total if total else 1.0
    return Summary(attention_flops_fraction=fraction, method_counts=counts)


def config_hash(config: dict[str, Any]) -> str:
    """Stable sha256 of a model config, ignoring private keys (``_name_or_path`` ...)."""
    public = {k: v for k, v in config.items() if not str(k).startswith("_")}
    return hashlib.sha256(msgspec.json.encode(public, order="sorted")).hexdigest()


# ---------------------------------------------------------------------------
# decoding


_PATH = re.compile(r"\.([A-Za-z_][A-Za-z_0-9]*)|\[(\d+)\]")


def _value_at(doc: Any, path: str) -> Any:
    """Follow a msgspec error path such as ``$.methods[3][1]`` into a generic document."""
    node = doc
    for key, index in _PATH.findall(path.removeprefix("$")):
        node = node[key] if key else node[int(index)]
    return node


def _with_value(message: str, raw: bytes) -> str:
    match = re.search(r"at `(\$[^`]*)`", message)
    if not match:
        return message
    try:
        value = _value_at(msgspec.json.decode(raw), match.group(1))
    except (msgspec.DecodeError, RecursionError, KeyError, IndexError, TypeError):
        return message
    shown = msgspec.json.encode(value).decode()
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{message} (got {shown})"


def decode_plan(raw: bytes | str) -> Plan:
    """Decode and check a plan; any input gives a ``Plan`` or raises ``PlanError``."""
    try:
        raw = raw.encode() if isinstance(raw, str) else raw
    except UnicodeEncodeError as exc:
        raise PlanError(f"invalid plan: character {exc.start} cannot be written as UTF-8") from None
    try:
        str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError(f"invalid plan: not UTF-8 at byte {exc.start}") from None
    try:
        header = msgspec.json.decode(raw, type=_Header)
    except msgspec.DecodeError as exc:
        raise PlanError(f"not a plan: {exc}") from None
    except RecursionError:
        raise PlanError("invalid plan: nested too deeply") from None
    version = header.schema_version
    if version is None:
        raise PlanError("$.schema_version: missing; not a ditfastattn plan")
    if type(version) is not int or version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise PlanError(
            f"$.schema_version: unsupported plan schema version {version!r}; "
            f"this build reads version {readable}"
        )
    try:
        plan = msgspec.json.decode(raw, type=Plan)
    except RecursionError:
        raise PlanError("invalid plan: nested too deeply") from None
    except msgspec.DecodeError as exc:
        raise PlanError(f"invalid plan: {_with_value(str(exc), raw)}") from None
    check_plan(plan)
    return plan


def check_constraints(value: Struct, error: type[PlanError] = PlanError, what: str = "plan") -> None:
    """Apply the field limits that decoding applies and building a ``Struct`` skips."""
    try:
        msgspec.convert(msgspec.to_builtins(value), type(value))
    except msgspec.ValidationError as exc:
        raise error(f"invalid {what}: {exc}") from None


def encode_plan(plan: Plan) -> bytes:
    """Encode a checked plan as readable JSON: one line per step for the grids."""
    check_constraints(plan)
    check_plan(plan)
    fields = []
    for key, value in msgspec.to_builtins(plan).items():
        if key in ("methods", "losses", "heads") and value is not None:
            rows = ",\n    ".join(msgspec.json.encode(row).decode() for row in value)
            text = f"[\n    {rows}\n  ]"
        else:
            text = msgspec.json.format(msgspec.json.encode(value), indent=2).decode()
            text = text.replace("\n", "\n  ")
        fields.append(f'  "{key}": {text}')
    return ("{\n" + ",\n".join(fields) + "\n}\n").encode()


def check_plan(plan: Plan) -> None:
    """Cross-field rules; raises ``PlanError`` naming the offending field."""
    steps, layers = plan.sampling.num_steps, plan.model.num_layers
    if len(plan.methods) != steps:
        raise PlanError(
            f"$.methods: grid has {len(plan.methods)} steps, sampling.num_steps is {steps}"
        )
    for t, row in enumerate(plan.methods):
        if len(row) != layers:
            raise PlanError(
                f"$.methods[{t}]: row has {len(row)} layers, model.num_layers is {layers}"
            )
    for i, m in enumerate(plan.methods[0]):
        if m != "full":
            raise PlanError(f"$.methods[0][{i}]: step 0 must be 'full' (got {m!r})")
    _check_layers(plan)
    _check_shapes(plan)
    _check_forecasts(plan)
    uses = {m for row in plan.methods for m in row}
    if plan.layers is None and uses & {"wars", "wars_asc"}:
        _check_window("$.window", plan.window, plan.tokens.num_tokens)
    for i, layer in enumerate(plan.layers or ()):
        if any(row[i] in ("wars", "wars_asc") for row in plan.methods):
            _check_window(f"$.layers[{i}].window", layer.window, layer.num_tokens)
    if uses & {"asc", "wars_asc"} and not plan.sampling.cfg:
        t, i = next(
            (t, i)
            for t, row in enumerate(plan.methods)
            for i, m in enumerate(row)
            if m in ("asc", "wars_asc")
        )
        raise PlanError(
            f"$.methods[{t}][{i}]: {plan.methods[t][i]!r} shares across CFG halves "
            "but sampling.cfg is false"
        )
    _check_cfg(plan)
    if plan.losses is not None:
        if len(plan.losses) != steps or any(len(r) != layers for r in plan.losses):
            raise PlanError("$.losses: must have the same steps x layers shape as $.methods")
        for t, row in enumerate(plan.losses):
            for i, loss in enumerate(row):
                if loss is not None and not math.isfinite(loss):
                    raise PlanError(f"$.losses[{t}][{i}]: must be finite (got {loss!r})")
    _check_heads(plan)
    expected = summarize(plan.methods, plan.tokens.num_tokens, plan.window, plan.layers, head_cells(plan))
    for method in METHODS:
        got = plan.summary.method_counts.get(method, 0)
        if got != expected.method_counts[method]:
            raise PlanError(
                f"$.summary.method_counts.{method}: says {got}, the grid has "
                f"{expected.method_counts[method]}"
            )
    _check_time(plan)
    _check_ffn(plan)
    got_fraction = plan.summary.attention_flops_fraction
    if not math.isclose(got_fraction, expected.attention_flops_fraction, abs_tol=1e-9):
        raise PlanError(
            f"$.summary.attention_flops_fraction: says {got_fraction}, the grid gives "
            f"{expected.attention_flops_fraction:.12g}"
        )


def _check_heads(plan: Plan) -> None:
    """Per-head cells (version 5): each refines a ``wars`` cell, one letter per head, in
    (step, layer) order, and is not all ``w`` (that is the plain ``wars`` cell)."""
    if plan.heads is None:
        return
    if plan.schema_version < 5:
        raise PlanError(f"$.heads: needs schema_version 5 (got {plan.schema_version})")
    previous = None
    for k, cell in enumerate(plan.heads):
        field = f"$.heads[{k}]"
        if cell.step >= len(plan.methods) or cell.layer >= plan.model.num_layers:
            raise PlanError(
                f"{field}: step {cell.step}, layer {cell.layer} is outside the "
                f"{len(plan.methods)} x {plan.model.num_layers} grid"
            )
        if previous is not None and (cell.step, cell.layer) <= previous:
            raise PlanError(f"{field}: cells must be in (step, layer) order, each once")
        previous = cell.step, cell.layer
        method = plan.methods[cell.step][cell.layer]
        if method != "wars":
            raise PlanError(f"{field}: per-head methods refine a 'wars' cell, $.methods[{cell.step}][{cell.layer}] is {method!r}")
        if len(cell.methods) != plan.model.num_heads:
            raise PlanError(
                f"{field}.methods: {len(cell.methods)} letters, model.num_heads is {plan.model.num_heads}"
            )
        if set(cell.methods) == {"w"}:
            raise PlanError(f"{field}.methods: every head runs 'wars'; that is the plain 'wars' cell")


def _check_time(plan: Plan) -> None:
    got = plan.summary.time_fraction
    if plan.latency is None:
        if got is not None:
            raise PlanError("$.summary.time_fraction: a predicted time needs $.latency")
        return
    heads = head_cells(plan)
    problem = check_latency(plan.latency, plan.methods, plan.sampling.cfg, heads)
    if problem is not None:
        raise PlanError(f"$.latency.{problem}")
    expected = time_fraction(plan.methods, plan.latency, heads)
    if got is None or not math.isclose(got, expected, rel_tol=1e-9):
        raise PlanError(f"$.summary.time_fraction: says {got}, the grid and $.latency give {expected:.12g}")


def _check_window(field: str, window: WindowShape, num_tokens: int) -> None:
    if isinstance(window, TILED):  # fits its layer: _check_shapes
        return
    if window < 1:
        raise PlanError(f"{field}: 'wars' methods need a window >= 1 (got {window})")
    if window > num_tokens - 1:
        raise PlanError(f"{field}: {window} exceeds the layer's tokens - 1 = {num_tokens - 1}")


def _check_shapes(plan: Plan) -> None:
    """Tiled windows: schema version 2, spatial layers only, tiles that divide the layer's grid."""
    tokens = plan.tokens
    windows = [("$.window", plan.window, tokens.num_tokens, "spatial")]
    windows += [(f"$.layers[{i}].window", x.window, x.num_tokens, x.kind) for i, x in enumerate(plan.layers or ())]
    for field, window, num_tokens, kind in windows:
        if not isinstance(window, TILED):
            continue
        if plan.schema_version < 2:
            raise PlanError(f"{field}: tiled windows need schema_version 2 (got {plan.schema_version})")
        if kind == "temporal":
            raise PlanError(f"{field}: a temporal layer keeps a band over frames (got {window_name(window)})")
        problem = tiles_problem(window, num_tokens, tokens.height, tokens.width)
        if problem is not None:
            raise PlanError(f"{field}.{problem}")
    errors = plan.calibration.window_errors if plan.calibration is not None else None
    if errors is not None:
        for name, error in errors.items():
            if not math.isfinite(error):
                raise PlanError(f"$.calibration.window_errors.{name}: must be finite (got {error!r})")
        if window_name(plan.window) not in errors:
            raise PlanError(
                f"$.calibration.window_errors: measures no {window_name(plan.window)}, the plan's window"
            )


def _check_forecasts(plan: Plan) -> None:
    """``forecast`` (version 4) only where the layer has computed two outputs before."""
    _check_forecast_columns("$.methods", plan.methods, plan.model.num_layers, plan.schema_version, "ast")


def _check_forecast_columns(field: str, grid: list[list[str]], width: int, version: int, reuse: str) -> None:
    for i in range(width):
        computed = 0
        for t, row in enumerate(grid):
            if row[i] != "forecast":
                computed += row[i] != reuse
                continue
            if version < 4:
                raise PlanError(f"{field}[{t}][{i}]: 'forecast' needs schema_version 4 (got {version})")
            if computed < 2:
                raise PlanError(
                    f"{field}[{t}][{i}]: 'forecast' needs two earlier computed steps of the layer, it has {computed}"
                )


def _check_ffn(plan: Plan) -> None:
    """The feed-forward grid and the costs (version 4), and the summary's fractions of them."""
    grid, costs, summary = plan.ffn, plan.costs, plan.summary
    for name, value in (("ffn", grid), ("costs", costs)):
        if value is not None and plan.schema_version < 4:
            raise PlanError(f"$.{name}: needs schema_version 4 (got {plan.schema_version})")
    width = None
    if grid is not None:
        if len(grid) != len(plan.methods):
            raise PlanError(f"$.ffn: grid has {len(grid)} steps, sampling.num_steps is {len(plan.methods)}")
        width = len(grid[0])
        for t, row in enumerate(grid):
            if len(row) != width:
                raise PlanError(f"$.ffn[{t}]: row has {len(row)} feed-forward layers, $.ffn[0] has {width}")
        for j, m in enumerate(grid[0]):
            if m != "compute":
                raise PlanError(f"$.ffn[0][{j}]: step 0 must be 'compute' (got {m!r})")
        _check_forecast_columns("$.ffn", grid, width, plan.schema_version, "reuse")
    if costs is not None:
        layers = plan.model.num_layers
        for name in ("attention", "projections"):
            if len(getattr(costs, name)) != layers:
                raise PlanError(f"$.costs.{name}: {len(getattr(costs, name))} entries, model.num_layers is {layers}")
        if width is not None and len(costs.ffn) != width:
            raise PlanError(f"$.costs.ffn: {len(costs.ffn)} entries, $.ffn has {width} feed-forward layers")
        for name in ("attention", "projections", "ffn"):
            for k, value in enumerate(getattr(costs, name)):
                if not math.isfinite(value):
                    raise PlanError(f"$.costs.{name}[{k}]: must be finite (got {value!r})")
        if not math.isfinite(costs.other):
            raise PlanError(f"$.costs.other: must be finite (got {costs.other!r})")
    ffn, total = flops_fractions(plan)
    for name, got, expected in (
        ("ffn_flops_fraction", summary.ffn_flops_fraction, ffn),
        ("transformer_flops_fraction", summary.transformer_flops_fraction, total),
    ):
        if (got is None) != (expected is None) or (
            got is not None and not math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12)
        ):
            needs = "$.ffn" if name.startswith("ffn") else "$.costs"
            shown = f"{expected:.12g}" if expected is not None else f"nothing without {needs}"
            raise PlanError(f"$.summary.{name}: says {got}, the grids give {shown}")


def _check_cfg(plan: Plan) -> None:
    """``cfg_mode`` (version 3) against ``cfg`` and ``cfg_order``."""
    sampling = plan.sampling
    mode = cfg_mode_of(sampling)
    if sampling.cfg_mode is not None and plan.schema_version < 3:
        raise PlanError(f"$.sampling.cfg_mode: needs schema_version 3 (got {plan.schema_version})")
    if sampling.cfg != (mode != "none"):
        state = "true" if sampling.cfg else "false"
        raise PlanError(f"$.sampling.cfg_mode: {mode!r} does not fit sampling.cfg = {state}")
    if mode == "batched" and sampling.cfg_order is None:
        raise PlanError("$.sampling.cfg_order: required when sampling.cfg is true and CFG is batched")
    if mode == "separate" and sampling.cfg_order is not None:
        raise PlanError("$.sampling.cfg_order: must be null with cfg_mode 'separate' (one call per CFG half)")


def _check_layers(plan: Plan) -> None:
    tokens = plan.tokens
    joint = [i for i, layer in enumerate(plan.layers or ()) if layer.kind == "joint"]
    if tokens.text_tokens is not None:
        if plan.schema_version < 3:
            raise PlanError(f"$.tokens.text_tokens: needs schema_version 3 (got {plan.schema_version})")
        if not joint:
            raise PlanError("$.tokens.text_tokens: set, but no layer of $.layers is joint")
    if plan.layers is None:
        return
    if len(plan.layers) != plan.model.num_layers:
        raise PlanError(
            f"$.layers: {len(plan.layers)} entries, model.num_layers is {plan.model.num_layers}"
        )
    if joint and plan.schema_version < 3:
        raise PlanError(f"$.layers[{joint[0]}].kind: joint layers need schema_version 3 (got {plan.schema_version})")
    if joint and tokens.text_tokens is None:
        raise PlanError(f"$.tokens.text_tokens: required by the joint layer {joint[0]}")
    sources = {"spatial": "tokens.num_tokens", "joint": "tokens.num_tokens", "temporal": "tokens.frames"}
    for i, layer in enumerate(plan.layers):
        expected = tokens.frames if layer.kind == "temporal" else tokens.num_tokens
        if layer.num_tokens != expected:
            raise PlanError(
                f"$.layers[{i}].num_tokens: a {layer.kind} layer attends over {sources[layer.kind]} = "
                f"{expected}, got {layer.num_tokens}"
            )
        text = tokens.text_tokens if layer.kind == "joint" else 0
        if layer.text_tokens != text:
            what = f"tokens.text_tokens = {text}" if text else "no text tokens"
            raise PlanError(f"$.layers[{i}].text_tokens: a {layer.kind} layer has {what}, got {layer.text_tokens}")


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the plan format."""
    return msgspec.json.schema(Plan)
