"""Profile once, compile many: profiles of tiny pipelines, compiled plans, and the commands."""

from __future__ import annotations

import json

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import cli
import runtime
from planner.build import build_plan
from planner.compile import RESOLUTION, STEP_WEIGHT_POWER, Compiler, Predictor, compile_plan, compile_plans, load_profile
from planner.errors import PlannerError
from planner.profile import profile_model, write_profile
from planner.schedules import base_plan, uniform_plan
from runtime import load_plan
from schemas import PlanError, decode_plan, encode_plan, forecast_pairs, summarize
from tests.planner.pipelines import fresh_generation, request
from tests.schemas.test_profile import sized_profile

STEPS = 5
LADDER = (1.0, 0.999, 0.995, 0.99, 0.98, 0.975, 0.95, 0.9, 0.85, 0.8, 0.6, 0.3)


@pytest.fixture(scope="module")
def profiled(pipelines):
    """A profile of the tiny PixArt-Σ and DiT pipelines (5 steps, 3 prompts), with its request."""
    results = {}
    for name in ("pixart-sigma", "dit"):
        pipe = pipelines[name]
        req = request(pipe, steps=STEPS)
        results[name] = (profile_model(pipe, req, lags=3), req)
    return results


def test_profile_round_trips_through_a_file(profiled, tmp_path):
    profile = profiled["pixart-sigma"][0].profile
    size = write_profile(profile, tmp_path / "tiny.profile")
    assert size == (tmp_path / "tiny.profile").stat().st_size
    assert load_profile(tmp_path / "tiny.profile") == profile
    m = profile.measurements
    assert len(m.ast) == STEPS and all(len(row) == 3 for row in m.ast)
    assert m.ast[1][0][0] > 0 and m.ast[1][0][1] is None and m.ast[4][2][2] is not None
    assert m.loss["ast"][0] == [None] * 3 and all(x > 0 for x in m.loss["ast"][1])


@pytest.mark.parametrize("name", ["pixart-sigma", "dit"])
def test_profiling_leaves_the_calibration_trajectory_unchanged(pipelines, profiled, name):
    result, req = profiled[name]
    assert torch.equal(result.images, fresh_generation(pipelines[name], req))


@pytest.mark.parametrize("name", ["pixart-sigma", "dit"])
def test_probe_loss_is_the_greedy_search_loss_of_that_trial(pipelines, profiled, name):
    """At step 1 both see the all-full trajectory: the greedy keeps ``ast`` on layer 0 with this loss."""
    pipe = pipelines[name]
    result, req = profiled[name]
    greedy = build_plan(pipe, request(pipe, steps=STEPS, delta=0.3)).plan
    assert greedy.methods[1][0] == "ast"
    assert result.profile.measurements.loss["ast"][1][0] == pytest.approx(greedy.losses[1][0], rel=1e-6)


def test_split_calibration_batches_give_the_same_profile(pipelines, profiled):
    pipe = pipelines["dit"]
    whole = profiled["dit"][0].profile.measurements
    split = profile_model(pipe, request(pipe, steps=STEPS, calib_batch=2), lags=3).profile.measurements
    for name in ("ast", "wars", "wars_asc", "wars_after_asc"):
        flat_a = [x for row in getattr(whole, name) for cell in row for x in cell]
        flat_b = [x for row in getattr(split, name) for cell in row for x in cell]
        assert [x is None for x in flat_a] == [x is None for x in flat_b]
        assert [x for x in flat_a if x is not None] == pytest.approx([x for x in flat_b if x is not None], rel=1e-4)
    for a, b in zip(whole.loss["ast"][1:], split.loss["ast"][1:]):
        assert a == pytest.approx(b, rel=1e-3)


@pytest.mark.parametrize("name", ["pixart-sigma", "dit"])
def test_delta_one_compiles_an_all_full_plan(profiled, name):
    plan = compile_plan(profiled[name][0].profile, 1.0)
    assert {m for row in plan.methods for m in row} == {"full"}
    assert plan.summary.attention_flops_fraction == 1.0
    assert plan.calibration.search == "profile" and plan.calibration.delta == 1.0


@pytest.mark.parametrize("name", ["pixart-sigma", "dit"])
def test_lower_delta_never_keeps_more_attention(profiled, name):
    compiler = Compiler(profiled[name][0].profile)
    deltas = [1 - k / 2000 for k in range(0, 2000, 7)]
    kept = [compiler.plan(d).summary.attention_flops_fraction for d in deltas]
    assert all(later <= earlier for earlier, later in zip(kept, kept[1:]))
    assert kept[-1] < 0.5


@pytest.mark.parametrize("name", ["pixart-sigma", "dit"])
def test_every_compiled_plan_validates_and_runs_under_the_runtime(pipelines, profiled, name):
    pipe = pipelines[name]
    result, req = profiled[name]
    for plan in compile_plans(result.profile, LADDER):
        assert decode_plan(encode_plan(plan)) == plan
        with runtime.apply(plan, pipe) as handle:
            fresh_generation(pipe, req)
        assert handle.stats().method_counts == plan.summary.method_counts


@pytest.mark.parametrize("name", ["pixart-sigma", "dit"])
def test_feed_forward_plans_validate_run_and_keep_less_at_lower_delta(pipelines, profiled, name):
    pipe = pipelines[name]
    result, req = profiled[name]
    profile = result.profile
    assert len(profile.costs.ffn) == len(profile.measurements.ffn_reuse[0]) == 3
    plans = compile_plans(profile, LADDER, ffn=True)
    kept = [p.summary.transformer_flops_fraction for p in plans]
    assert kept[0] == 1.0 and all(later <= earlier for earlier, later in zip(kept, kept[1:]))
    assert any(m != "compute" for p in plans for row in p.ffn for m in row)
    for plan in plans:
        assert decode_plan(encode_plan(plan)) == plan
        assert plan.calibration.search == "profile-transformer"
        with runtime.apply(plan, pipe) as handle:
            fresh_generation(pipe, req)
        counts = {m: sum(row.count(m) for row in plan.ffn) for m in ("compute", "reuse", "forecast")}
        assert handle.stats().ffn_counts == counts
        assert handle.stats().method_counts == plan.summary.method_counts


@pytest.mark.parametrize("name", ["pixart-sigma", "dit"])
def test_compiled_predictions_stay_within_each_layer_budget(profiled, name):
    for delta in LADDER[1:]:
        profile = profiled[name][0].profile
        weights = profile.measurements.step_weight
        for weighted in (False, True):
            plan = compile_plan(profile, delta, weighted=weighted)
            layers = plan.model.num_layers
            for t, row in enumerate(plan.losses[1:], start=1):
                scale = weights[t] ** STEP_WEIGHT_POWER if weighted else 1.0
                for i, loss in enumerate(row):
                    assert loss <= (i + 1) / layers * (1 - delta) / scale * (1 + 1e-12)
        assert plan.losses[0] == [None] * layers


@pytest.mark.parametrize("name", ["pixart-sigma", "dit"])
def test_older_caches_are_bounded_by_chaining_the_measured_ones(pipelines, profiled, name):
    """With 1 lag measured, a chained distance is never below the one measured directly."""
    pipe = pipelines[name]
    exact = Predictor(profiled[name][0].profile)  # lags 3
    chained = Predictor(profile_model(pipe, request(pipe, steps=STEPS), lags=1).profile)
    checked = 0
    for measure in ("ast", "wars"):
        for t in range(2, STEPS):
            for i in range(3):
                for lag in range(2, min(t, 3) + 1):
                    bound, direct = chained.distance(measure, t, i, lag), exact.distance(measure, t, i, lag)
                    assert bound >= direct * (1 - 1e-6)
                    checked += 1
    assert checked == 2 * 3 * (1 + 2 + 2)
    assert chained.distance("ast", 4, 0, 4) is not None and chained.distance("ast", 4, 0, 5) is None


def test_without_cfg_nothing_shares_across_cfg_halves(pipelines):
    pipe = pipelines["dit"]
    profile = profile_model(pipe, request(pipe, steps=4, guidance=1.0), lags=2).profile
    assert profile.measurements.asc is None and set(profile.measurements.loss) == {"ast"}
    plan = compile_plan(profile, 0.5)
    assert not {"asc", "wars_asc"} & {m for row in plan.methods for m in row}
    assert plan.summary.attention_flops_fraction < 1.0
    with pytest.raises(PlannerError, match="probes: 'asc' shares across CFG halves"):
        profile_model(pipe, request(pipe, steps=4, guidance=1.0), probes=("asc",))


def test_video_profiles_carry_the_layers_and_compile_to_runnable_plans():
    from planner.build import BuildRequest
    from tests.tiny import tiny_latte_pipeline

    pipe = tiny_latte_pipeline()
    pipe.set_progress_bar_config(disable=True)
    req = BuildRequest(name="tiny", inputs=("a red cat", "the big house"), delta=0.9, steps=3, guidance=4.5)
    profile = profile_model(pipe, req, lags=2).profile
    assert [x.kind for x in profile.layers] == ["spatial", "temporal"] * 2
    for plan in compile_plans(profile, (0.99, 0.5)):
        assert plan.layers == profile.layers
        with runtime.apply(plan, pipe) as handle:
            pipe(prompt=list(req.inputs), num_inference_steps=3, output_type="latent",
                 video_length=plan.tokens.frames, height=plan.tokens.height, width=plan.tokens.width,
                 clean_caption=False)  # fmt: skip
        assert handle.stats().method_counts == plan.summary.method_counts


def test_a_compiled_plan_refuses_another_model(pipelines, profiled):
    plan = compile_plan(profiled["pixart-sigma"][0].profile, 0.9)
    with pytest.raises(PlanError, match=r"\$\.model\.class_name"):
        runtime.apply(plan, pipelines["dit"].transformer)


# ---------------------------------------------------------------------------
# the law on arbitrary profiles


@st.composite
def profiles(draw):
    steps, layers, lags = draw(st.integers(2, 6)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    cfg = draw(st.booleans())
    dist = st.floats(0.0, 2.0) | st.none()

    def lag_grid():
        return [[[draw(dist) if k <= t else None for k in range(1, lags + 1)] for _ in range(layers)] for t in range(steps)]

    def step_grid():
        return [[None if t == 0 else draw(dist) for _ in range(layers)] for t in range(steps)]

    probes = draw(st.sets(st.sampled_from(["ast", "wars", "wars_asc", "asc"] if cfg else ["ast", "wars"]), min_size=1))
    pairs = forecast_pairs(lags)
    forecast = [[[draw(dist) if k <= t else None for _, k in pairs] for _ in range(layers)] for t in range(steps)]
    weights = [None] + [draw(st.floats(0.0, 4.0)) for _ in range(steps - 1)]
    return sized_profile(
        cfg, layers, steps, lags,
        ast=lag_grid(),
        wars=lag_grid(),
        wars_after_asc=lag_grid() if cfg else None,
        wars_asc=lag_grid() if cfg else None,
        asc=step_grid() if cfg else None,
        output_norm=[[draw(st.floats(0.0, 10.0)) for _ in range(layers)] for _ in range(steps)],
        loss={p: step_grid() for p in probes},
        forecast=draw(st.sampled_from([forecast, None])),
        step_weight=draw(st.sampled_from([weights, None])),
    )  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    profile=profiles(),
    deltas=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=4),
    combine=st.sampled_from(["sum", "rss"]),
)
def test_on_any_profile_lower_delta_never_keeps_more_attention(profile, deltas, combine):
    compiler = Compiler(profile, combine=combine)
    deltas = sorted(deltas, reverse=True)
    plans = [compiler.plan(d) for d in [1.0, *deltas]]
    assert {m for row in plans[0].methods for m in row} == {"full"}
    kept = [p.summary.attention_flops_fraction for p in plans]
    assert all(later <= earlier for earlier, later in zip(kept, kept[1:]))
    for plan in plans:
        assert decode_plan(encode_plan(plan)) == plan
        expected = summarize(plan.methods, plan.tokens.num_tokens, plan.window)
        assert plan.summary == expected


def test_delta_is_honoured_to_the_compile_resolution(profiled):
    compiler = Compiler(profiled["dit"][0].profile)
    on_grid = compiler.plan(0.95)
    assert compiler.plan(0.95 - 0.4 / RESOLUTION).methods == on_grid.methods


# ---------------------------------------------------------------------------
# the commands

runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli.app, [str(a) for a in args], env={"COLUMNS": "120"})


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def profile_file(folders, tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "pixart.profile"
    # latencies and the time objective: tests/planner/test_latency.py
    result = invoke("profile", "--model", folders["pixart-sigma"], "-o", path, "--steps", "4", "--num-prompts", "2",
                    "--no-latency")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "profile time" in result.stdout and "KiB" in result.stdout
    return path


def test_build_from_profile_writes_the_compiled_plan(profile_file, folders, tmp_path):
    output = tmp_path / "plan.json"
    result = invoke("build", "--from-profile", profile_file, "--delta", "0.9", "-o", output,
                    "--model", folders["pixart-sigma"])  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = load_plan(output)
    assert plan == compile_plan(load_profile(profile_file), 0.9)
    assert f"{100 * plan.summary.attention_flops_fraction:.1f} %" in result.stdout


def test_profile_without_heads_skips_them_and_heads_plans_are_refused(profile_file, folders, tmp_path):
    assert load_profile(profile_file).measurements.head_ast is not None  # measured by default
    path = tmp_path / "no-heads.profile"
    result = invoke("profile", "--model", folders["pixart-sigma"], "-o", path, "--steps", "3", "--num-prompts", "1",
                    "--no-latency", "--no-heads", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    m = load_profile(path).measurements
    assert m.head_ast is None and m.head_wars is None and m.ast is not None
    refused = invoke("build", "--from-profile", path, "--delta", "0.9", "-o", tmp_path / "no.json", "--heads")
    assert refused.exit_code == 2 and "heads: the profile measured no per-head distances" in one_error_line(refused)
    assert not (tmp_path / "no.json").exists()


def test_build_and_sweep_from_profile_take_the_pick(profile_file, tmp_path):
    output = tmp_path / "plan.json"
    result = invoke("build", "--from-profile", profile_file, "--delta", "0.8", "-o", output, "--pick", "ratio")
    assert result.exit_code == 0, result.output
    plan = load_plan(output)
    assert plan == compile_plan(load_profile(profile_file), 0.8, pick="ratio") and plan.calibration.search.endswith("-ratio")
    swept = invoke("sweep", "--from-profile", profile_file, "--deltas", "0.8", "-o", tmp_path, "--pick", "ratio")
    assert swept.exit_code == 0, swept.output
    assert load_plan(tmp_path / "plan-0.8.json") == plan
    for command in (["build", "--delta", "0.8", "-o", tmp_path / "no.json"], ["sweep", "--deltas", "0.8"]):
        refused = invoke(*command, "--from-profile", profile_file, "--pick", "best")
        assert refused.exit_code == 2 and "pick: use cheapest or ratio (got 'best')" in one_error_line(refused)
    assert not (tmp_path / "no.json").exists()


def test_build_from_profile_with_ffn_and_step_weights(profile_file, tmp_path):
    output = tmp_path / "plan.json"
    result = invoke("build", "--from-profile", profile_file, "--delta", "0.8", "-o", output, "--ffn",
                    "--step-weights")  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = load_plan(output)
    assert plan == compile_plan(load_profile(profile_file), 0.8, ffn=True, weighted=True)
    assert plan.calibration.search == "profile-weighted-transformer" and plan.ffn is not None
    assert "feed-forward FLOPs" in result.stdout and "transformer FLOPs" in result.stdout
    refused = invoke("build", "--from-profile", profile_file, "--delta", "0.8", "-o", tmp_path / "no.json", "--ffn",
                     "--objective", "flops")  # fmt: skip
    assert refused.exit_code == 2
    assert "objective: feed-forward reuse is compiled for --objective transformer" in one_error_line(refused)
    assert not (tmp_path / "no.json").exists()


def test_uniform_schedule_with_feed_forward_reuse_skips_whole_steps(profile_file):
    profile = load_profile(profile_file)
    plan = uniform_plan(base_plan(profile), 2, 2, "forecast", ffn=True)  # 4 steps: computed 0, 1, 3
    width = len(profile.measurements.ffn_reuse[0])
    assert plan.ffn == [["compute"] * width] * 2 + [["forecast"] * width] + [["compute"] * width]
    assert decode_plan(encode_plan(plan)) == plan
    assert plan.summary.transformer_flops_fraction < 1.0
    assert plan.summary.ffn_flops_fraction == pytest.approx(3 / 4)


def test_refine_keeps_the_cost_and_writes_a_valid_plan(profile_file, folders, tmp_path):
    start = uniform_plan(base_plan(load_profile(profile_file)), 2, 2, "forecast")  # computed 0, 1, 3 of 4 steps
    source, output = tmp_path / "plan.json", tmp_path / "refined.json"
    source.write_bytes(encode_plan(start))
    result = invoke("refine", source, "-o", output, "--model", folders["pixart-sigma"], "--evals", "4", "--quiet")
    assert result.exit_code == 0, result.output
    refined = load_plan(output)
    assert [sorted(c) for c in zip(*refined.methods)] == [sorted(c) for c in zip(*start.methods)]  # same per layer
    assert refined.summary.attention_flops_fraction == start.summary.attention_flops_fraction
    assert "PSNR against raw on 2 calibration prompts" in result.stdout and "attention executed 75.0%" in result.stdout
    assert ("next seeds" in result.stdout) == (" 0 moves kept" not in result.stdout)  # checked where it moved
    unchecked = invoke("refine", source, "-o", output, "--model", folders["pixart-sigma"], "--evals", "4", "--quiet",
                       "--no-check")  # fmt: skip
    assert unchecked.exit_code == 0 and "next seeds" not in unchecked.stdout
    prompts = tmp_path / "other.txt"
    prompts.write_text("a red cube\na blue ball\n")
    wrong = invoke("refine", source, "-o", tmp_path / "no.json", "--model", folders["pixart-sigma"],
                   "--prompts", prompts)  # fmt: skip
    assert wrong.exit_code == 2 and "prompts: not the plan's calibration prompts" in one_error_line(wrong)
    assert not (tmp_path / "no.json").exists()
    same = invoke("refine", source, "-o", source, "--model", folders["pixart-sigma"])
    assert same.exit_code == 2 and "is the plan input" in one_error_line(same)


def test_sweep_writes_one_plan_per_delta_and_tabulates_them(profile_file, tmp_path):
    result = invoke("sweep", "--from-profile", profile_file, "--deltas", "0.99,0.9", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    for delta in (0.99, 0.9):
        plan = load_plan(tmp_path / f"plan-{delta:g}.json")
        assert plan.calibration.delta == delta
        assert f"{100 * plan.summary.attention_flops_fraction:.1f} %" in result.stdout
    rows = json.loads(invoke("sweep", "--from-profile", profile_file, "--deltas", "1,0.5", "--json").stdout)
    assert [r["delta"] for r in rows] == [1.0, 0.5]
    assert rows[0]["attention_flops_fraction"] == 1.0 >= rows[1]["attention_flops_fraction"]
    rss = invoke("sweep", "--from-profile", profile_file, "--deltas", "0.9", "--combine", "rss", "-o", tmp_path)
    assert rss.exit_code == 0
    assert load_plan(tmp_path / "plan-0.9.json").calibration.search == "profile-rss"
    bad = invoke("sweep", "--from-profile", profile_file, "--deltas", "0.9,1.5")
    assert bad.exit_code == 2 and "deltas: 1.5 is not in (0, 1]" in one_error_line(bad)


def test_search_profile_builds_end_to_end(folders, tmp_path):
    output = tmp_path / "plan.json"
    result = invoke("build", "--model", folders["dit"], "--delta", "0.9", "-o", output, "--steps", "4",
                    "--num-prompts", "2", "--search", "profile", "--lags", "2", "--no-latency", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = load_plan(output)
    assert plan.calibration.search == "profile" and plan.calibration.delta == 0.9


def test_profile_settings_need_the_profile_search(folders, tmp_path):
    result = invoke("build", "--model", folders["dit"], "--delta", "0.9", "-o", tmp_path / "plan.json", "--lags", "2")
    assert result.exit_code == 2
    assert "lags: applies to --search profile only" in one_error_line(result)
    assert not (tmp_path / "plan.json").exists()
    picked = invoke("build", "--model", folders["dit"], "--delta", "0.9", "-o", tmp_path / "plan.json", "--pick", "ratio")
    assert picked.exit_code == 2 and "pick: applies to --search profile only" in one_error_line(picked)


@pytest.mark.parametrize(
    "case, args, code, expected",
    [
        ("other model", ["--model", "{dit}"], 1, "$.model.class_name"),
        ("corrupted", ["--from-profile", "{broken}"], 1, "not a profile"),
        ("a plan given", ["--from-profile", "{plan}"], 1, "not a profile"),
        ("missing", ["--from-profile", "{tmp}/none.profile"], 1, "cannot read profile"),
        ("fixed setting", ["--steps", "5"], 2, "steps: --steps is fixed by the profile"),
        ("no delta", ["--delta", None], 2, "delta: required"),
    ],
)
def test_bad_compiles_are_one_line_and_write_nothing(profile_file, folders, tmp_path, case, args, code, expected):
    (tmp_path / "broken.profile").write_bytes(profile_file.read_bytes()[:-7])
    (tmp_path / "plan.json").write_text(json.dumps({"schema_version": 1}))
    names = {"dit": folders["dit"], "broken": tmp_path / "broken.profile", "plan": tmp_path / "plan.json", "tmp": tmp_path}
    command = ["build", "--from-profile", profile_file, "--delta", "0.9", "-o", tmp_path / "out.json"]
    for option, value in zip(args[::2], args[1::2]):
        if option in command:
            at = command.index(option)
            command[at : at + 2] = [] if value is None else [option, value.format(**names)]
        else:
            command += [option, value.format(**names)]
    result = invoke(*command)
    assert result.exit_code == code, result.output
    assert expected in one_error_line(result)
    assert not (tmp_path / "out.json").exists()


def test_a_profile_of_another_configuration_is_refused_against_the_model(profile_file, folders, tmp_path):
    profile = load_profile(profile_file)
    other = msgspec.structs.replace(profile, model=msgspec.structs.replace(profile.model, config_hash="0" * 64))
    write_profile(other, tmp_path / "other.profile")
    result = invoke("build", "--from-profile", tmp_path / "other.profile", "--delta", "0.9",
                    "-o", tmp_path / "plan.json", "--model", folders["pixart-sigma"])  # fmt: skip
    assert result.exit_code == 1
    assert "$.model.config_hash" in one_error_line(result)
    assert not (tmp_path / "plan.json").exists()
