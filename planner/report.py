"""What the CLI shows: a plan's facts, its step x layer grid, and a build summary."""

from __future__ import annotations

from typing import Any

import msgspec
from rich.console import Group
from rich.table import Table
from rich.text import Text

from schemas import METHODS, Plan, layer_weight, method_cost, plan_layers

# One letter and colour per method: A = sharing across timesteps, C = across CFG halves,
# W = window + residual, B = both window and CFG sharing.
METHOD_STYLE: dict[str, tuple[str, str]] = {
    "full": ("F", "bright_black"),
    "wars": ("W", "cyan"),
    "ast": ("A", "green"),
    "asc": ("C", "yellow"),
    "wars_asc": ("B", "magenta"),
}


def percent(fraction: float) -> str:
    return f"{100 * fraction:.1f} %"


def plan_facts(plan: Plan) -> dict[str, Any]:
    """A machine-readable summary: every header field and the derived figures, no grid."""
    facts = msgspec.to_builtins(plan)
    facts.pop("methods")
    facts.pop("losses", None)
    facts["num_steps"], facts["num_layers"] = plan.sampling.num_steps, plan.model.num_layers
    return facts


def _facts_table(plan: Plan) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    model, tokens, sampling = plan.model, plan.tokens, plan.sampling
    size = f" ({tokens.height}x{tokens.width})" if tokens.height and tokens.width else ""
    cfg = f"on, {sampling.cfg_order}, guidance {sampling.guidance_scale}" if sampling.cfg else "off"
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
    rows.append(("plan", f"schema {plan.schema_version}, ditfastattn {plan.tool_version}"))
    rows.append(("attention FLOPs", percent(plan.summary.attention_flops_fraction)))
    rows.append(("methods", method_counts(plan.summary.method_counts)))
    for key, value in rows:
        table.add_row(key, value)
    return table


def _tokens_fact(plan: Plan, size: str) -> str:
    tokens = plan.tokens
    if plan.layers is None:
        return f"{tokens.num_tokens}{size}, window ±{plan.window}"
    temporal = next((layer for layer in plan.layers if layer.kind == "temporal"), None)
    text = f"{tokens.num_tokens} per frame{size}, window ±{plan.window}"
    if temporal is not None:
        text += f"; {tokens.frames} frames, temporal window ±{temporal.window}"
    return text


def method_counts(counts: dict[str, int]) -> Text:
    text = Text()
    for method in METHODS:
        if counts.get(method):
            letter, style = METHOD_STYLE[method]
            text.append(f"{letter} ", style=style)
            text.append(f"{method} {counts[method]}  ")
    return text


def grid(plan: Plan) -> Table:
    """One row per step, one coloured letter per layer, and the step's attention FLOPs."""
    table = Table(box=None, padding=(0, 1), show_edge=False)
    table.add_column("step", justify="right", style="bold")
    layers = plan_layers(plan)
    video = plan.layers is not None
    heading = f"layers 0 … {plan.model.num_layers - 1}"
    table.add_column(heading)
    table.add_column("FLOPs", justify="right")
    weights = [layer_weight(layer) for layer in layers]
    for t, row in enumerate(plan.methods):
        letters = Text()
        for i, method in enumerate(row):
            letter, style = METHOD_STYLE[method]
            if video and layers[i].kind == "temporal":
                letter = letter.lower()  # temporal layers in lower case
            letters.append(letter, style=style)
            if video and layers[i].kind == "temporal" and i + 1 < len(row):
                letters.append(" ")
        kept = sum(
            w * method_cost(m, layer.num_tokens, layer.window) for m, layer, w in zip(row, layers, weights)
        ) / sum(weights)
        table.add_row(str(t), letters, percent(kept))
    return table


def legend(video: bool = False) -> Text:
    text = Text("legend: ")
    for method in METHODS:
        letter, style = METHOD_STYLE[method]
        text.append(letter, style=style)
        text.append(f" {method}  ")
    if video:
        text.append("(upper case: spatial layer, lower case: temporal layer)")
    return text


def render_plan(plan: Plan) -> Group:
    """The header facts, the grid and its legend."""
    return Group(_facts_table(plan), Text(), grid(plan), legend(plan.layers is not None))


def build_summary(plan: Plan, output: str, seconds: float, plain_seconds: float | None) -> Table:
    """What ``planner build`` reports at the end."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("attention FLOPs kept", percent(plan.summary.attention_flops_fraction))
    table.add_row("methods", method_counts(plan.summary.method_counts))
    search = f"{seconds:.2f} s"
    if plain_seconds:
        search += f" ({seconds / plain_seconds:.1f}x one plain generation of {plain_seconds:.2f} s)"
    table.add_row("search time", search)
    table.add_row("plan", output)
    return table
