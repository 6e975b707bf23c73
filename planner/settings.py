"""Settings of ``planner build``: one validated pydantic model, from options or TOML."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from planner.build import DEFAULT_WINDOW_FRAC, BuildRequest
from planner.calibration import CAPTIONS, CLASS_IDS, read_prompts, take
from planner.errors import bad_input
from planner.profile import DEFAULT_LAGS, DEFAULT_PROBES
from planner.windows import parse_window
from planner.registry import ModelSpec
from schemas.plan import MAX_GUIDANCE, MAX_LAGS, MAX_PROMPTS, MAX_SEED, MAX_SIDE, MAX_STEPS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

Dtype = Literal["auto", "float32", "float16", "bfloat16"]



class BuildSettings(BaseModel):
    """What to calibrate and how. ``None`` means the model's default.

    Relative paths are taken from the working directory.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model: str = Field(min_length=1)
    delta: float = Field(gt=0.0, le=1.0)
    output: Path
    steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    height: int | None = Field(None, ge=1, le=MAX_SIDE)
    width: int | None = Field(None, ge=1, le=MAX_SIDE)
    resolution: int | None = Field(None, ge=1, le=MAX_SIDE)
    guidance: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE)
    window: str | None = None  # --window's forms (planner/windows.py); None: auto
    window_frac: float | None = Field(None, gt=0.0, le=1.0)
    prompts: Path | None = None
    num_prompts: int | None = Field(None, ge=1, le=MAX_PROMPTS)
    classes: list[int] | None = Field(None, min_length=1, max_length=MAX_PROMPTS)
    calib_batch: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str | None = None
    dtype: Dtype = "auto"
    baseline: bool = False
    search: Literal["greedy", "profile"] = "greedy"
    lags: int = Field(DEFAULT_LAGS, ge=1, le=MAX_LAGS)
    probes: list[Literal["ast", "wars_asc", "wars", "asc"]] = Field(list(DEFAULT_PROBES), min_length=1)
    combine: Literal["sum", "rss"] = "sum"
    latency: bool = True
    objective: Literal["time", "flops", "transformer"] | None = None
    ffn: bool = False  # feed-forward reuse: measured by the profile, compiled into the plan
    step_weights: bool = False  # the compiler weighs each step's budget by its effect on the result
    heads: bool = False  # the compiler may choose methods per head in window steps
    pick: Literal["cheapest", "ratio"] = "cheapest"  # how the compiler picks among fitting methods

    @field_validator("classes", "probes", mode="before")
    @classmethod
    def _split_classes(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("window", mode="before")
    @classmethod
    def _window_form(cls, value: Any) -> Any:
        return None if value is None else str(parse_window(value))

    @field_validator("classes")
    @classmethod
    def _class_ids(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(c < 0 for c in value):
            raise ValueError("class ids must be >= 0")
        return value

    @model_validator(mode="after")
    def _exclusive(self) -> BuildSettings:
        if self.resolution is not None and (self.height is not None or self.width is not None):
            raise ValueError("resolution: give --resolution or --height/--width, not both")
        if self.window not in (None, "auto") and self.window_frac is not None:
            raise ValueError("window: give --window or --window-frac, not both")
        if self.prompts is not None and self.classes is not None:
            raise ValueError("prompts: give --prompts (captions) or --classes (class ids), not both")
        compiler = {"lags", "probes", "combine", "objective", "ffn", "step_weights", "heads", "pick"}
        profiled = sorted(compiler & self.model_fields_set)
        if self.search == "greedy" and profiled:
            raise ValueError(f"{profiled[0]}: applies to --search profile only")
        return self

    @property
    def size(self) -> tuple[int | None, int | None]:
        """(height, width) asked for; ``None`` where the model's default applies."""
        if self.resolution is not None:
            return self.resolution, self.resolution
        return self.height, self.width


def describe(error: ValidationError) -> str:
    """The first rejected value of a validation error, as one line naming it."""
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    kind, message = first["type"], first["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return f"{where}: unknown setting"
    if kind == "missing":
        return f"{where}: required (give --{where.replace('_', '-')} or set it in the config file)"
    if not where:
        return message
    return f"{where}: {message[:1].lower()}{message[1:]} (got {first['input']!r})"


def read_config(path: Path) -> dict[str, Any]:
    """Settings from a TOML file; keys may use ``-`` or ``_``."""
    try:
        with path.open("rb") as handle:
            table = tomllib.load(handle)
    except OSError as exc:
        raise bad_input(f"config: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise bad_input(f"config: {str(path)!r} is not UTF-8 text (byte {exc.start}); give a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise bad_input(f"config: {str(path)!r} is not valid TOML: {exc}") from None
    return {key.replace("-", "_"): value for key, value in table.items()}


def load_settings(options: dict[str, Any], config: Path | None = None) -> BuildSettings:
    """Validated settings: the config file's values, overridden by options that are not ``None``."""
    values = read_config(config) if config is not None else {}
    values.update({key: value for key, value in options.items() if value is not None})
    try:
        return BuildSettings(**values)
    except ValidationError as exc:
        raise bad_input(describe(exc)) from None


def calibration_inputs(settings: BuildSettings, spec: ModelSpec) -> tuple[str, ...] | tuple[int, ...]:
    """Captions or class ids to calibrate ``spec``'s model on: given, the model's own, or the built-in set."""
    if spec.family.inputs == "classes":
        if settings.prompts is not None:
            raise bad_input(f"prompts: {spec.name} is class-conditional; use --classes")
        return tuple(take(settings.classes or list(spec.calibration or CLASS_IDS), settings.num_prompts, "class ids"))
    if settings.classes is not None:
        raise bad_input(f"classes: {spec.name} is calibrated on captions; use --prompts")
    captions = read_prompts(settings.prompts) if settings.prompts else list(spec.calibration or CAPTIONS)
    return tuple(take(captions, settings.num_prompts, "prompts"))


def build_request(settings: BuildSettings, spec: ModelSpec) -> BuildRequest:
    """The calibration run the settings ask for on ``spec``'s model, defaults filled in."""
    height, width = settings.size
    if height is None and width is None:  # the model card's size (FLUX's config has none)
        height = width = spec.resolution
    return BuildRequest(
        name=spec.name if spec.local else spec.source,
        inputs=calibration_inputs(settings, spec),
        delta=settings.delta,
        steps=settings.steps or spec.steps,
        guidance=settings.guidance if settings.guidance is not None else spec.guidance,
        height=height,
        width=width,
        window=settings.window or "auto",
        window_frac=settings.window_frac or DEFAULT_WINDOW_FRAC,
        seed=settings.seed,
        calib_batch=settings.calib_batch,
        call_kwargs=dict(spec.family.call_kwargs),
        latency=settings.latency,
        family=spec.family,
    )
