"""Per-head cells compiled from hand-made profiles with per-head distances (profile schema 5)."""

from __future__ import annotations

import math

import msgspec
import pytest

from planner.compile import Compiler, Predictor, compile_plan, compile_plans
from planner.errors import PlannerError
from schemas import Latency, check_plan, decode_plan, encode_plan, head_cells, method_cost
from tests.schemas.test_profile import sized_profile

STEPS, LAYERS, LAGS, HEADS = 5, 4, 2, 4
GAIN = 0.1  # probe loss / lag-1 ast distance everywhere
BAND = method_cost("wars", 16, 3)  # the profile's window cost


def lags(value: float) -> list:
    return [[[value if k <= t else None for k in range(1, LAGS + 1)] for _ in range(LAYERS)] for t in range(STEPS)]


def per_head(values: list[float]) -> list:
    return [[[None] * HEADS if t == 0 else list(values) for _ in range(LAYERS)] for t in range(STEPS)]


def profile(head_ast: list[float] | None, head_wars: list[float] | None, *, ast=0.5, wars=0.5, latency=None):
    """Whole-layer ``ast``/``wars`` distances ``ast``/``wars`` at every lag, gain ``GAIN``, and
    these per-head distances at every step and layer."""
    base = sized_profile(
        False, LAYERS, STEPS, LAGS,
        ast=lags(ast),
        wars=lags(wars),
        output_norm=[[1.0] * LAYERS for _ in range(STEPS)],
        loss={"ast": [[None if t == 0 else GAIN * ast] * LAYERS for t in range(STEPS)]},
        head_ast=per_head(head_ast) if head_ast is not None else None,
        head_wars=per_head(head_wars) if head_wars is not None else None,
    )  # fmt: skip
    return msgspec.structs.replace(
        base, schema_version=5, model=msgspec.structs.replace(base.model, num_heads=HEADS), latency=latency
    )


MIXED = profile([0.001, 0.002, 5.0, 5.0], [0.001, 0.002, 5.0, 5.0])
DELTA = 1 - 0.02  # layer 0's budget 0.005: the whole-layer ast (0.05) and wars (0.05) never fit


def budgets_hold(plan, delta: float) -> None:
    for t, row in enumerate(plan.losses[1:], start=1):
        for i, loss in enumerate(row):
            assert loss is None or loss <= (i + 1) / LAYERS * (1 - delta) * (1 + 1e-12)


def test_low_distance_heads_are_reused_and_the_plan_keeps_less():
    plain = compile_plan(MIXED, DELTA, objective="flops")
    plan = compile_plan(MIXED, DELTA, objective="flops", heads=True)
    assert {m for row in plain.methods for m in row} == {"full"}
    cells = head_cells(plan)
    assert cells, "per-head cells expected"
    for (t, i), letters in cells.items():
        assert plan.methods[t][i] == "wars"
        assert letters[2:] == "ff"  # the far heads run full attention
        assert set(letters[:2]) <= {"a", "w"} and letters[:2] != "ff"
    assert all(cells.get((t, i)) == "aaff" for t in range(1, STEPS) for i in range(LAYERS))
    assert plan.summary.attention_flops_fraction < plain.summary.attention_flops_fraction
    expected = (1 + (STEPS - 1) * 0.5) / STEPS  # step 0 full, every other cell half its heads
    assert plan.summary.attention_flops_fraction == pytest.approx(expected)
    assert plan.calibration.search == "profile-heads"
    check_plan(plan)
    assert decode_plan(encode_plan(plan)) == plan
    budgets_hold(plan, DELTA)
    assert plan.losses[1][0] == pytest.approx(GAIN * math.hypot(0.001, 0.002))


def test_the_loss_adds_to_the_step_s_running_loss():
    plan = compile_plan(MIXED, DELTA, objective="flops", heads=True)
    one = GAIN * math.hypot(0.001, 0.002)
    assert [plan.losses[1][i] for i in range(LAYERS)] == pytest.approx([one * (i + 1) for i in range(LAYERS)])
    rss = compile_plan(MIXED, DELTA, objective="flops", heads=True, combine="rss")
    assert [rss.losses[1][i] for i in range(LAYERS)] == pytest.approx([one * math.sqrt(i + 1) for i in range(LAYERS)])
    budgets_hold(rss, DELTA)


def test_window_heads_where_reuse_is_far_and_windows_are_close():
    p = profile([5.0, 5.0, 5.0, 5.0], [0.001, 0.001, 0.001, 5.0])
    plan = compile_plan(p, DELTA, objective="flops", heads=True)
    cells = head_cells(plan)
    assert cells and set(cells.values()) == {"wwwf"}
    assert plan.summary.attention_flops_fraction == pytest.approx((1 + (STEPS - 1) * (3 * BAND + 1) / 4) / STEPS)
    budgets_hold(plan, DELTA)


def test_far_heads_give_no_per_head_cells():
    far = profile([5.0] * HEADS, [5.0] * HEADS)
    for delta in (0.99, DELTA, 0.9, 0.5):
        plain = compile_plan(far, delta, objective="flops")
        plan = compile_plan(far, delta, objective="flops", heads=True)
        assert plan.heads is None
        assert plan.methods == plain.methods


def test_a_per_head_cell_is_kept_only_when_cheaper_than_the_kept_method():
    # the whole layer fits wars everywhere at this δ; heads can only help with a reuse
    p = profile([5.0] * HEADS, [0.001] * HEADS, wars=0.01)
    plan = compile_plan(p, DELTA, objective="flops", heads=True)
    assert plan.heads is None  # all-w is the plain wars cell: nothing cheaper
    assert any(m == "wars" for row in plan.methods for m in row)


def test_an_all_reuse_cell_is_ast_and_is_not_taken():
    # every head's reuse is close, the layer's ast is far: all a would be ast, which does not fit
    p = profile([0.001] * HEADS, [5.0] * HEADS)
    plan = compile_plan(p, DELTA, objective="flops", heads=True)
    cells = head_cells(plan)
    assert cells and set(cells.values()) == {"aaaf"}
    assert "ast" not in {m for row in plan.methods for m in row}


def test_lower_delta_never_costs_more_with_heads():
    compiler = Compiler(MIXED, objective="flops", heads=True)
    plain = Compiler(MIXED, objective="flops")
    deltas = [1 - k / 1000 for k in range(0, 1000, 9)]
    kept = [compiler.choice(d).cost for d in deltas]
    assert all(later <= earlier for earlier, later in zip(kept, kept[1:]))
    assert all(compiler.choice(d).cost <= plain.choice(d).cost for d in deltas)
    for plan, d in zip(compile_plans(MIXED, deltas[::10], objective="flops", heads=True), deltas[::10]):
        check_plan(plan)
        budgets_hold(plan, d)


def test_the_head_figures_are_rescaled_to_the_caches_the_plan_leaves():
    predictor = Predictor(MIXED, "flops", heads=True)
    # lag 1: the measured figures; the residual at lag 3 chains (0.5 + 0.5) / 0.5 = 2x
    first = predictor._head_sequence(3, 0, 1, 1)
    older = predictor._head_sequence(3, 0, 3, 1)
    assert first[0][2] == pytest.approx(0.001**2)
    p = profile([5.0] * HEADS, [0.001, 0.002, 5.0, 5.0])
    predictor = Predictor(p, "flops", heads=True)
    w1, w3 = predictor._head_sequence(3, 0, 1, 1), predictor._head_sequence(3, 0, 3, 1)
    assert w1[0][0] == "wfff" and w3[0][0] == "wfff"
    assert w3[0][2] == pytest.approx(4 * w1[0][2])
    assert older[0][0] == "afff"


def test_time_objective_weighs_heads_by_their_measured_seconds():
    seconds = {"full": 1.0, "full_refresh": 1.2, "wars": 0.5, "ast": 0.05}
    latency = Latency(device="test device", dtype="float32", kernel="auto", rows=2, seconds=seconds)
    p = profile([0.001, 0.002, 5.0, 5.0], [0.001, 0.002, 5.0, 5.0], latency=latency)
    plan = compile_plan(p, DELTA, heads=True)
    plain = compile_plan(p, DELTA)
    assert plan.calibration.search == "profile-time-heads"
    assert head_cells(plan)
    assert plan.summary.time_fraction < plain.summary.time_fraction
    assert Compiler(p, heads=True).choice(DELTA).cost == pytest.approx(plan.summary.time_fraction)
    check_plan(plan)
    budgets_hold(plan, DELTA)


def test_heads_need_a_profile_that_measured_them():
    bare = profile(None, None)
    with pytest.raises(PlannerError, match=r"heads: the profile measured no per-head distances; profile again"):
        compile_plan(bare, DELTA, heads=True)


def test_sweep_compiles_per_head_plans_with_heads(tmp_path):
    import json

    from typer.testing import CliRunner

    import cli
    from schemas import encode_profile

    path = tmp_path / "heads.profile"
    path.write_bytes(encode_profile(MIXED))
    runner = CliRunner()
    args = ["sweep", "--from-profile", str(path), "--deltas", f"{DELTA!r}", "--objective", "flops", "-o", str(tmp_path)]
    result = runner.invoke(cli.app, [*args, "--heads"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    plan = decode_plan((tmp_path / f"plan-{DELTA!r}.json").read_bytes())
    assert head_cells(plan) and plan.calibration.search == "profile-heads"
    plain = runner.invoke(cli.app, [*args[:-2], "--json"], env={"COLUMNS": "120"})
    assert json.loads(plain.stdout)[0]["attention_flops_fraction"] > plan.summary.attention_flops_fraction
    path.write_bytes(encode_profile(profile(None, None)))
    refused = runner.invoke(cli.app, [*args, "--heads"], env={"COLUMNS": "120"})
    assert refused.exit_code == 2 and "heads: the profile measured no per-head distances" in refused.output


def test_build_from_profile_compiles_per_head_plans_and_greedy_refuses_heads(tmp_path):
    from typer.testing import CliRunner

    import cli
    from schemas import encode_profile

    path, output = tmp_path / "heads.profile", tmp_path / "plan.json"
    path.write_bytes(encode_profile(MIXED))
    runner = CliRunner()
    args = ["build", "--from-profile", str(path), "--delta", f"{DELTA!r}", "--objective", "flops", "-o", str(output)]
    result = runner.invoke(cli.app, [*args, "--heads", "-q"])
    assert result.exit_code == 0, result.output
    assert head_cells(decode_plan(output.read_bytes()))
    greedy = runner.invoke(cli.app, ["build", "--model", "dit", "--delta", "0.9", "-o", str(output), "--heads"])
    assert greedy.exit_code == 2 and "heads: applies to --search profile only" in greedy.output


@pytest.mark.parametrize("name", ["pixart-sigma", "dit"])
def test_a_tiny_pipeline_s_profile_compiles_per_head_plans_that_run(pipelines, name):
    """End to end: the profile carries the per-head figures, and its per-head plans validate and run."""
    import runtime
    from planner.profile import profile_model
    from schemas import decode_profile, encode_profile
    from tests.planner.pipelines import fresh_generation, request

    pipe = pipelines[name]
    req = request(pipe, steps=4)
    result = profile_model(pipe, req, lags=2, weights=False, ffn=False)
    p = result.profile
    m = p.measurements
    heads = p.model.num_heads
    assert p.schema_version == 5 and decode_profile(encode_profile(p)) == p
    assert len(m.head_ast) == 4 and all(len(row) == p.model.num_layers for row in m.head_ast)
    assert m.head_ast[0][0] == [None] * heads and all(x > 0 for x in m.head_wars[2][1])
    plans = compile_plans(p, [0.999, 0.997, 0.996, 0.995, 0.9], objective="flops", heads=True)
    if name == "dit":  # its heads differ enough near δ = 1 (tiny PixArt's reuse wins there)
        assert any(plan.heads for plan in plans)
    for plan in plans:
        check_plan(plan)
        with runtime.apply(plan, pipe) as handle:
            fresh_generation(pipe, req)
        assert handle.stats().method_counts == plan.summary.method_counts
