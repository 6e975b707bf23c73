"""The profile artifact: what a calibration run measured, from which plans are compiled.

A profile holds, per denoising step ``t`` and per self-attention layer ``i`` of one
transformer, how far each DiTFastAttn method's output would be from full attention
on the calibration batch, and how much of such an error reaches the transformer's
output. It carries the same model fingerprint and calibration facts as a plan, is
encoded as msgpack (compact, never executable) and is checked on load like a plan.

Definitions (every distance is measured on the all-``full`` calibration trajectory;
``O_t`` is the layer's attention output after the output projection for the whole
CFG batch at step ``t``, ``o_t`` the per-head output before it, ``W_t`` the window
attention on the same q/k/v, ``R_t = o_t - W_t`` the residual, ``P`` the output
projection, ``c`` the conditional rows and ``copy`` their copy onto both halves):

- ``dist(X) = ||X - O_t||_2 / ||O_t||_2`` over the whole batch (a relative L2 distance;
  ``1 - dist`` is the similarity).
- ``ast[t][i][k-1]``: ``dist(O_{t-k})``, the output of ``k`` steps earlier.
- ``wars[t][i][k-1]``: ``dist(P(W_t + R_{t-k}))``, the residual of a ``full`` step ``k``
  steps earlier.
- ``wars_after_asc[t][i][k-1]``: ``dist(P(W_t + copy(R_{t-k}[c])))``, the residual of an
  ``asc`` step ``k`` steps earlier (its conditional rows stand for both halves).
- ``wars_asc[t][i][k-1]``: ``dist(copy(P(W_t[c] + R_{t-k}[c]))``.
- ``asc[t][i]``: ``dist(copy(O_t[c]))``, conditional against unconditional rows (step 0
  included, though step 0 always runs ``full``).
- ``forecast[t][i][p]`` (schema version 4): ``dist(O_a + (O_a - O_b) (τ_t - τ_a) / (τ_a - τ_b))``
  with ``a = t - j``, ``b = t - k`` for the ``p``-th pair ``1 <= j < k <= lags`` in the order
  (1, 2), (1, 3) … (1, lags), (2, 3) … (``forecast_pairs``), ``τ`` the steps' timesteps.
- ``output_norm[t][i]``: ``||O_t||_2``, which relates distances at different steps.
- ``loss[m][t][i]``: for each probed method ``m``, the greedy search's loss (relative L1
  of the transformer output, DESIGN §2) with layer ``i`` alone running ``m`` at step
  ``t`` on the caches of step ``t - 1``; ``loss[m][t][i] / dist_m(lag 1)`` is the layer's
  gain, the share of a layer error that reaches the output.

- ``step_weight[t]`` (schema version 4): how far an error of the transformer output at
  step ``t`` moves the final image, relative to the other steps (mean 1 over steps ``1 …``):
  ``||ΔX|| / ||δ_t|| × ||ε_t||`` normalized, where ``δ_t`` is a small perturbation of the
  step's output ``ε_t`` along ``ε_{t-1} - ε_t`` and ``ΔX`` the change of the pipeline's
  output it causes (``planner/sensitivity.py``).

- ``ffn_reuse[t][j][k-1]``, ``ffn_forecast[t][j][p]``, ``ffn_loss[t][j]`` (schema version 4):
  the same for feed-forward layer ``j``'s output ``F_t`` (``runtime/feedforward.py``):
  ``dist(F_{t-k})``, the forecast from the ``p``-th pair, and the search's loss with layer
  ``j`` alone reusing its step ``t - 1`` output.

- ``head_ast[t][i][h]``, ``head_wars[t][i][h]`` (schema version 5): per head ``h`` of the
  layer, lag 1 only, what replacing that head alone does, for per-head plans
  (``Plan.heads``): ``dist(P(o_t with head h replaced by o_{t-1}[h]))`` and
  ``dist(P(o_t with head h replaced by W_t[h] + R_{t-1}[h]))``, i.e.
  ``||P(o_t with head h replaced by X) - O_t||_2 / ||O_t||_2`` over the whole batch with
  ``X`` the head's output of the previous step (``head_ast``) or its window attention plus
  its residual of the previous step (``head_wars``). Both present or both absent.

``None`` marks what was not measured: step 0 (but for ``asc`` and ``output_norm``), lags
reaching before step 0, layers that ran with an attention mask.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from schemas.latency import CFG_VARIANTS, LATENCY_VARIANTS, Latency
from schemas.plan import (
    SCHEMA_VERSION,
    Calibration,
    Costs,
    HeadCell,
    Hex64,
    Lags,
    Layer,
    Method,
    ModelInfo,
    NumPrompts,
    Plan,
    PlanError,
    PosInt,
    Sampling,
    Seed,
    Tokens,
    WindowErrors,
    WindowShape,
    check_constraints,
    check_plan,
    summarize,
    with_figures,
)

PROFILE_SCHEMA_VERSION = 5  # 2: tiled windows (schemas/windows.py); 3: joint layers, CFG modes; 4: forecast; 5: heads
PROFILE_READABLE_VERSIONS = (1, 2, 3, 4, 5)
PROFILE_FORMAT = "ditfastattn-profile"

Distance = Annotated[float, Meta(ge=0.0)] | None
Grid2 = list[list[Distance]]
Grid3 = list[list[list[Distance]]]

CFG_MEASURES = ("wars_after_asc", "wars_asc", "asc")
CFG_METHODS = ("asc", "wars_asc")


class ProfileError(PlanError):
    """A profile that cannot be read, is inconsistent, or does not fit the model."""


class ProfileCalibration(Struct, forbid_unknown_fields=True, frozen=True):
    """What the profile was measured on: the calibration inputs and the output metric."""

    metric: Literal["rel_l1"]
    prompts_hash: Hex64
    num_prompts: NumPrompts
    seed: Seed
    world_size: PosInt = 1  # data-parallel ranks that shared the calibration prompts
    window_errors: WindowErrors | None = None  # --window auto: each candidate's error; the least won


class Measurements(Struct, forbid_unknown_fields=True, frozen=True):
    """Distances and probed losses, indexed ``[step][layer]`` (and ``[lag - 1]``; the
    per-head ones ``[step][layer][head]``).

    See the module docstring for the exact definitions. The CFG measures are
    ``None`` when the calibration ran without CFG.
    """

    ast: Grid3
    wars: Grid3
    wars_after_asc: Grid3 | None
    wars_asc: Grid3 | None
    asc: Grid2 | None
    output_norm: Grid2
    loss: dict[Method, Grid2]
    forecast: Grid3 | None = None
    step_weight: list[Annotated[float, Meta(ge=0.0)] | None] | None = None
    ffn_reuse: Grid3 | None = None
    ffn_forecast: Grid3 | None = None
    ffn_loss: Grid2 | None = None
    head_ast: Grid3 | None = None
    head_wars: Grid3 | None = None


def forecast_pairs(lags: int) -> list[tuple[int, int]]:
    """The lag pairs ``(j, k)``, ``1 <= j < k <= lags``, of ``Measurements.forecast``'s last index."""
    return [(j, k) for j in range(1, lags + 1) for k in range(j + 1, lags + 1)]


class Profile(Struct, forbid_unknown_fields=True, frozen=True):
    """Per-step, per-layer similarity measurements of one model on one calibration set.

    ``lags`` is how many earlier steps each cache measurement looks back; the
    compiler chains measurements for older caches.
    """

    format: Literal["ditfastattn-profile"]
    schema_version: int
    tool_version: Annotated[str, Meta(min_length=1)]
    model: ModelInfo
    tokens: Tokens
    sampling: Sampling
    window: WindowShape
    calibration: ProfileCalibration
    lags: Lags
    measurements: Measurements
    layers: list[Layer] | None = None
    latency: Latency | None = None
    costs: Costs | None = None


class _Header(Struct):
    format: Any = None
    schema_version: Any = None


def header_plan(
    profile: Profile,
    methods: list[list[str]] | None = None,
    ffn: list[list[str]] | None = None,
    heads: dict[tuple[int, int], str] | None = None,
) -> Plan:
    """A plan with the profile's header facts, ``methods`` (default all ``full``), the
    feed-forward grid ``ffn`` (default none) and the per-head cells ``heads``
    (``(step, layer)`` -> letters; default none), its summary derived.

    ``calibration`` is left out: a plan compiled from the profile adds its own.
    """
    steps, layers = profile.sampling.num_steps, profile.model.num_layers
    grid = methods if methods is not None else [["full"] * layers for _ in range(steps)]
    plan = Plan(
        schema_version=SCHEMA_VERSION,
        tool_version=profile.tool_version,
        model=profile.model,
        tokens=profile.tokens,
        sampling=profile.sampling,
        window=profile.window,
        methods=grid,
        summary=summarize(grid, profile.tokens.num_tokens, profile.window, profile.layers, heads or None),
        layers=profile.layers,
        ffn=ffn,
        costs=profile.costs,
        heads=[HeadCell(t, i, letters) for (t, i), letters in sorted(heads.items())] if heads else None,
    )
    return with_figures(plan)


def ffn_width(profile: Profile) -> int | None:
    """Feed-forward layers the profile measured (``None``: none measured)."""
    grid = profile.measurements.ffn_reuse
    return len(grid[0]) if grid else None


def profile_calibration(profile: Profile, delta: float, search: str = "profile") -> Calibration:
    """The ``calibration`` entry of a plan compiled from ``profile`` at ``delta``."""
    c = profile.calibration
    return Calibration(delta, c.metric, c.prompts_hash, c.num_prompts, c.seed, search, c.world_size, c.window_errors)


# ---------------------------------------------------------------------------
# checks


def check_profile(profile: Profile) -> None:
    """Cross-field rules; raises ``ProfileError`` naming the offending field.

    The grids are matched against the declared sizes first, so no later check does
    work sized by a declared number alone.
    """
    steps, layers, lags = profile.sampling.num_steps, profile.model.num_layers, profile.lags
    cfg = profile.sampling.cfg
    m = profile.measurements
    for name in ("ast", "wars", *CFG_MEASURES):
        grid = getattr(m, name)
        field = f"$.measurements.{name}"
        if (grid is not None) != cfg and name in CFG_MEASURES:
            state = "on" if cfg else "off"
            need = "required" if cfg else "must be null"
            raise ProfileError(f"{field}: {need} when sampling.cfg is {state}")
        if grid is not None:
            _check_grid(field, grid, steps, layers, lags if name != "asc" else None)
    _check_grid("$.measurements.output_norm", m.output_norm, steps, layers, None)
    if (m.forecast is not None or m.step_weight is not None) and profile.schema_version < 4:
        name = "forecast" if m.forecast is not None else "step_weight"
        raise ProfileError(f"$.measurements.{name}: needs schema_version 4 (got {profile.schema_version})")
    if m.forecast is not None:
        _check_pairs(m.forecast, steps, layers, lags)
    width = ffn_width(profile)
    for name in ("ffn_reuse", "ffn_forecast", "ffn_loss"):
        grid = getattr(m, name)
        if (grid is None) != (width is None):
            raise ProfileError(f"$.measurements.{name}: present only with the other feed-forward measures")
        if grid is not None and profile.schema_version < 4:
            raise ProfileError(f"$.measurements.{name}: needs schema_version 4 (got {profile.schema_version})")
    if width is not None:
        _check_grid("$.measurements.ffn_reuse", m.ffn_reuse, steps, width, lags, layer_name="feed-forward layers")
        _check_pairs(m.ffn_forecast, steps, width, lags, "$.measurements.ffn_forecast")
        _check_grid("$.measurements.ffn_loss", m.ffn_loss, steps, width, None, probes=True, layer_name="feed-forward layers")
    if profile.costs is not None and width is not None and len(profile.costs.ffn) != width:
        raise ProfileError(f"$.costs.ffn: {len(profile.costs.ffn)} entries, the profile measured {width} feed-forward layers")
    if m.step_weight is not None:
        if len(m.step_weight) != steps:
            raise ProfileError(f"$.measurements.step_weight: has {len(m.step_weight)} steps, sampling.num_steps is {steps}")
        for t, value in enumerate(m.step_weight):
            _check_value(f"$.measurements.step_weight[{t}]", value, "step 0 is always full" if t == 0 else "")
    for method, grid in m.loss.items():
        field = f"$.measurements.loss.{method}"
        if method == "full":
            raise ProfileError(f"{field}: 'full' is the reference, not a probe")
        if method in CFG_METHODS and not cfg:
            raise ProfileError(f"{field}: {method!r} shares across CFG halves but sampling.cfg is false")
        _check_grid(field, grid, steps, layers, None, probes=True)
    _check_heads(profile)
    if profile.latency is not None:
        _check_latency(profile.latency, cfg)
    try:
        # as a plan of the profile's version, with its calibration (window_errors)
        calibration = profile_calibration(profile, 1.0)
        header = header_plan(profile)
        check_plan(msgspec.structs.replace(header, schema_version=profile.schema_version, calibration=calibration))
    except ProfileError:
        raise
    except PlanError as exc:
        raise ProfileError(str(exc)) from None
    windows = [("$.window", profile.window, profile.tokens.num_tokens)]
    if profile.layers is not None:
        windows = [(f"$.layers[{i}].window", x.window, x.num_tokens) for i, x in enumerate(profile.layers)]
    for field, window, tokens in windows:
        if isinstance(window, int) and not 1 <= window <= tokens - 1:  # tiled ones: check_plan
            raise ProfileError(f"{field}: the window must be in 1 … tokens - 1 = {tokens - 1} (got {window})")


def _check_heads(profile: Profile) -> None:
    """The per-head measures (version 5): both or neither, ``steps x layers x model.num_heads``,
    null at step 0."""
    m = profile.measurements
    steps, layers, heads = profile.sampling.num_steps, profile.model.num_layers, profile.model.num_heads
    for name, other in (("head_ast", "head_wars"), ("head_wars", "head_ast")):
        grid = getattr(m, name)
        if grid is None:
            continue
        field = f"$.measurements.{name}"
        if profile.schema_version < 5:
            raise ProfileError(f"{field}: needs schema_version 5 (got {profile.schema_version})")
        if getattr(m, other) is None:
            raise ProfileError(f"{field}: present only with $.measurements.{other}")
        for t, i, cell in _cells(field, grid, steps, layers):
            if len(cell) != heads:
                raise ProfileError(f"{field}[{t}][{i}]: has {len(cell)} heads, model.num_heads is {heads}")
            for h, value in enumerate(cell):
                _check_value(f"{field}[{t}][{i}][{h}]", value, "no step -1" if t == 0 else "")


def _check_latency(latency: Latency, cfg: bool) -> None:
    needed = [v for v in LATENCY_VARIANTS if (cfg or v not in CFG_VARIANTS) and v != "forecast"]
    for variant in needed:
        if variant not in latency.seconds:
            raise ProfileError(f"$.latency.seconds: no figure for {variant!r}")
    extra = sorted(set(latency.seconds) - set(needed) - {"forecast"})
    if extra:
        raise ProfileError(f"$.latency.seconds.{extra[0]}: shares across CFG halves but sampling.cfg is false")
    for variant, value in latency.seconds.items():
        if not math.isfinite(value):
            raise ProfileError(f"$.latency.seconds.{variant}: must be finite (got {value!r})")


def _cells(field: str, grid: list, steps: int, layers: int, layer_name: str = "") -> Iterator[tuple[int, int, Any]]:
    """Each ``(t, i, cell)`` of a ``[step][layer]`` grid, its shape checked on the way."""
    if len(grid) != steps:
        raise ProfileError(f"{field}: has {len(grid)} steps, sampling.num_steps is {steps}")
    for t, row in enumerate(grid):
        if len(row) != layers:
            where = f"the profile has {layers} {layer_name}" if layer_name else f"model.num_layers is {layers}"
            raise ProfileError(f"{field}[{t}]: has {len(row)} layers, {where}")
        for i, cell in enumerate(row):
            yield t, i, cell


def _check_grid(
    field: str, grid: list, steps: int, layers: int, lags: int | None, *, probes: bool = False,
    layer_name: str = "",
) -> None:
    for t, i, cell in _cells(field, grid, steps, layers, layer_name):
        if lags is None:
            _check_value(f"{field}[{t}][{i}]", cell, "step 0 is always full" if t == 0 and probes else "")
            continue
        if len(cell) != lags:
            raise ProfileError(f"{field}[{t}][{i}]: has {len(cell)} lags, lags is {lags}")
        for k, value in enumerate(cell, start=1):
            _check_value(f"{field}[{t}][{i}][{k - 1}]", value, f"no step {t - k}" if k > t else "")


def _check_pairs(grid: Grid3, steps: int, layers: int, lags: int, field: str = "$.measurements.forecast") -> None:
    pairs = forecast_pairs(lags)
    for t, i, cell in _cells(field, grid, steps, layers):
        if len(cell) != len(pairs):
            raise ProfileError(f"{field}[{t}][{i}]: has {len(cell)} lag pairs, lags {lags} give {len(pairs)}")
        for p, ((_, k), value) in enumerate(zip(pairs, cell)):
            _check_value(f"{field}[{t}][{i}][{p}]", value, f"no step {t - k}" if k > t else "")


def _check_value(field: str, value: float | None, unmeasurable: str) -> None:
    if value is None:
        return
    if unmeasurable:
        raise ProfileError(f"{field}: must be null, {unmeasurable} (got {value!r})")
    if not math.isfinite(value):
        raise ProfileError(f"{field}: must be finite (got {value!r})")


# ---------------------------------------------------------------------------
# encoding


_PATH = re.compile(r"\.([A-Za-z_][A-Za-z_0-9]*)|\[(\d+)\]")


def _with_value(message: str, raw: bytes) -> str:
    match = re.search(r"at `(\$[^`]*)`", message)
    if not match:
        return message
    try:
        node = msgspec.msgpack.decode(raw)
        for key, index in _PATH.findall(match.group(1).removeprefix("$")):
            node = node[key] if key else node[int(index)]
        shown = repr(node)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, KeyError, IndexError, TypeError):
        return message
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{message} (got {shown})"


def decode_profile(raw: bytes) -> Profile:
    """Decode and check a profile; any input gives a ``Profile`` or raises ``ProfileError``."""
    try:
        header = msgspec.msgpack.decode(raw, type=_Header)
    except (msgspec.DecodeError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        raise ProfileError(f"not a profile: {exc}") from None
    if header.format != PROFILE_FORMAT:
        raise ProfileError(f"$.format: not a ditfastattn profile (got {header.format!r})")
    version = header.schema_version
    if type(version) is not int or version not in PROFILE_READABLE_VERSIONS:
        readable = ", ".join(map(str, PROFILE_READABLE_VERSIONS))
        raise ProfileError(
            f"$.schema_version: unsupported profile schema version {version!r}; "
            f"this build reads version {readable}"
        )
    try:
        profile = msgspec.msgpack.decode(raw, type=Profile)
    except UnicodeDecodeError as exc:
        raise ProfileError(f"invalid profile: a string is not UTF-8 at byte {exc.start}") from None
    except RecursionError:
        raise ProfileError("invalid profile: nested too deeply") from None
    except msgspec.DecodeError as exc:
        raise ProfileError(f"invalid profile: {_with_value(str(exc), raw)}") from None
    check_profile(profile)
    return profile


def encode_profile(profile: Profile) -> bytes:
    """Encode a checked profile as msgpack."""
    check_constraints(profile, ProfileError, "profile")
    check_profile(profile)
    return msgspec.msgpack.encode(profile)


def profile_json_schema() -> dict[str, Any]:
    """The JSON Schema of the profile document (the structure its msgpack encodes)."""
    return msgspec.json.schema(Profile)
