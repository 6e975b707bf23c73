"""The ``planner`` command, end to end on tiny pipelines saved as local folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
import planner.build
from planner.registry import REGISTRY
from runtime import load_plan
from schemas import Latency, json_schema

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def invoke(*args, columns: int = 80):
    return runner.invoke(cli.app, [str(a) for a in args], env={"COLUMNS": str(columns)})


def build_args(folder: Path, output: Path, *extra: str) -> list[str]:
    return [
        "build", "--model", folder, "--delta", "0.95", "-o", output,
        "--steps", "4", "--num-prompts", "2", *extra,
    ]  # fmt: skip


# Fixed latencies, ms per layer-step, every method faster than `full`: the measured ones vary
# with the machine's load, and a loaded machine may find nothing faster and keep every cell full.
FIXED_LATENCY = Latency(
    device="test device", dtype="float32", kernel="auto", rows=2,
    seconds={"full": 2.0, "full_refresh": 2.4, "asc": 1.0, "asc_refresh": 1.4, "wars": 1.6, "wars_asc": 0.8,
             "ast": 0.2, "forecast": 0.3},
)  # fmt: skip


@pytest.fixture(scope="module")
def built(folders, tmp_path_factory):
    """A plan built by the CLI on the tiny PixArt-Σ folder (fixed latencies), and the command's result."""
    output = tmp_path_factory.mktemp("built") / "plan.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(planner.build, "measure_latency", lambda *args, **kwargs: FIXED_LATENCY)
        result = invoke(*build_args(folders["pixart-sigma"], output))
    return output, result


def only_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


def test_build_writes_a_valid_plan_and_summarizes_it(built):
    output, result = built
    assert result.exit_code == 0, result.output
    plan = load_plan(output)
    assert plan.sampling.num_steps == 4 and plan.calibration.num_prompts == 2
    assert f"{100 * plan.summary.attention_flops_fraction:.1f} %" in result.stdout
    for label in ("attention FLOPs kept", "methods", "search time", str(output)):
        assert label in result.stdout


def test_show_prints_the_grid_and_json_summary(built):
    output, _ = built
    plan = load_plan(output)
    shown = invoke("show", output)
    assert shown.exit_code == 0
    letters = {"full": "F", "wars": "W", "ast": "A", "asc": "C", "wars_asc": "B"}
    for t, row in enumerate(plan.methods):
        assert f"{t}  {''.join(letters[m] for m in row)}" in shown.stdout
    facts = json.loads(invoke("show", "--json", output).stdout)
    assert facts["summary"] == {
        "attention_flops_fraction": plan.summary.attention_flops_fraction,
        "method_counts": plan.summary.method_counts,
        "time_fraction": plan.summary.time_fraction,
        "ffn_flops_fraction": None,
        "transformer_flops_fraction": plan.summary.transformer_flops_fraction,
    }
    assert 0 < plan.summary.transformer_flops_fraction < 1
    assert facts["latency"]["seconds"] == plan.latency.seconds
    assert facts["model"]["config_hash"] == plan.model.config_hash
    assert "methods" not in facts


def test_validate_accepts_the_plan_and_checks_the_model(built, folders):
    output, _ = built
    assert invoke("validate", output).exit_code == 0
    fits = invoke("validate", output, "--model", folders["pixart-sigma"])
    assert fits.exit_code == 0 and "valid" in fits.stdout
    other = invoke("validate", output, "--model", folders["dit"])
    assert other.exit_code == 1
    assert "$.model.class_name" in only_error_line(other)


def test_validate_rejects_an_inconsistent_plan_naming_the_field(built, tmp_path):
    output, _ = built
    doc = json.loads(output.read_text())
    doc["summary"]["method_counts"]["full"] += 1
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(doc))
    result = invoke("validate", broken)
    assert result.exit_code == 1
    assert "$.summary.method_counts.full" in only_error_line(result)


def test_schema_prints_the_plan_json_schema():
    result = invoke("schema")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == json_schema()


def test_models_lists_the_registry():
    result = invoke("models", columns=200)
    assert result.exit_code == 0
    for spec in REGISTRY:
        assert spec.name in result.stdout and spec.source in result.stdout


def test_build_reads_a_config_file_and_options_override_it(folders, tmp_path):
    output = tmp_path / "plan.json"
    config = tmp_path / "build.toml"
    config.write_text(f'model = "{folders["dit"]}"\ndelta = 0.9\nsteps = 3\nclasses = [5, 9]\n')
    result = invoke("build", "--config", config, "-o", output, "--steps", "5", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    plan = load_plan(output)
    assert (plan.sampling.num_steps, plan.calibration.delta, plan.calibration.num_prompts) == (5, 0.9, 2)


@pytest.mark.parametrize(
    "case, extra, expected",
    [
        ("unknown model", ["--model", "no-such-model"], "model: unknown model"),
        ("unsupported pipeline", ["--model", "{tmp}/wan"], "supported pipelines are"),
        ("delta above 1", ["--delta", "1.5"], "delta:"),
        ("delta zero", ["--delta", "0"], "delta:"),
        ("unreadable prompts", ["--prompts", "{tmp}/missing.txt"], "prompts: cannot read"),
        ("output under a file", ["-o", "{tmp}/file/plan.json"], "output:"),
        ("output is a folder", ["-o", "{tmp}"], "output:"),
        ("window too wide", ["--window", "64"], "window:"),
        ("unknown setting", ["--config", "{tmp}/bad.toml"], "colour: unknown setting"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_file(folders, tmp_path, case, extra, expected):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "bad.toml").write_text('colour = "red"\n')
    (tmp_path / "wan").mkdir()
    (tmp_path / "wan" / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    output = tmp_path / "plan.json"
    args = build_args(folders["pixart-sigma"], output)
    for option, value in zip(extra[::2], extra[1::2]):
        value = value.format(tmp=tmp_path)
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    before = sorted(os.listdir(tmp_path))
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert expected in only_error_line(result)
    assert sorted(os.listdir(tmp_path)) == before


def test_interrupted_build_writes_nothing(folders, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(planner.build, "build_plan", interrupted)
    result = invoke(*build_args(folders["pixart-sigma"], tmp_path / "plan.json"))
    assert result.exit_code == 130
    assert "interrupted" in only_error_line(result)
    assert os.listdir(tmp_path) == []


def run_cli(args: list[str], env: dict[str, str], prelude: str = "") -> subprocess.CompletedProcess:
    code = f"{prelude}import runpy; runpy.run_module('cli', run_name='__main__')"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("model", "repo"),
    [
        ("pixart", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"),
        ("sd3.5-medium", "stabilityai/stable-diffusion-3.5-medium"),
        ("flux", "black-forest-labs/FLUX.1-dev"),
    ],
)
def test_missing_checkpoint_offline_says_how_to_provide_it(tmp_path, model, repo):
    output = tmp_path / "plan.json"
    result = run_cli(
        ["build", "--model", model, "--delta", "0.9", "-o", str(output)],
        {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert repo in lines[0]
    assert "Hugging Face cache" in lines[0] and "local folder" in lines[0]
    assert not output.exists()


def test_without_the_planner_extra_the_command_says_what_to_install():
    result = run_cli(["--help"], {}, prelude="import sys; sys.modules['typer'] = None; ")
    assert result.returncode == 1
    assert result.stderr.strip() == "planner needs the planner extra: pip install 'ditfastattn[planner]'"


def test_show_marks_per_head_cells_and_counts_their_heads(tmp_path):
    from schemas import encode_plan
    from tests.schemas.test_heads import head_plan

    path = tmp_path / "heads.json"
    path.write_bytes(encode_plan(head_plan()))
    shown = invoke("show", path, columns=160)
    assert shown.exit_code == 0, shown.output
    assert "1  HWA" in shown.stdout and "2  WFH" in shown.stdout
    assert "2 of the 'wars' cells (H in the grid); their 6 heads: full 16.7 %, wars 33.3 %, ast 50.0 %" in shown.stdout
    facts = json.loads(invoke("show", "--json", path).stdout)
    assert facts["heads"] == {"cells": 2, "full": 1, "wars": 2, "ast": 3}


def test_show_a_plan_with_an_empty_list_of_per_head_cells(tmp_path):
    import msgspec

    from schemas import encode_plan
    from tests.schemas.test_heads import head_plan

    path = tmp_path / "none.json"
    path.write_bytes(encode_plan(msgspec.structs.replace(head_plan(heads={}), heads=[])))
    shown = invoke("show", path, columns=160)
    assert shown.exit_code == 0, shown.output
    assert any(line.split() == ["per-head", "cells", "none"] for line in shown.stdout.splitlines())
