"""Latency-aware planning: measured method latencies, predicted time, and never a method
slower than ``full`` on the device the plan was made for."""

from __future__ import annotations

import msgspec
import pytest
import torch

import planner.build
from planner.build import build_plan
from planner.compile import compile_plans
from planner.latency import measure_latency
from planner.loading import device_name
from planner.profile import profile_model
from schemas import LATENCY_VARIANTS, Latency, PlanError, decode_plan, encode_plan, time_fraction, variant_grid, with_latency
from tests.planner.pipelines import request
from tests.planner.test_cli import invoke

# Synthetic figures, ms per layer-step: `ast` and `wars` slower than `full` on this "device".
SLOW_AST_AND_WARS = {
    "full": 2.0, "full_refresh": 3.0, "asc": 1.2, "asc_refresh": 1.8, "wars": 2.5, "wars_asc": 0.9, "ast": 2.2,
}  # fmt: skip


def latency(seconds: dict[str, float], device: str = "test device") -> Latency:
    return Latency(device=device, dtype="float32", kernel="auto", rows=2, seconds=seconds)


def test_refreshing_steps_are_charged_their_window_attention():
    grid = [["full", "full", "full"], ["wars", "ast", "asc"], ["ast", "wars", "wars"], ["wars", "full", "full"]]
    assert variant_grid(grid) == [
        ["full_refresh", "full_refresh", "full"],
        ["wars", "ast", "asc_refresh"],
        ["ast", "wars", "wars"],
        ["wars", "full", "full"],
    ]
    table = latency(SLOW_AST_AND_WARS)
    ms = SLOW_AST_AND_WARS
    expected = (2 * ms["full_refresh"] + 3 * ms["full"] + 4 * ms["wars"] + 2 * ms["ast"] + ms["asc_refresh"]) / (
        12 * ms["full"]
    )
    assert time_fraction(grid, table) == pytest.approx(expected, rel=1e-12)
    assert time_fraction([["full"] * 3] * 4, table) == 1.0


@pytest.fixture(scope="module")
def dit_pipe(pipelines):
    return pipelines["dit"]


def test_measured_latency_covers_every_variant_and_round_trips(dit_pipe):
    plan = build_plan(dit_pipe, request(dit_pipe, delta=0.9, latency=True)).plan
    table = plan.latency
    assert set(table.seconds) == {"full", "full_refresh", "asc", "asc_refresh", "wars", "wars_asc", "ast", "forecast"}
    assert all(value > 0 for value in table.seconds.values())
    assert table.rows == 2  # one prompt's conditional and unconditional rows
    assert table.device.startswith("cpu")
    assert plan.summary.time_fraction == pytest.approx(time_fraction(plan.methods, table))
    assert decode_plan(encode_plan(plan)) == plan


def test_search_never_chooses_a_method_slower_than_full(dit_pipe, monkeypatch):
    monkeypatch.setattr(planner.build, "measure_latency", lambda *args, **kwargs: latency(SLOW_AST_AND_WARS))
    plan = build_plan(dit_pipe, request(dit_pipe, delta=0.5, latency=True)).plan
    used = {m for row in plan.methods for m in row}
    assert not used & {"ast", "wars"}
    assert used & {"asc", "wars_asc"}  # the faster ones are still taken at this δ
    without = build_plan(dit_pipe, request(dit_pipe, delta=0.5)).plan
    assert {m for row in without.methods for m in row} & {"ast", "wars"}  # chosen when allowed
    assert without.latency is None and without.summary.time_fraction is None


@pytest.fixture(scope="module")
def timed_profile(dit_pipe):
    profile = profile_model(dit_pipe, request(dit_pipe, latency=True), probes=("ast", "asc")).profile
    return msgspec.structs.replace(profile, latency=latency(SLOW_AST_AND_WARS))


def test_compiled_plans_skip_slower_methods_and_never_cost_more_time_at_lower_delta(timed_profile):
    deltas = [1.0, 0.95, 0.9, 0.8, 0.6, 0.4]
    plans = compile_plans(timed_profile, deltas)  # objective: time, the default with latencies
    times = [p.summary.time_fraction for p in plans]
    assert times[0] == 1.0
    assert all(later <= earlier + 1e-12 for earlier, later in zip(times, times[1:]))
    assert times[-1] < 1.0
    for plan in plans:
        assert not {m for row in plan.methods for m in row} & {"ast", "wars"}
        assert plan.calibration.search == "profile-time"
        assert plan.latency == timed_profile.latency
    flops_plans = compile_plans(timed_profile, deltas, objective="flops")
    assert [p.calibration.search for p in flops_plans] == ["profile"] * len(deltas)


def test_time_objective_needs_latencies(timed_profile):
    bare = msgspec.structs.replace(timed_profile, latency=None)
    with pytest.raises(Exception, match="objective"):
        compile_plans(bare, [0.9], objective="time")
    assert compile_plans(bare, [0.9])[0].summary.time_fraction is None  # flops without latencies


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda p: msgspec.structs.replace(p, summary=msgspec.structs.replace(p.summary, time_fraction=0.5)),
         "$.summary.time_fraction"),
        (lambda p: with_latency(p, latency({"full": 1.0, "ast": 0.5})), "$.latency.seconds"),
        (lambda p: msgspec.structs.replace(p, latency=None), "$.summary.time_fraction"),
    ],
)  # fmt: skip
def test_inconsistent_latency_is_refused_naming_the_field(dit_pipe, monkeypatch, change, field):
    monkeypatch.setattr(planner.build, "measure_latency", lambda *args, **kwargs: latency(SLOW_AST_AND_WARS))
    plan = build_plan(dit_pipe, request(dit_pipe, delta=0.5, latency=True)).plan
    with pytest.raises(PlanError, match=field.replace("$", r"\$").replace(".", r"\.")):
        encode_plan(change(plan))


def test_cli_reports_latencies_and_says_when_they_were_measured_elsewhere(folders, tmp_path):
    output = tmp_path / "plan.json"
    args = ["build", "--model", folders["dit"], "--delta", "0.9", "-o", output, "--steps", "3", "--num-prompts", "2"]
    result = invoke(*args, columns=200)
    assert result.exit_code == 0, result.output
    assert "predicted time" in result.stdout
    plan = decode_plan(output.read_bytes())
    assert plan.latency is not None
    assert invoke("validate", output, "--device", "cpu").stderr == ""  # measured on this machine
    elsewhere = with_latency(plan, msgspec.structs.replace(plan.latency, device="NVIDIA H100 80GB HBM3"))
    output.write_bytes(encode_plan(elsewhere))
    shown = invoke("show", output, columns=200)
    assert shown.exit_code == 0
    assert "latency" in shown.stdout and "NVIDIA H100 80GB HBM3" in shown.stdout
    assert "measured on NVIDIA H100 80GB HBM3" in shown.stderr
    validated = invoke("validate", output, "--device", "cpu")
    assert validated.exit_code == 0 and "measured on NVIDIA H100 80GB HBM3" in validated.stderr
    result = invoke(*args, "--no-latency", columns=200)
    assert result.exit_code == 0 and decode_plan(output.read_bytes()).latency is None


def test_measure_latency_shares_rank_zero_figures(dit_pipe):
    """In one process the figures are this process's own (the data-parallel broadcast is a no-op)."""
    from planner.build import draft_plan, generation_kwargs

    req = request(dit_pipe)
    table = measure_latency(dit_pipe, draft_plan(dit_pipe, req), generation_kwargs(dit_pipe, req), repeats=1, warmup=0)
    assert set(table.seconds) == set(LATENCY_VARIANTS) and all(s > 0 for s in table.seconds.values())
    assert table.device == device_name(torch.device("cpu")) and table.rows == 2  # one prompt's CFG rows
