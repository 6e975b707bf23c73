"""Bad inputs and outputs: one line naming the field, a non-zero exit, no traceback,
inputs and existing outputs left byte for byte as they were."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from runtime import load_plan
from schemas import encode_plan, summarize, with_figures
from tests.planner.test_cli import ROOT, build_args, invoke, only_error_line


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry of ``folder``: its file type and, for regular files, a hash of its bytes."""
    found = {}
    for entry in sorted(folder.iterdir()):
        mode = entry.lstat().st_mode
        digest = hashlib.sha256(entry.read_bytes()).hexdigest() if stat.S_ISREG(mode) else ""
        found[entry.name] = (stat.S_IFMT(mode), digest)
    return found


def refused(result, field: str, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    line = only_error_line(result)
    assert line.startswith(f"error: {field}"), line
    return line


@pytest.fixture(scope="module")
def plan_file(folders, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("plan") / "plan.json"
    result = invoke(*build_args(folders["pixart-sigma"], output, "--quiet"))
    assert result.exit_code == 0, result.output
    return output


# ---------------------------------------------------------------------------
# outputs never destroy inputs


def test_output_fifo_is_refused_and_stays_a_fifo(folders, tmp_path):
    fifo = tmp_path / "plan.json"
    os.mkfifo(fifo)
    before = snapshot(tmp_path)
    refused(invoke(*build_args(folders["pixart-sigma"], fifo)), "output")
    assert snapshot(tmp_path) == before


def test_output_device_is_refused_and_stays_a_device(folders, tmp_path):
    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a second /dev/null
    except PermissionError:
        pytest.skip("making a device node needs root")
    before = snapshot(tmp_path)
    assert "character device" in refused(invoke(*build_args(folders["pixart-sigma"], device)), "output")
    assert snapshot(tmp_path) == before


def test_output_symlink_replaces_its_target_and_stays_a_link(folders, tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "plan.json"
    link.symlink_to(target.name)
    result = invoke(*build_args(folders["pixart-sigma"], link, "--quiet"))
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == target.name
    assert load_plan(target).sampling.num_steps == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "real.json"]


@pytest.mark.parametrize("source", ["prompts", "config"])
def test_output_that_is_an_input_is_refused_before_any_work(folders, tmp_path, source):
    same = tmp_path / "input.txt"
    if source == "prompts":
        same.write_text("a small red boat\na tall green tree\n")
        args = build_args(folders["pixart-sigma"], same, "--prompts", str(same))
    else:
        same.write_text(f'model = "{folders["pixart-sigma"]}"\ndelta = 0.9\nsteps = 3\n')
        args = ["build", "--config", str(same), "-o", str(same)]
    link = tmp_path / "link.txt"
    link.symlink_to(same.name)  # the same file under another name is the same input
    args[args.index("-o") + 1] = str(link)
    before = snapshot(tmp_path)
    assert "input" in refused(invoke(*args), "output")
    assert snapshot(tmp_path) == before


def test_build_from_profile_onto_the_profile_is_refused(tmp_path):
    profile = tmp_path / "model.profile"
    profile.write_bytes(b"not checked yet: the output is refused first")
    before = snapshot(tmp_path)
    refused(invoke("build", "--from-profile", profile, "--delta", "0.9", "-o", profile), "output")
    assert snapshot(tmp_path) == before


def test_eval_grid_onto_the_plan_is_refused(plan_file):
    before = snapshot(plan_file.parent)
    refused(invoke("eval", plan_file, "--save-grid", plan_file), "save_grid")
    assert snapshot(plan_file.parent) == before


@pytest.fixture(scope="module")
def profile_file(folders, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("profile") / "model.profile"
    args = ["profile", "--model", folders["dit"], "-o", output, "--steps", "3", "--num-prompts", "2", "--quiet"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return output


def test_sweep_gives_distinct_deltas_distinct_files_and_refuses_repeats(profile_file, tmp_path):
    result = invoke("sweep", "--from-profile", profile_file, "--deltas", "0.5,0.5000001", "-o", tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan-0.5.json", "plan-0.5000001.json"]
    before = snapshot(tmp_path)
    refused(invoke("sweep", "--from-profile", profile_file, "--deltas", "0.5,0.5", "-o", tmp_path), "deltas")
    assert snapshot(tmp_path) == before


def test_sweep_into_the_profile_is_refused(profile_file, tmp_path):
    link = tmp_path / "plan-0.9.json"
    link.symlink_to(profile_file)
    before = profile_file.read_bytes()
    refused(invoke("sweep", "--from-profile", profile_file, "--deltas", "0.9", "-o", tmp_path), "output_dir")
    assert profile_file.read_bytes() == before


# ---------------------------------------------------------------------------
# settings: non-finite and out-of-range values, unreadable files


@pytest.mark.parametrize(
    "option, value, field",
    [
        ("--guidance", "inf", "guidance"),
        ("--guidance", "nan", "guidance"),
        ("--guidance", "1e300", "guidance"),
        ("--delta", "nan", "delta"),
        ("--window-frac", "inf", "window_frac"),
        ("--steps", "10000", "steps"),
        ("--seed", str(2**64), "seed"),
        ("--seed", "-1", "seed"),
    ],
)
def test_non_finite_and_out_of_range_settings_are_refused(folders, tmp_path, option, value, field):
    output = tmp_path / "plan.json"
    args = build_args(folders["pixart-sigma"], output)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    refused(invoke(*args), field)
    assert not output.exists()


def test_steps_beyond_the_schedulers_training_timesteps_are_refused(folders, tmp_path):
    import shutil

    model = tmp_path / "dit"
    shutil.copytree(folders["dit"], model)
    config_file = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["num_train_timesteps"] = 10
    config_file.write_text(json.dumps(config))
    output = tmp_path / "plan.json"
    line = refused(invoke("build", "--model", model, "--delta", "0.9", "-o", output, "--steps", "11"), "steps")
    assert "10 training timesteps" in line
    assert not output.exists()


def test_binary_config_is_one_line(tmp_path):
    config = tmp_path / "build.toml"
    config.write_bytes(b"\xff\xfe\x00model = 1\x80")
    refused(invoke("build", "--config", config, "-o", tmp_path / "plan.json"), "config")
    assert not (tmp_path / "plan.json").exists()


# ---------------------------------------------------------------------------
# plans that validate run: validate --model applies eval's and the runtime's checks


def edited(plan_file: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the plan with header sections replaced; the transformer and feed-forward
    figures derived again (a window change moves them when the plan has ``wars`` steps)."""
    plan = load_plan(plan_file)
    plan = with_figures(msgspec.structs.replace(plan, **changes))
    path = tmp_path / "edited.json"
    path.write_bytes(encode_plan(plan))
    return path


def test_validate_model_checks_tokens_against_the_size(plan_file, folders, tmp_path):
    plan = load_plan(plan_file)
    tokens = msgspec.structs.replace(plan.tokens, height=plan.tokens.height * 2)
    # with a band: a tiled window's grid would not fit the new size on its own
    fraction = summarize(plan.methods, plan.tokens.num_tokens, 8).attention_flops_fraction
    summary = msgspec.structs.replace(plan.summary, attention_flops_fraction=fraction)
    path = edited(plan_file, tmp_path, tokens=tokens, window=8, summary=summary)
    assert invoke("validate", path).exit_code == 0  # consistent on its own
    refused(invoke("validate", path, "--model", folders["pixart-sigma"]), "$.tokens.num_tokens", code=1)


def test_validate_model_checks_cfg_against_guidance(plan_file, folders, tmp_path):
    plan = load_plan(plan_file)
    sampling = msgspec.structs.replace(plan.sampling, guidance_scale=1.0)
    path = edited(plan_file, tmp_path, sampling=sampling)
    refused(invoke("validate", path, "--model", folders["pixart-sigma"]), "$.sampling.cfg", code=1)
    refused(invoke("eval", path, "--model", folders["pixart-sigma"], "-n", "1"), "$.sampling.cfg", code=1)


def test_validate_model_checks_the_scheduler(plan_file, folders, tmp_path):
    plan = load_plan(plan_file)
    sampling = msgspec.structs.replace(plan.sampling, scheduler="NoSuchScheduler")
    path = edited(plan_file, tmp_path, sampling=sampling)
    refused(invoke("validate", path, "--model", folders["pixart-sigma"]), "$.sampling.scheduler", code=1)


# ---------------------------------------------------------------------------
# bounded rendering of large plans


def test_show_summarises_a_large_plan_in_few_lines(plan_file, tmp_path):
    plan = load_plan(plan_file)
    steps, layers = 1000, 200
    grid = [["full"] * layers] + [["ast", "full"] * (layers // 2) for _ in range(steps - 1)]
    big = msgspec.structs.replace(
        plan,
        model=msgspec.structs.replace(plan.model, num_layers=layers),
        sampling=msgspec.structs.replace(plan.sampling, num_steps=steps),
        methods=grid,
        losses=None,
        latency=None,
        costs=None,
        summary=summarize(grid, plan.tokens.num_tokens, plan.window),
    )
    path = tmp_path / "big.json"
    path.write_bytes(encode_plan(big))
    result = invoke("show", path, columns=200)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) < 100
    assert any("steps not shown" in line for line in lines)
    assert any(line.strip().startswith("999 ") for line in lines)  # the last step is shown
    assert "A ast 100" in result.stdout  # per-step method counts instead of 200 letters


# ---------------------------------------------------------------------------
# interrupts while the command starts


def test_interrupt_during_start_up_is_one_line():
    prelude = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'rich.console': raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from planner.__main__ import main\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", prelude, "models"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 130
    assert result.stderr.strip() == "error: interrupted"


def test_an_interrupt_python_can_only_report_still_ends_the_command_in_one_line():
    """Ctrl-C inside an import lock's callback reaches ``sys.unraisablehook``, not ``main``."""
    code = (
        "import sys, planner.__main__ as m\n"
        "sys.unraisablehook = m._unraisable\n"
        "class C:\n"
        "    def __del__(self):\n"
        "        raise KeyboardInterrupt\n"
        "C()\n"
        "print('still running')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 130 and done.stdout == ""
    assert done.stderr == "error: interrupted\n"


@pytest.mark.parametrize("delay", [0.2, 0.5, 1.5])  # after the interpreter itself started
def test_real_ctrl_c_at_any_moment_prints_no_traceback(tmp_path, delay):
    output = tmp_path / "plan.json"
    args = ["build", "--model", "dit-digits", "--delta", "0.9", "-o", str(output), "--steps", "50"]
    process = subprocess.Popen(
        [sys.executable, "-m", "planner", *args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a job started in the background by a shell inherits Ctrl-C ignored; a terminal's would not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr
    # 130: ours; 1: click's "Aborted!" while it parses options; -SIGINT: before Python set its handler
    assert process.returncode in (130, 1, -signal.SIGINT), stderr
    assert len(stderr.strip().splitlines()) <= 1, stderr
    assert not output.exists()
