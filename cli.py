"""The ``planner`` command: build, show and validate DiTFastAttn plans."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    from planner.build import BuildRequest
    from planner.profile import ProfileResult
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


def step_progress(label: str, *, quiet: bool) -> Progress:
    """A progress bar over (step, layer) cells with the step and an ETA; drawn on rank 0 only."""
    from planner import distributed

    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("step {task.fields[step]}/{task.fields[steps]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        disable=quiet or not err.is_terminal or not distributed.is_writer(),
        transient=True,
    )


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
    window: str | None = typer.Option(
        None,
        help="Window of wars: auto (default: the band or a tiling of about the band's pairs, whichever "
        "leaves the least residual error on the calibration batch), W or band:W (half-width in tokens), "
        "tiles1d:T:K, tiles2d:THxTW:K, tiles3d:TFxTHxTW:K (tiles of the patch grid, K tiles each side).",
    ),
    window_frac: float | None = typer.Option(
        None, help="The band's half-width as a fraction of the token count, auto's target too (default: 1/8)."
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
    search: str | None = typer.Option(
        None,
        help="greedy: the faithful search (default); profile: profile once, then compile the plan.",
    ),
    lags: int | None = typer.Option(
        None, help="With --search profile: how many steps back caches are measured (default: 4)."
    ),
    probes: str | None = typer.Option(
        None, help="With --search profile: methods probed for each layer's gain (default: ast)."
    ),
    combine: str | None = typer.Option(
        None,
        help="With a profile: how a step's layer losses add up, sum (default: an upper bound) or rss.",
    ),
    pick: str | None = typer.Option(
        None,
        help="With a profile: of the methods that fit a layer-step's budget, take the cheapest "
        "(default) or the one saving the most cost per unit of predicted loss (ratio).",
    ),
    objective: str | None = typer.Option(
        None,
        help="With a profile: what the compiler minimises, time (default when latencies were measured), "
        "flops (attention FLOPs kept) or transformer (all the transformer's FLOPs; with --ffn).",
    ),
    ffn: bool | None = typer.Option(
        None,
        "--ffn/--no-ffn",
        help="With a profile: also choose per step and feed-forward layer compute, reuse or forecast "
        "(objective transformer; default: off).",
    ),
    step_weights: bool | None = typer.Option(
        None,
        "--step-weights/--no-step-weights",
        help="With a profile: share each step's error budget by how far that step's errors move the "
        "final image, as the profile measured (default: off; it wins on dit-digits, not on pixart-digits).",
    ),
    heads: bool | None = typer.Option(
        None,
        "--heads/--no-heads",
        help="With a profile: a window step may also run full, window or reuse per head, as the "
        "profile's per-head distances allow (default: off).",
    ),
    latency: bool | None = typer.Option(
        None,
        "--latency/--no-latency",
        help="Measure each method's latency on this device first; methods not faster than full "
        "are never chosen (default: on).",
    ),
    from_profile: Path | None = typer.Option(
        None,
        "--from-profile",
        help="Compile the plan from this profile (see `planner profile`) without running the model.",
    ),
    config: Path | None = typer.Option(
        None, "--config", help="TOML file of settings (same names); options given here override it."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary."),
) -> None:
    """Search a plan on a model's calibration batch and write it (DESIGN §2)."""
    options = dict(locals())
    for key in ("ctx", "config", "quiet", "from_profile"):
        options.pop(key)
    with reported(ctx):
        if from_profile is not None:
            if config is not None:
                raise PlannerError("config: settings are fixed by the profile with --from-profile", exit_code=2)
            run_compile(from_profile, options, quiet=quiet)
            return
        from planner.output import check_writable
        from planner.settings import load_settings

        settings = load_settings(options, config)
        check_writable(settings.output, inputs={"prompts": settings.prompts, "config": config})
        run_build(settings, quiet=quiet)


def run_build(settings: BuildSettings, *, quiet: bool) -> None:
    """Load the model, search its plan with a progress bar, write it, and summarize.

    Under torchrun every rank searches on its share of the prompts; rank 0 writes.
    """
    from planner import distributed
    from planner.build import build_plan, draft_plan, time_generation
    from planner.output import write_plan
    from planner.report import build_summary

    with _load_for(settings) as (pipe, request):
        draft = draft_plan(pipe, request)  # refuses bad settings before any progress is shown
        if settings.search == "profile":
            run_profile_search(pipe, request, settings, quiet=quiet)
            return
        with step_progress("searching", quiet=quiet) as bar:
            cells = request.steps * draft.model.num_layers
            task = bar.add_task("search", total=cells, step=0, steps=request.steps)

            def advance(step: int, layer: int, method: str, loss: float | None) -> None:
                bar.update(task, advance=1, step=step + 1)

            result = build_plan(pipe, request, progress=advance)
        distributed.barrier()  # raises if another rank failed: then nothing is written
        if not distributed.is_writer():
            return
        write_plan(result.plan, settings.output)
        if quiet:
            return
        plain = time_generation(pipe, request) if settings.baseline else None
        out.print(build_summary(result.plan, str(settings.output), result.seconds, plain))


# ---------------------------------------------------------------------------
# profile once, compile many

PAPER_DELTAS = "0.975,0.95,0.925,0.9,0.875,0.85"


@app.command()
def profile(
    ctx: typer.Context,
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Registry name (see `planner models`), local pipeline folder or hub id.",
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Where to write the profile (msgpack)."),
    steps: int | None = typer.Option(None, help="Denoising steps (default: the model's)."),
    height: int | None = typer.Option(None, help="Image height in pixels (default: the model's)."),
    width: int | None = typer.Option(None, help="Image width in pixels (default: the model's)."),
    resolution: int | None = typer.Option(None, help="Square image size; instead of --height/--width."),
    guidance: float | None = typer.Option(
        None, help="CFG guidance scale; <= 1 turns CFG off (default: the model's)."
    ),
    window: str | None = typer.Option(
        None,
        help="Window of wars: auto (default: the band or a tiling of about the band's pairs, whichever "
        "leaves the least residual error on the calibration batch), W or band:W (half-width in tokens), "
        "tiles1d:T:K, tiles2d:THxTW:K, tiles3d:TFxTHxTW:K (tiles of the patch grid, K tiles each side).",
    ),
    window_frac: float | None = typer.Option(
        None, help="The band's half-width as a fraction of the token count, auto's target too (default: 1/8)."
    ),
    prompts: Path | None = typer.Option(
        None, help="Calibration captions, one per line (default: the model's or the built-in set)."
    ),
    num_prompts: int | None = typer.Option(None, help="Use the first N captions or class ids."),
    classes: str | None = typer.Option(None, help="DiT class ids, comma-separated."),
    calib_batch: int | None = typer.Option(
        None, help="Prompts per transformer call, to bound memory (default: all at once)."
    ),
    seed: int | None = typer.Option(None, help="Seed of the calibration latents (default: 0)."),
    lags: int | None = typer.Option(
        None, help="How many steps back each cache is measured; older ones are bounded by chaining (default: 4)."
    ),
    probes: str | None = typer.Option(
        None, help="Methods tried per layer and step to measure its gain, comma-separated (default: ast)."
    ),
    device: str | None = typer.Option(
        None, help="Torch device (default: cuda when available, else cpu)."
    ),
    dtype: str | None = typer.Option(
        None, help="auto, float32, float16 or bfloat16 (default: auto = float16 on cuda, else float32)."
    ),
    baseline: bool | None = typer.Option(
        None, "--baseline/--no-baseline", help="Also time one plain generation, to compare with."
    ),
    latency: bool | None = typer.Option(
        None,
        "--latency/--no-latency",
        help="Also measure each method's latency on this device, for --objective time (default: on).",
    ),
    config: Path | None = typer.Option(
        None, "--config", help="TOML file of settings (same names as build); options given here override it."
    ),
    ffn: bool = typer.Option(
        True, "--ffn/--no-ffn", help="Also measure the feed-forward layers' reuse and forecast, for --ffn plans."
    ),
    heads: bool = typer.Option(
        True, "--heads/--no-heads",
        help="Also measure each head's reuse and window alone, for --heads plans (two output projections "
        "per head and layer-step).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary."),
) -> None:
    """Measure a model once on its calibration batch; `build --from-profile` compiles plans from it."""
    options = dict(locals())
    for key in ("ctx", "config", "quiet"):
        options.pop(key)
    with reported(ctx):
        from planner.settings import load_settings

        from planner.output import check_writable

        settings = load_settings({**options, "delta": 1.0, "search": "profile"}, config)  # δ: when compiling
        check_writable(settings.output, inputs={"prompts": settings.prompts, "config": config})
        run_profile(settings, quiet=quiet)


def _profile_with_progress(pipe: Any, request: BuildRequest, settings: BuildSettings, *, quiet: bool) -> ProfileResult:
    """Profile ``pipe`` on the calibration batch, with a progress bar (on rank 0 only)."""
    from planner.profile import profile_model
    from runtime.apply import self_attention_layers

    with step_progress("profiling", quiet=quiet) as bar:
        layers = len(self_attention_layers(pipe.transformer))
        task = bar.add_task("profile", total=request.steps * layers, step=0, steps=request.steps)

        weighing = bar.add_task("step weights", total=max(request.steps - 1, 1), step=0, steps=request.steps, visible=False)

        def advance(step: int, layer: int) -> None:
            bar.update(task, advance=1, step=step + 1)

        def weigh(done: int, total: int) -> None:
            bar.update(weighing, completed=done, total=total, step=done + 1, visible=True)

        return profile_model(
            pipe, request, lags=settings.lags, probes=tuple(settings.probes), progress=advance,
            weights_progress=weigh, ffn=settings.ffn, heads=settings.heads,
        )


@contextmanager
def _load_for(settings: BuildSettings) -> Iterator[tuple[Any, BuildRequest]]:
    """The model's pipeline and the calibration request the settings ask for, for the block.

    Under torchrun the ranks join first (``planner/distributed.py``), each loads the
    pipeline on its own device, and errors in the block name the rank.
    """
    from contextlib import nullcontext

    from planner import distributed
    from planner.loading import load_pipeline, quiet_libraries, resolve_device, resolve_dtype
    from planner.registry import resolve_model
    from planner.settings import build_request

    quiet_libraries()
    spec = resolve_model(settings.model)
    request = build_request(settings, spec)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    with distributed.launched(len(request.inputs), device) as device:
        status = f"loading {spec.name} on {device} ({str(dtype).removeprefix('torch.')})"
        with err.status(status) if distributed.is_writer() else nullcontext():
            pipe = load_pipeline(spec, device, dtype)
        yield pipe, request


def run_profile(settings: BuildSettings, *, quiet: bool) -> None:
    """Load the model, profile it with a progress bar, write the profile, and summarize.

    Under torchrun every rank profiles its share of the prompts; rank 0 writes.
    """
    from planner import distributed
    from planner.build import draft_plan, time_generation
    from planner.profile import write_profile

    with _load_for(settings) as (pipe, request):
        draft_plan(pipe, request)  # refuses bad settings before any progress is shown
        result = _profile_with_progress(pipe, request, settings, quiet=quiet)
        distributed.barrier()  # raises if another rank failed: then nothing is written
        if not distributed.is_writer():
            return
        size = write_profile(result.profile, settings.output)
        if quiet:
            return
        plain = time_generation(pipe, request) if settings.baseline else None
    p = result.profile
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("measured", f"{p.sampling.num_steps} steps x {p.model.num_layers} layers, lags 1…{p.lags}")
    table.add_row("probes", ", ".join(p.measurements.loss))
    timing = f"{result.seconds:.2f} s"
    if plain:
        timing += f" ({result.seconds / plain:.1f}x one plain generation of {plain:.2f} s)"
    table.add_row("profile time", timing)
    table.add_row("profile", f"{settings.output} ({size / 1024:.1f} KiB)")
    out.print(table)


def run_profile_search(pipe: Any, request: BuildRequest, settings: BuildSettings, *, quiet: bool) -> None:
    """``build --search profile``: profile, then compile the plan for the settings' δ (rank 0 writes)."""
    import time

    from planner import distributed
    from planner.build import time_generation
    from planner.compile import compile_plan
    from planner.output import write_plan
    from planner.report import build_summary

    result = _profile_with_progress(pipe, request, settings, quiet=quiet)
    start = time.perf_counter()
    plan = compile_plan(
        result.profile, settings.delta, combine=settings.combine, objective=settings.objective,
        weighted=settings.step_weights, ffn=settings.ffn, heads=settings.heads, pick=settings.pick,
    )
    seconds = result.seconds + time.perf_counter() - start
    distributed.barrier()  # raises if another rank failed: then nothing is written
    if not distributed.is_writer():
        return
    write_plan(plan, settings.output)
    if quiet:
        return
    plain = time_generation(pipe, request) if settings.baseline else None
    out.print(build_summary(plan, str(settings.output), seconds, plain))


def run_compile(profile_file: Path, options: dict[str, Any], *, quiet: bool) -> None:
    """``build --from-profile``: compile the plan for δ, check it fits ``--model`` if given, write it."""
    import time

    from planner.compile import check_options, compile_plan, load_profile
    from planner.errors import bad_input
    from planner.output import check_writable, write_plan
    from planner.report import build_summary

    allowed = ("model", "delta", "output", "combine", "objective", "ffn", "step_weights", "heads", "pick")
    fixed = [k for k, v in options.items() if v is not None and k not in allowed]
    if fixed:
        name = fixed[0].replace("_", "-")
        raise bad_input(f"{fixed[0]}: --{name} is fixed by the profile; it cannot be given with --from-profile")
    if options["delta"] is None:
        raise bad_input("delta: required (give --delta)")
    combine, objective, pick = options["combine"] or "sum", options["objective"], options["pick"] or "cheapest"
    check_options(combine, objective, pick)
    if options["output"] is None:
        raise bad_input("output: required (give --output)")
    output = Path(options["output"])
    check_writable(output, inputs={"from_profile": profile_file})
    profile_data = load_profile(profile_file)
    start = time.perf_counter()
    weighted = bool(options["step_weights"])
    plan = compile_plan(
        profile_data, options["delta"], combine=combine, objective=objective, weighted=weighted, ffn=bool(options["ffn"]),
        heads=bool(options["heads"]), pick=pick,  # type: ignore[arg-type]
    )
    seconds = time.perf_counter() - start
    if options["model"] is not None:
        check_fit(plan, options["model"])
    write_plan(plan, output)
    if not quiet:
        out.print(build_summary(plan, str(output), seconds, None))


@app.command()
def sweep(
    ctx: typer.Context,
    from_profile: Path = typer.Option(..., "--from-profile", help="The profile to compile from."),
    deltas: str = typer.Option(PAPER_DELTAS, "--deltas", help="Comma-separated δ values (default: D1…D6)."),
    output_dir: Path | None = typer.Option(
        None, "--output-dir", "-o", help="Folder to write plan-<δ>.json into (default: print only)."
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Also check that the plans fit this model (its config is enough)."
    ),
    combine: str = typer.Option(
        "sum", help="How a step's layer losses add up: sum (an upper bound) or rss."
    ),
    objective: str | None = typer.Option(
        None,
        help="What the compiler minimises: time (default when the profile measured latencies), flops "
        "(attention) or transformer (all FLOPs; with --ffn).",
    ),
    ffn: bool = typer.Option(
        False, "--ffn/--no-ffn", help="Also choose compute, reuse or forecast per step and feed-forward layer."
    ),
    step_weights: bool = typer.Option(
        False,
        "--step-weights/--no-step-weights",
        help="Share each step's error budget by its measured effect on the final image (default: off).",
    ),
    heads: bool = typer.Option(
        False, "--heads/--no-heads", help="Also choose full, window or reuse per head of a layer-step (profile schema 5)."
    ),
    pick: str = typer.Option(
        "cheapest", help="Of the methods that fit a layer-step's budget, take the cheapest or the one "
        "saving the most cost per unit of predicted loss (ratio).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """Compile one plan per δ from a profile and tabulate the attention FLOPs each keeps."""
    with reported(ctx):
        import time

        from planner.compile import check_options, compile_plans, load_profile, parse_deltas, sweep_file_name
        from planner.errors import bad_input
        from planner.output import check_writable, write_plan
        from planner.report import METHOD_STYLE, legend, percent
        from schemas import METHODS

        check_options(combine, objective, pick)
        values = parse_deltas(deltas)
        if output_dir is not None and not output_dir.is_dir():
            raise bad_input(f"output_dir: folder {str(output_dir)!r} does not exist")
        files = [output_dir / sweep_file_name(d) if output_dir else None for d in values]
        for path in files:
            if path is not None:
                check_writable(path, "output_dir", inputs={"from_profile": from_profile})
        profile_data = load_profile(from_profile)
        start = time.perf_counter()
        plans = compile_plans(
            profile_data, values, combine=combine, objective=objective, weighted=step_weights, ffn=ffn,  # type: ignore[arg-type]
            heads=heads, pick=pick,  # type: ignore[arg-type]
        )
        seconds = time.perf_counter() - start
        if model is not None:
            check_fit(plans[0], model)
        for plan, path in zip(plans, files):
            if path is not None:
                write_plan(plan, path)
        if as_json:
            rows = [
                {
                    "delta": d,
                    "attention_flops_fraction": p.summary.attention_flops_fraction,
                    "time_fraction": p.summary.time_fraction,
                    "method_counts": p.summary.method_counts,
                    "plan": str(f) if f else None,
                }
                for d, p, f in zip(values, plans, files)
            ]
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            return
        table = Table(box=None, header_style="bold", pad_edge=False)
        for column in ("δ", "attention FLOPs kept", "predicted time", "methods", "plan"):
            table.add_column(column, justify="left" if column in ("methods", "plan") else "right",
                             no_wrap=column != "plan", overflow="fold")  # fmt: skip
        for d, p, f in zip(values, plans, files):
            counts = Text()
            for method in METHODS:
                if p.summary.method_counts.get(method):
                    letter, style = METHOD_STYLE[method]
                    counts.append(f"{letter}", style=style).append(f"{p.summary.method_counts[method]} ")
            time_kept = f"{p.summary.time_fraction:.3f}" if p.summary.time_fraction is not None else "-"
            table.add_row(
                f"{d:g}", percent(p.summary.attention_flops_fraction), time_kept, counts, str(f) if f else "-"
            )
        out.print(table)
        out.print(legend())
        out.print(f"compiled {len(plans)} plans in {seconds * 1000:.0f} ms from {from_profile}")


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
            note_latency_device(plan, None)


def note_latency_device(plan: Plan, device: str | None) -> None:
    """Say when the plan's latencies were measured on another device than ``device`` (default: this machine's)."""
    from planner.loading import device_name, resolve_device

    if plan.latency is None:
        return
    here = device_name(resolve_device(device))
    if here != plan.latency.device:
        err.print(
            Text(
                f"note: latencies measured on {plan.latency.device}, not on {here}: its choices and predicted "
                "time are for that device (re-plan here to get this one's)",
                style="yellow",
            ),
            soft_wrap=True,
        )


@app.command()
def validate(
    ctx: typer.Context,
    plan_file: Path = typer.Argument(..., metavar="PLAN.json", help="The plan to check."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Also check that the plan fits this model (its config is enough)."
    ),
    device: str | None = typer.Option(
        None, help="Also say whether the plan's latencies were measured on this device (e.g. cuda, cpu)."
    ),
) -> None:
    """Check a plan (and that it fits a model): exit 0 if valid, 1 with the reason if not."""
    with reported(ctx):
        from runtime.loading import load_plan

        plan = load_plan(plan_file)
        if device is not None and plan.latency is None:
            err.print(Text("note: the plan carries no measured latencies", style="yellow"))
        elif device is not None:
            note_latency_device(plan, device)
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
    """Check ``plan`` against the model's configs as eval and the runtime will; the model's name."""
    from planner.fit import check_model_fit
    from planner.loading import load_model_skeleton, quiet_libraries
    from planner.registry import resolve_model

    quiet_libraries()
    spec = resolve_model(model)
    skeleton = load_model_skeleton(spec)
    check_model_fit(plan, spec, skeleton.transformer, skeleton.vae_scale, skeleton.scheduler_config)
    return spec.name


# ---------------------------------------------------------------------------
# evaluating plans


@app.command("eval")
def evaluate_plan(
    ctx: typer.Context,
    plan_file: Path = typer.Argument(..., metavar="PLAN.json", help="The plan to evaluate."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model to run it on (default: the one named in the plan)."
    ),
    num_samples: int = typer.Option(
        20, "--num-samples", "-n", help="Samples from the held-out prompts or classes, cycled."
    ),
    seed: int | None = typer.Option(
        None, help="Seed of sample 0; sample i uses seed + i (default: calibration seed + 1000)."
    ),
    batch_size: int | None = typer.Option(
        None, min=1, help="Samples per pipeline call, to bound memory (default: all at once)."
    ),
    repeats: int = typer.Option(
        1, min=1, help="Time each batch this many times per run and keep the fastest."
    ),
    device: str | None = typer.Option(None, help="Torch device (default: cuda when available, else cpu)."),
    dtype: str = typer.Option(
        "auto", help="auto, float32, float16 or bfloat16 (auto = float16 on cuda, else float32)."
    ),
    save_grid: Path | None = typer.Option(
        None, "--save-grid", help="Write a PNG: raw samples in the top row, planned below."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON instead of a table."),
) -> None:
    """Generate held-out samples with and without a plan; report accuracy, fidelity and cost."""
    with reported(ctx):
        run_eval(plan_file, model, num_samples, seed, batch_size, repeats, device, dtype, save_grid, as_json)


def load_with_status(spec: Any, device_name: str | None, dtype_name: str) -> Any:
    """``spec``'s pipeline on the asked device and dtype, with a status line while it loads."""
    from planner.loading import load_pipeline, resolve_device, resolve_dtype

    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    with err.status(f"loading {spec.name} on {device} ({str(dtype).removeprefix('torch.')})"):
        return load_pipeline(spec, device, dtype)


def run_eval(
    plan_file: Path,
    model: str | None,
    num_samples: int,
    seed: int | None,
    batch_size: int | None,
    repeats: int,
    device_name: str | None,
    dtype_name: str,
    save_grid: Path | None,
    as_json: bool,
) -> None:
    """Load the plan and its model, evaluate with a progress bar, and print the figures."""
    from planner.evaluate import evaluate, eval_inputs, forwards_needed, render
    from planner.evaluate import save_grid as write_grid
    from planner.loading import DTYPES, quiet_libraries
    from planner.output import check_writable
    from planner.registry import resolve_model
    from runtime.loading import load_plan

    quiet_libraries()
    plan = load_plan(plan_file)
    if dtype_name != "auto" and dtype_name not in DTYPES:
        raise PlannerError(f"dtype: unknown dtype {dtype_name!r}; use auto, {', '.join(DTYPES)}", exit_code=2)
    if save_grid is not None:
        check_writable(save_grid, "save_grid", inputs={"plan": plan_file})
    spec = resolve_model(model or plan.model.name)
    inputs = eval_inputs(spec, plan, num_samples, seed)
    pipe = load_with_status(spec, device_name, dtype_name)
    with Progress(
        TextColumn("generating raw and planned"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=True,
    ) as bar:
        task = bar.add_task("eval", total=forwards_needed(plan, inputs, batch_size, repeats))
        result = evaluate(
            pipe, spec, plan, inputs, batch_size=batch_size, repeats=repeats,
            progress=lambda: bar.advance(task),
        )  # fmt: skip
    if save_grid is not None:
        write_grid(result.raw, result.planned, save_grid)
    if as_json:
        facts = {"plan": str(plan_file), **result.as_dict()}
        sys.stdout.write(json.dumps(facts, indent=2, allow_nan=False) + "\n")
        return
    out.print(
        f"{plan_file}: {len(inputs)} held-out samples of {spec.name}, seeds "
        f"{inputs.seeds[0]}…{inputs.seeds[-1]}, {plan.sampling.num_steps} steps",
        soft_wrap=True,
    )
    out.print(render(result))
    if save_grid is not None:
        out.print(f"grid: {save_grid} (raw above, planned below)")


@app.command()
def refine(
    ctx: typer.Context,
    plan_file: Path = typer.Argument(..., metavar="PLAN.json", help="The plan to refine."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the refined plan."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model to run it on (default: the one named in the plan)."
    ),
    prompts: Path | None = typer.Option(
        None, help="The plan's calibration prompts, one per line (default: the model's own set)."
    ),
    evals: int = typer.Option(40, min=1, help="Calibration generations the search may spend."),
    min_gain: float = typer.Option(0.05, "--min-gain", min=0.0, help="dB a move must gain to be kept."),
    check: bool = typer.Option(
        True, help="Keep the refined grid only if the same prompts with the next seeds gain too "
        "(up to three more generations); otherwise write the plan unrefined.",
    ),
    device: str | None = typer.Option(None, help="Torch device (default: cuda when available, else cpu)."),
    dtype: str = typer.Option(
        "auto", help="auto, float32, float16 or bfloat16 (auto = float16 on cuda, else float32)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Refine a plan on its final images: move computed steps, at the same cost, while the
    calibration images get closer to raw (PSNR)."""
    with reported(ctx):
        run_refine(plan_file, output, model, prompts, evals, min_gain, device, dtype, quiet=quiet, check=check)


def run_refine(
    plan_file: Path,
    output: Path,
    model: str | None,
    prompts_file: Path | None,
    evals: int,
    min_gain: float,
    device_name: str | None,
    dtype_name: str,
    *,
    quiet: bool,
    check: bool = True,
) -> None:
    """Load the plan and its model, hill-climb with a progress bar, write the result atomically."""
    from planner.calibration import CAPTIONS, CLASS_IDS, read_prompts
    from planner.loading import DTYPES, quiet_libraries
    from planner.output import check_writable, write_plan
    from planner.refine import calibration_score, executed_attention, no_dearer
    from planner.refine import refine as hill_climb
    from planner.registry import resolve_model
    from runtime.loading import load_plan

    quiet_libraries()
    plan = load_plan(plan_file)
    check_writable(output, inputs={"plan": plan_file, "prompts": prompts_file})
    if dtype_name != "auto" and dtype_name not in DTYPES:
        raise PlannerError(f"dtype: unknown dtype {dtype_name!r}; use auto, {', '.join(DTYPES)}", exit_code=2)
    if plan.calibration is None:
        raise PlannerError("$.calibration: the plan records no calibration prompts to refine on", exit_code=2)
    spec = resolve_model(model or plan.model.name)
    default = spec.calibration or (CLASS_IDS if spec.family.inputs == "classes" else CAPTIONS)
    inputs = read_prompts(prompts_file) if prompts_file else list(default)[: plan.calibration.num_prompts]
    pipe = load_with_status(spec, device_name, dtype_name)
    with Progress(
        TextColumn("refining: calibration generations"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
        transient=True,
    ) as bar:
        task = bar.add_task("refine", total=evals)
        score = calibration_score(pipe, spec, plan, inputs)
        checker = calibration_score(pipe, spec, plan, inputs, seed_offset=len(inputs)) if check else None
        result = hill_climb(
            plan, score, fits=no_dearer(plan), max_evals=evals, min_gain=min_gain,
            progress=lambda done, best: bar.update(task, completed=done), check=checker,
        )  # fmt: skip
    write_plan(result.plan, output)
    verdict = f"; {result.check_note()}" if result.checked is not None else ""
    out.print(
        f"{output}: PSNR against raw on {len(inputs)} calibration prompts {result.start:.2f} → "
        f"{result.score:.2f} dB; {result.kept} moves kept of {result.evals} generations{verdict}; attention "
        f"executed {executed_attention(result.plan):.1%} (was {executed_attention(plan):.1%})",
        soft_wrap=True,
    )


@app.command()
def schema(
    profile: bool = typer.Option(False, "--profile", help="The profile format's schema instead."),
) -> None:
    """Print the JSON Schema of the plan format (or of the profile format)."""
    from schemas import json_schema, profile_json_schema

    document = profile_json_schema() if profile else json_schema()
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


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
