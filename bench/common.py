"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def device_and_dtype(device: str, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """The benchmark's device and dtype: ``dtype`` by name, else float16 on CUDA and float32 elsewhere."""
    where = torch.device(device)
    return where, getattr(torch, dtype or ("float16" if where.type == "cuda" else "float32"))


def split_forms(text: str) -> list[str]:
    """A comma-separated list of ``--window`` forms, blanks dropped."""
    return [f.strip() for f in text.split(",") if f.strip()]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"
