"""Writing a plan: checked first, written atomically, never left half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from planner.errors import PlannerError, bad_input
from schemas import Plan, encode_plan


def check_writable(path: Path) -> None:
    """Refuse, before any work, an output path that could not be written."""
    if path.is_dir():
        raise bad_input(f"output: {str(path)!r} is a folder; give a file name such as plan.json")
    folder = path.parent
    if not folder.is_dir():
        raise bad_input(f"output: folder {str(folder)!r} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise bad_input(f"output: cannot write in {str(folder)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def write_plan(plan: Plan, path: Path) -> None:
    """Write ``plan`` as JSON to ``path``, atomically (see :func:`write_atomic`)."""
    write_atomic(encode_plan(plan), path)


def write_atomic(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    A failure or an interrupt leaves either the previous file or none, never a
    partial one.
    """
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise PlannerError(f"output: cannot write {str(path)!r}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # as an ordinary new file, not mkstemp's 0600
        os.replace(temporary, path)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise PlannerError(f"output: cannot write {str(path)!r}: {exc.strerror or exc}") from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
