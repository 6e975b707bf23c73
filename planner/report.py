"""What the CLI shows: a plan's facts, its step x layer grid, and a build summary."""

from __future__ import annotations

from typing import Any

import msgspec
from rich.console import Group
from rich.table import Table
from rich.text import Text

from schemas import (
    HEAD_LETTERS,
    LATENCY_VARIANTS,
    FFN_METHODS,
    METHODS,
    Latency,
    Plan,
    cell_cost,
    cfg_mode_of,
    head_cells,
    keys_per_query,
    layer_weight,
    plan_layers,
    window_name,
    window_pairs,
)

# One letter and colour per method: A = sharing across timesteps, P = its first-order
# forecast, C = across CFG halves, W = window + residual, B = both window and CFG sharing.
METHOD_STYLE: dict[str, tuple[str, str]] = {
    "full": ("F", "bright_black"),
    "wars": ("W", "cyan"),
    "ast": ("A", "green"),
    "asc": ("C", "yellow"),
    "wars_asc": ("B", "magenta"),
    "forecast": ("P", "bright_green"),
}
HEADS_STYLE = ("H", "blue")  # a per-head cell (a ``wars`` cell whose heads run their own methods)
FFN_STYLE: dict[str, tuple[str, str]] = {
    "compute": ("f", "bright_black"),
    "reuse": ("r", "green"),
    "forecast": ("p", "bright_green"),
}


def percent(fraction: float) -> str:
    return f"{100 * fraction:.1f} %"


def plan_facts(plan: Plan) -> dict[str, Any]:
    """A machine-readable summary: every header field and the derived figures, no grid."""
    facts = msgspec.to_builtins(plan)
    facts.pop("methods")
    facts.pop("losses", None)
    if plan.heads is not None:  # counted, not listed: a plan may have thousands
        facts["heads"] = head_counts(plan)
    facts["num_steps"], facts["num_layers"] = plan.sampling.num_steps, plan.model.num_layers
    return facts


def _facts_table(plan: Plan) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    model, tokens, sampling = plan.model, plan.tokens, plan.sampling
    size = f" ({tokens.height}x{tokens.width})" if tokens.height and tokens.width else ""
    mode = cfg_mode_of(sampling)
    how = sampling.cfg_order if mode == "batched" else "separate calls"
    cfg = f"on, {how}, guidance {sampling.guidance_scale}" if sampling.cfg else "off"
    rows = [
        ("model", f"{model.name} ({model.class_name})"),
        ("layers", f"{model.num_layers} x {model.num_heads} heads x {model.head_dim}"),
        ("tokens", _tokens_fact(plan, size)),
        ("sampling", f"{sampling.scheduler}, {sampling.num_steps} steps, CFG {cfg}"),
    ]
    calibration = plan.calibration
    if calibration is not None:
        rows.append(
            (
                "calibration",
                f"δ {calibration.delta}, {calibration.metric}, {calibration.num_prompts} prompts, "
                f"seed {calibration.seed}, {calibration.search}",
            )
        )
    window = window_fact(plan)
    if window is not None:
        rows.append(("window", window))
    rows.append(("plan", f"schema {plan.schema_version}, ditfastattn {plan.tool_version}"))
    rows.append(("attention FLOPs", percent(plan.summary.attention_flops_fraction)))
    if plan.summary.ffn_flops_fraction is not None:
        rows.append(("feed-forward FLOPs", percent(plan.summary.ffn_flops_fraction)))
    if plan.summary.transformer_flops_fraction is not None:
        rows.append(("transformer FLOPs", percent(plan.summary.transformer_flops_fraction)))
    if plan.latency is not None:
        rows.append(("latency", latency_fact(plan.latency)))
        rows.append(("predicted time", f"{plan.summary.time_fraction:.3f} of the all-full plan"))
    rows.append(("methods", method_counts(plan.summary.method_counts)))
    if plan.heads is not None:
        rows.append(("per-head cells", heads_fact(plan)))
    if plan.ffn is not None:
        counts = {m: sum(row.count(m) for row in plan.ffn) for m in FFN_METHODS}
        rows.append(("feed-forward", "  ".join(f"{FFN_STYLE[m][0]} {m} {n}" for m, n in counts.items() if n)))
    for key, value in rows:
        table.add_row(key, value)
    return table


def head_counts(plan: Plan) -> dict[str, int]:
    """How many per-head cells the plan has and how many heads of them run each method."""
    letters = "".join(cell.methods for cell in plan.heads or ())
    return {"cells": len(plan.heads or ()), **{m: letters.count(c) for c, m in HEAD_LETTERS.items()}}


def heads_fact(plan: Plan) -> str:
    """The per-head cells in one line: their number and their heads by method."""
    counts = head_counts(plan)
    heads = sum(counts[m] for m in HEAD_LETTERS.values())
    if not heads:
        return "none"
    shares = ", ".join(f"{m} {percent(counts[m] / heads)}" for m in HEAD_LETTERS.values())
    return f"{counts['cells']} of the 'wars' cells (H in the grid); their {heads} heads: {shares}"


def _tokens_fact(plan: Plan, size: str) -> str:
    tokens = plan.tokens
    window = f"±{plan.window}" if isinstance(plan.window, int) else window_name(plan.window)
    if plan.layers is None:
        return f"{tokens.num_tokens}{size}, window {window}"
    if tokens.text_tokens:
        joint = sum(layer.kind == "joint" for layer in plan.layers)
        return (
            f"{tokens.num_tokens} image{size} + {tokens.text_tokens} text in {joint} joint layers, "
            f"arrow window {window} (image keys) + all text keys"
        )
    temporal = next((layer for layer in plan.layers if layer.kind == "temporal"), None)
    text = f"{tokens.num_tokens} per frame{size}, window {window}"
    if temporal is not None:
        text += f"; {tokens.frames} frames, temporal window ±{temporal.window}"
    return text


def window_fact(plan: Plan) -> str | None:
    """The spatial window's shape and pairs, and what ``--window auto`` measured; ``None``
    for a plain band that was asked for (the tokens line says it)."""
    window, tokens = plan.window, plan.tokens.num_tokens
    errors = plan.calibration.window_errors if plan.calibration is not None else None
    if isinstance(window, int) and not errors:
        return None
    share = percent(window_pairs(tokens, window) / tokens**2)
    if isinstance(window, int):
        text = f"band ±{window}, {share} of the query-key pairs"
    else:
        grid = "x".join(map(str, window.grid)) + " patches" if hasattr(window, "grid") else f"{tokens} tokens"
        keys = keys_per_query(window, tokens)
        text = f"{window_name(window)} over {grid}: {keys} keys per query, {share} of the pairs"
    if errors:
        measured = ", ".join(f"{name} {error:.4f}" for name, error in sorted(errors.items(), key=lambda x: x[1]))
        text += f"; chosen by auto, residual error {measured}"
    return text


def latency_fact(latency: Latency) -> str:
    """Where the latencies were measured, and each variant's time per layer-step."""
    figures = ", ".join(f"{v} {1e3 * latency.seconds[v]:.3g} ms" for v in LATENCY_VARIANTS if v in latency.seconds)
    return f"{latency.device}, {latency.dtype}, kernel {latency.kernel}, {latency.rows} rows: {figures}"


def method_counts(counts: dict[str, int]) -> Text:
    text = Text()
    for method in METHODS:
        if counts.get(method):
            letter, style = METHOD_STYLE[method]
            text.append(f"{letter} ", style=style)
            text.append(f"{method} {counts[method]}  ")
    return text


# Beyond these, ``grid`` summarises: the first and last steps only, method counts per step.
MAX_GRID_STEPS = 60
MAX_GRID_LAYERS = 120


def shown_steps(steps: int) -> list[int | None]:
    """The steps ``grid`` prints, ``None`` where it skips some (long plans)."""
    if steps <= MAX_GRID_STEPS:
        return list(range(steps))
    head, tail = MAX_GRID_STEPS - 10, 10
    return [*range(head), None, *range(steps - tail, steps)]


def _letters(row: list[str], layers: list[Any], video: bool, per_head: set[int]) -> Text:
    letters = Text()
    for i, method in enumerate(row):
        letter, style = HEADS_STYLE if i in per_head else METHOD_STYLE[method]
        if video and layers[i].kind == "temporal":
            letter = letter.lower()  # temporal layers in lower case
        letters.append(letter, style=style)
        if video and layers[i].kind == "temporal" and i + 1 < len(row):
            letters.append(" ")
    return letters


def _ffn_letters(row: list[str]) -> Text:
    letters = Text()
    for method in row:
        letter, style = FFN_STYLE[method]
        letters.append(letter, style=style)
    return letters


def grid(plan: Plan) -> Table:
    """One row per step, one coloured letter per layer, and the step's attention FLOPs.

    Plans of more than ``MAX_GRID_LAYERS`` layers show each step's method counts
    instead of letters; plans of more than ``MAX_GRID_STEPS`` steps show their first
    and last steps, so the table stays small whatever the plan's size.
    """
    table = Table(box=None, padding=(0, 1), show_edge=False)
    table.add_column("step", justify="right", style="bold")
    layers = plan_layers(plan)
    video = any(layer.kind == "temporal" for layer in plan.layers or ())
    wide = plan.model.num_layers > MAX_GRID_LAYERS
    heading = f"layers 0 … {plan.model.num_layers - 1}" + (" (method counts)" if wide else "")
    table.add_column(heading)
    ffn_letters = plan.ffn is not None and len(plan.ffn[0]) <= MAX_GRID_LAYERS
    if ffn_letters:
        table.add_column(f"feed-forward 0 … {len(plan.ffn[0]) - 1}")
    table.add_column("FLOPs", justify="right")
    weights = [layer_weight(layer) for layer in layers]
    total = sum(weights)
    heads = head_cells(plan)
    for t in shown_steps(len(plan.methods)):
        if t is None:
            skipped = len(plan.methods) - MAX_GRID_STEPS
            table.add_row("…", Text(f"{skipped} steps not shown (planner show --json for the figures)"), "")
            continue
        row = plan.methods[t]
        per_head = {i for i in range(len(row)) if (t, i) in heads}
        cells = method_counts({m: row.count(m) for m in METHODS}) if wide else _letters(row, layers, video, per_head)
        kept = sum(w * cell_cost(m, layer, heads.get((t, i))) for i, (m, layer, w) in enumerate(zip(row, layers, weights)))
        ffn = [_ffn_letters(plan.ffn[t])] if ffn_letters else []
        table.add_row(str(t), cells, *ffn, percent(kept / total))
    return table


def legend(video: bool = False, ffn: bool = False, heads: bool = False) -> Text:
    text = Text("legend: ")
    for method in METHODS:
        letter, style = METHOD_STYLE[method]
        text.append(letter, style=style)
        text.append(f" {method}  ")
    if heads:
        text.append(HEADS_STYLE[0], style=HEADS_STYLE[1])
        text.append(" per-head (f/w/a by head)  ")
    for method in FFN_METHODS if ffn else ():
        letter, style = FFN_STYLE[method]
        text.append(letter, style=style)
        text.append(f" feed-forward {method}  ")
    if video:
        text.append("(upper case: spatial layer, lower case: temporal layer)")
    return text


def render_plan(plan: Plan) -> Group:
    """The header facts, the grid and its legend."""
    video = any(layer.kind == "temporal" for layer in plan.layers or ())
    return Group(_facts_table(plan), Text(), grid(plan), legend(video, plan.ffn is not None, plan.heads is not None))


def build_summary(plan: Plan, output: str, seconds: float, plain_seconds: float | None) -> Table:
    """What ``planner build`` reports at the end."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("window", window_fact(plan) or f"band ±{plan.window}")
    table.add_row("attention FLOPs kept", percent(plan.summary.attention_flops_fraction))
    if plan.summary.ffn_flops_fraction is not None:
        table.add_row("feed-forward FLOPs kept", percent(plan.summary.ffn_flops_fraction))
    if plan.summary.transformer_flops_fraction is not None:
        table.add_row("transformer FLOPs kept", percent(plan.summary.transformer_flops_fraction))
    if plan.summary.time_fraction is not None:
        table.add_row("predicted time", f"{plan.summary.time_fraction:.3f} of all-full on {plan.latency.device}")
    table.add_row("methods", method_counts(plan.summary.method_counts))
    search = f"{seconds:.2f} s"
    if plain_seconds:
        search += f" ({seconds / plain_seconds:.1f}x one plain generation of {plain_seconds:.2f} s)"
    table.add_row("search time", search)
    table.add_row("plan", output)
    return table
