"""The ``planner`` command: build, show and validate DiTFastAttn plans."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

try:
    import typer
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table
    from rich.text import Text

    for _name in ("pydantic", "diffusers", "transformers"):
        if find_spec(_name) is None:
            raise ImportError(_name)
except ImportError:
    sys.stderr.write("planner needs the planner extra: pip install 'ditfastattn[planner]'\n")
    raise SystemExit(1) from None

from planner.errors import PlannerError

if TYPE_CHECKING:
    from planner.settings import BuildSettings
    from schemas import Plan

app = typer.Typer(
    name="planner",
    help="Calibrate DiTFastAttn plans for diffusers DiTs, and inspect them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


@app.callback()
def main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    """Calibrate DiTFastAttn plans for diffusers DiTs, and inspect them."""
    ctx.obj = {"debug": debug}


def fail(message: str, code: int) -> None:
    err.print(Text(f"error: {message}", style="red"), soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def reported(ctx: typer.Context) -> Iterator[None]:
    """Expected errors as one red line and an exit code; tracebacks only with --debug."""
    from schemas import PlanError

    debug = bool(ctx.obj and ctx.obj.get("debug"))
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        fail("interrupted; no plan written", 130)
    except PlannerError as exc:
        if debug:
            raise
        fail(str(exc), exc.exit_code)
    except PlanError as exc:
        if debug:
            raise
        fail(str(exc), 1)
    except Exception as exc:  # noqa: BLE001 - the last line of defence for users
        if debug:
            raise
        fail(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)


# ---------------------------------------------------------------------------
# build


@app.command()
def build(
    ctx: typer.Context,
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Registry name (see `planner models`), local pipeline folder or hub id.",
    ),
    delta: float | None = typer.Option(
        None, "--delta", "-d", help="Similarity threshold δ in (0, 1]; lower compresses more."
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Where to write the plan (JSON)."),
    steps: int | None = typer.Option(None, help="Denoising steps (default: the model's, 50)."),
    height: int | None = typer.Option(None, help="Image height in pixels (default: the model's)."),
    width: int | None = typer.Option(None, help="Image width in pixels (default: the model's)."),
    resolution: int | None = typer.Option(None, help="Square image size; instead of --height/--width."),
    guidance: float | None = typer.Option(
        None, help="CFG guidance scale; <= 1 turns CFG off (default: 4.5 PixArt, 4.0 DiT)."
    ),
    window: int | None = typer.Option(None, help="Window half-width w in tokens."),
    window_frac: float | None = typer.Option(
        None, help="Window half-width as a fraction of the token count (default: 1/8)."
    ),
    prompts: Path | None = typer.Option(
        None, help="Calibration captions, one per line (default: the built-in set)."
    ),
    num_prompts: int | None = typer.Option(None, help="Use the first N captions or class ids."),
    classes: str | None = typer.Option(
        None, help="DiT class ids, comma-separated (default: 8 built-in ImageNet classes)."
    ),
    calib_batch: int | None = typer.Option(
        None, help="Prompts per transformer call, to bound memory (default: all at once)."
    ),
    seed: int | None = typer.Option(None, help="Seed of the calibration latents (default: 0)."),
    device: str | None = typer.Option(
        None, help="Torch device (default: cuda when available, else cpu)."
    ),
    dtype: str | None = typer.Option(
        None, help="auto, float32, float16 or bfloat16 (default: auto = float16 on cuda, else float32)."
    ),
    baseline: bool | None = typer.Option(
        None,
        "--baseline/--no-baseline",
        help="Also time one plain generation, to compare the search with.",
    ),
    config: Path | None = typer.Option(
        None, "--config", help="TOML file of settings (same names); options given here override it."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary."),
) -> None:
    """Search a plan on a model's calibration batch and write it (DESIGN §2)."""
    options = dict(locals())
    for key in ("ctx", "config", "quiet"):
        options.pop(key)
    with reported(ctx):
        from planner.settings import load_settings

        settings = load_settings(options, config)
        run_build(settings, quiet=quiet)


def run_build(settings: BuildSettings, *, quiet: bool) -> None:
    """Load the model, search its plan with a progress bar, write it, and summarize."""
    from planner.build import build_plan, draft_plan, time_generation
    from planner.loading import load_pipeline, quiet_libraries, resolve_device, resolve_dtype
    from planner.output import check_writable, write_plan
    from planner.registry import resolve_model
    from planner.report import build_summary
    from planner.settings import build_request

    quiet_libraries()
    spec = resolve_model(settings.model)
    check_writable(settings.output)
    request = build_request(settings, spec)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    with err.status(f"loading {spec.name} on {device} ({str(dtype).removeprefix('torch.')})"):
        pipe = load_pipeline(spec, device, dtype)
    draft = draft_plan(pipe, request)  # refuses bad settings before any progress is shown
    with Progress(
        TextColumn("searching"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("step {task.fields[step]}/{task.fields[steps]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
        transient=True,
    ) as bar:
        cells = request.steps * draft.model.num_layers
        task = bar.add_task("search", total=cells, step=0, steps=request.steps)

        def advance(step: int, layer: int, method: str, loss: float | None) -> None:
            bar.update(task, advance=1, step=step + 1)

        result = build_plan(pipe, request, progress=advance)
    write_plan(result.plan, settings.output)
    if quiet:
        return
    plain = time_generation(pipe, request) if settings.baseline else None
    out.print(build_summary(result.plan, str(settings.output), result.seconds, plain))


# ---------------------------------------------------------------------------
# inspecting plans


@app.command()
def show(
    ctx: typer.Context,
    plan_file: Path = typer.Argument(..., metavar="PLAN.json", help="The plan to show."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary instead."),
) -> None:
    """Show a plan: its header facts, attention FLOPs kept, and the step x layer grid."""
    with reported(ctx):
        from planner.report import plan_facts, render_plan
        from runtime.loading import load_plan

        plan = load_plan(plan_file)
        if as_json:
            sys.stdout.write(json.dumps(plan_facts(plan), indent=2) + "\n")
        else:
            out.print(render_plan(plan))


@app.command()
def validate(
    ctx: typer.Context,
    plan_file: Path = typer.Argument(..., metavar="PLAN.json", help="The plan to check."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Also check that the plan fits this model (its config is enough)."
    ),
) -> None:
    """Check a plan (and that it fits a model): exit 0 if valid, 1 with the reason if not."""
    with reported(ctx):
        from runtime.loading import load_plan

        plan = load_plan(plan_file)
        fits = ""
        if model is not None:
            fits = f" and fits {check_fit(plan, model)}"
        out.print(
            Text(
                f"{plan_file}: valid plan ({plan.sampling.num_steps} steps x "
                f"{plan.model.num_layers} layers){fits}",
                style="green",
            ),
            soft_wrap=True,
        )


def check_fit(plan: Plan, model: str) -> str:
    """Apply ``plan`` to the model's transformer skeleton; the model's name when it fits."""
    import runtime
    from planner.loading import load_transformer_skeleton, quiet_libraries
    from planner.registry import resolve_model
    from schemas import PlanError

    quiet_libraries()
    spec = resolve_model(model)
    order = spec.family.cfg_order
    if plan.sampling.cfg and plan.sampling.cfg_order != order:
        raise PlanError(
            f"$.sampling.cfg_order: plan says {plan.sampling.cfg_order!r}, "
            f"{spec.family.pipeline} batches {order!r}"
        )
    runtime.apply(plan, load_transformer_skeleton(spec)).remove()
    return spec.name


@app.command()
def schema() -> None:
    """Print the JSON Schema of the plan format."""
    from schemas import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


@app.command()
def models(ctx: typer.Context) -> None:
    """List the model registry and which checkpoints are available locally."""
    with reported(ctx):
        from planner.registry import REGISTRY, is_available

        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("name", "checkpoint", "pipeline", "size", "steps", "guidance", "local"):
            table.add_column(column, no_wrap=column != "checkpoint", overflow="fold")
        for spec in REGISTRY:
            local = Text("yes", style="green") if is_available(spec) else Text("no", style="bright_black")
            table.add_row(
                "\n".join((spec.name, *(f"= {alias}" for alias in spec.aliases))),
                spec.source,
                spec.family.pipeline.removesuffix("Pipeline"),
                f"{spec.resolution}²",
                str(spec.steps),
                str(spec.guidance),
                local,
            )
        out.print(table)
        out.print("--model also takes a local pipeline folder or a hub id of a supported pipeline.")


if __name__ == "__main__":
    app(prog_name="planner")
