"""Data-parallel calibration on ``torch.distributed``, as ``torchrun`` launches it (DESIGN §7).

Each rank loads the pipeline on its own device and runs the transformer on its
:func:`share` of the calibration prompts. The pipeline around the transformer still
carries the whole batch, so every prompt gets exactly the latents it gets in one
process; the rows of other ranks' prompts are never computed. Every loss and
measurement is summed over the ranks as sums and counts (:func:`sum_floats`,
:func:`sum_pairs`), so all ranks take the single-process decisions; rank 0 writes
(:func:`is_writer`). Without torchrun (``WORLD_SIZE`` unset or 1) nothing is started
and every function here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from planner.errors import PlannerError, bad_input

TIMEOUT = timedelta(minutes=10)  # how long a collective waits for a rank that is stuck, not dead


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if _active() else 0


def size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def is_writer() -> bool:
    """Whether this rank writes the result and draws the progress (rank 0)."""
    return rank() == 0


def check_size(inputs: int, ranks: int) -> None:
    """Refuse more ranks than calibration inputs: every rank needs at least one."""
    if ranks > inputs:
        raise bad_input(
            f"world_size: {ranks} processes for {inputs} calibration prompts; launch at most {inputs}"
        )


def share(inputs: int) -> range:
    """This rank's calibration inputs out of ``inputs``: contiguous, in rank order, the sizes
    differing by at most one (the first ranks take the larger)."""
    r, n = rank(), size()
    check_size(inputs, n)
    base, extra = divmod(inputs, n)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor) -> None:
    try:
        dist.all_reduce(tensor)
    except RuntimeError as exc:  # a peer's socket closed, or the timeout passed
        minutes = TIMEOUT.seconds // 60
        raise PlannerError(
            f"lost contact with another rank: it failed (see its error) or did not answer in {minutes} min"
        ) from exc


def sum_floats(values: list[float]) -> list[float]:
    """``values`` summed element-wise over the ranks, in float64; unchanged in one process.

    Every rank must call it at the same point with as many values.
    """
    if not _active():
        return values
    total = torch.tensor(values, dtype=torch.float64, device=_device())
    _all_reduce(total)
    return total.tolist()


def sum_pairs(pairs: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """``(sum, count)`` pairs summed over the ranks (counts stay exact below 2**53)."""
    flat = sum_floats([x for pair in pairs for x in pair])
    return [(flat[i], int(flat[i + 1])) for i in range(0, len(flat), 2)]


def barrier() -> None:
    """Wait for every rank; raises a ``PlannerError`` if one failed."""
    if _active():
        _all_reduce(torch.zeros(1, device=_device()))


@contextmanager
def launched(inputs: int, device: torch.device) -> Iterator[torch.device]:
    """Join the ranks torchrun started for the block; yields this rank's device.

    Refuses more ranks than ``inputs`` before joining. A CUDA ``device`` becomes the GPU
    of this rank's ``LOCAL_RANK``, and the ranks talk over NCCL; elsewhere over Gloo.
    Errors raised in the block name the rank; the group is destroyed on the way out.
    Without torchrun it only yields ``device``.
    """
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks == 1:
        yield device
        return
    check_size(inputs, ranks)
    name = f"rank {os.environ['RANK']}/{ranks}"
    if device.type == "cuda":
        local, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= count:
            raise bad_input(f"{name}: device: local rank {local} needs cuda:{local}; this machine has {count} GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=TIMEOUT,
            device_id=device if device.type == "cuda" else None,
        )
        yield device
    except PlannerError as exc:
        raise PlannerError(f"{name}: {exc}", exit_code=exc.exit_code) from exc
    except Exception as exc:  # noqa: BLE001 - name the rank whatever failed
        raise PlannerError(f"{name}: {type(exc).__name__}: {exc}") from exc
    finally:
        if _active():
            dist.destroy_process_group()
