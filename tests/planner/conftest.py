"""Tiny offline pipelines shared by the planner tests (random weights, built once)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.planner.pipelines import PIPELINES


@pytest.fixture(scope="package", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; a shared machine makes more threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def pipelines() -> dict:
    """One tiny pipeline per supported family, by name."""
    return {name: _quiet(make()) for name, make in PIPELINES.items()}


@pytest.fixture(scope="session")
def pixart(pipelines):
    return pipelines["pixart-sigma"]


@pytest.fixture(scope="session")
def dit(pipelines):
    return pipelines["dit"]


@pytest.fixture(scope="session")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny PixArt-Σ and DiT pipelines saved as local diffusers folders, for the CLI."""
    root = tmp_path_factory.mktemp("models")
    saved = {}
    for name in ("pixart-sigma", "dit"):
        saved[name] = root / name
        PIPELINES[name]().save_pretrained(saved[name])
    return saved
