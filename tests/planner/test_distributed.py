"""Data-parallel calibration: ranks started by torchrun reproduce the single-process artifacts.

Each job runs the real ``planner`` command under ``torch.distributed.run`` on the CPU
(Gloo), two ranks of one thread, on the tiny pipelines saved as folders; the
single-process references run in this process through the same command.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import torch.distributed as dist
from typer.testing import CliRunner

import cli
from planner.compile import compile_plans, load_profile
from runtime import load_plan

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DELTAS = (0.99, 0.95, 0.9, 0.8, 0.6)


def calibration_args(folder: Path, output: Path, *extra: str) -> list[str]:
    """Three prompts, three steps, on the CPU whatever the machine has; no latencies (timings
    differ between runs, the artifacts compared here must not)."""
    return ["--model", str(folder), "-o", str(output), "--steps", "3", "--num-prompts", "3",
            "--device", "cpu", "--no-latency", *extra]  # fmt: skip


class Job:
    """A command started in the background, its output in files."""

    def __init__(self, command: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
            self.process = subprocess.Popen(command, cwd=cwd, env={**ENV, **(env or {})}, stdout=out, stderr=err)

    def finish(self) -> tuple[int, str, str]:
        """Exit status, stdout and stderr (raises if the job hangs)."""
        code = self.process.wait(timeout=240)
        return code, Path(f"{self.log}.out").read_text(), Path(f"{self.log}.err").read_text()


@pytest.fixture(scope="module")
def jobs(folders, tmp_path_factory) -> dict[str, Job]:
    """The data-parallel runs, started together: process start-up dominates and overlaps.

    ``build`` (DiT) and ``profile`` (PixArt-Σ): two ranks under torchrun, writing into
    folders of those names. ``rank0``/``rank1``: two nodes as torchrun starts them (the
    same environment contract), in folders ``node0``/``node1``, each with its own copy of
    the model; node 1's copy lacks the transformer weights.
    """
    root = tmp_path_factory.mktemp("distributed")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "cli"]
    build = ["build", "--delta", "0.95", *calibration_args(folders["dit"], root / "build" / "two.json")]
    profile = ["profile", *calibration_args(folders["pixart-sigma"], root / "profile" / "two.profile")]
    (root / "build").mkdir()
    (root / "profile").mkdir()
    started = {
        "build": Job([*torchrun, *build], ROOT, root / "build-log"),
        "profile": Job([*torchrun, *profile], ROOT, root / "profile-log"),
    }
    for node in ("node0", "node1"):
        shutil.copytree(folders["dit"], root / node / "model")
    for weights in (root / "node1" / "model" / "transformer").glob("diffusion_pytorch_model.*"):
        weights.unlink()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    node_build = [sys.executable, "-m", "cli", "build", "--delta", "0.95",
                  *calibration_args(Path("model"), Path("plan.json"))]  # fmt: skip
    for rank in (0, 1):
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": "0"}
        started[f"rank{rank}"] = Job(node_build, root / f"node{rank}", root / f"rank{rank}-log", env)
    yield started
    for job in started.values():
        job.process.kill()


def single(*args: str) -> None:
    result = CliRunner().invoke(cli.app, list(args))
    assert result.exit_code == 0, result.output


def without_world_size(artifact):
    calibration = msgspec.structs.replace(artifact.calibration, world_size=1)
    return msgspec.structs.replace(artifact, calibration=calibration)


def test_two_ranks_search_the_single_process_plan(folders, jobs):
    folder = jobs["build"].log.parent / "build"
    single("build", "--delta", "0.95", *calibration_args(folders["dit"], folder / "one.json"))
    # chunks like the ranks' shares (prompts 0-1 and 2): the same sums, added in the same order
    single("build", "--delta", "0.95", *calibration_args(folders["dit"], folder / "chunked.json", "--calib-batch", "2"))
    code, stdout, stderr = jobs["build"].finish()
    assert code == 0, stderr
    assert stdout.count("attention FLOPs kept") == 1  # rank 0 alone summarizes
    assert sorted(os.listdir(folder)) == ["chunked.json", "one.json", "two.json"]  # rank 1 wrote nothing
    two, one = load_plan(folder / "two.json"), load_plan(folder / "one.json")
    assert two.calibration.world_size == 2 and one.calibration.world_size == 1
    assert two.methods == one.methods
    assert {m for row in two.methods for m in row} != {"full"}
    for row_two, row_one in zip(two.losses[1:], one.losses[1:]):
        assert row_two == pytest.approx(row_one, rel=1e-4, abs=1e-7)
    assert without_world_size(two) == load_plan(folder / "chunked.json")


def test_two_ranks_profile_like_one_process(folders, jobs):
    folder = jobs["profile"].log.parent / "profile"
    single("profile", *calibration_args(folders["pixart-sigma"], folder / "one.profile"))
    single("profile", *calibration_args(folders["pixart-sigma"], folder / "chunked.profile", "--calib-batch", "2"))
    code, _, stderr = jobs["profile"].finish()
    assert code == 0, stderr
    two, one = load_profile(folder / "two.profile"), load_profile(folder / "one.profile")
    assert two.calibration.world_size == 2
    assert without_world_size(two) == load_profile(folder / "chunked.profile")
    plans_two, plans_one = compile_plans(two, DELTAS), compile_plans(one, DELTAS)
    assert [p.methods for p in plans_two] == [p.methods for p in plans_one]
    assert all(p.calibration.world_size == 2 for p in plans_two)


def test_more_ranks_than_prompts_are_refused_before_loading(folders, tmp_path, monkeypatch):
    import planner.loading

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(planner.loading, "load_pipeline", never)
    env = {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0"}  # what torchrun gives rank 0 of 4
    args = ["build", "--delta", "0.95", *calibration_args(folders["dit"], tmp_path / "plan.json")]
    result = CliRunner().invoke(cli.app, args, env=env)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == "error: world_size: 4 processes for 3 calibration prompts; launch at most 3"
    assert not dist.is_initialized()
    assert os.listdir(tmp_path) == []


def test_a_failing_rank_ends_every_rank_and_nothing_is_written(jobs):
    """Rank 1 fails once the ranks have met; rank 0, already searching, stops on its own."""
    (code1, _, err1), (code0, _, err0) = jobs["rank1"].finish(), jobs["rank0"].finish()
    assert code1 == 2 and err1.startswith("error: rank 1/2: model: cannot load the pipeline"), err1
    assert code0 == 1 and err0.startswith("error: rank 0/2: lost contact with another rank"), err0
    assert len(err0.splitlines()) == len(err1.splitlines()) == 1
    root = jobs["rank0"].log.parent
    assert sorted(os.listdir(root / "node0")) == sorted(os.listdir(root / "node1")) == ["model"]
