"""Writing outputs: checked before any work, written atomically, never over an input.

An output path that is a symbolic link is followed: its target file is replaced
atomically and the link stays. Folders, FIFOs, devices and sockets are refused, and
so is an output that is the same file as one of the command's inputs.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path

from planner.errors import PlannerError, bad_input
from schemas import Plan, encode_plan


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def output_target(path: Path, field: str = "output") -> Path:
    """The regular file that writing ``path`` replaces: a symlink's final target.

    Raises a ``PlannerError`` naming ``field`` when that is a folder, a FIFO, a device
    or a socket, or when its folder does not exist.
    """
    target = Path(os.path.realpath(path))
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise bad_input(f"{field}: cannot use {str(path)!r}: {exc.strerror or exc}") from None
    if mode is not None and not stat.S_ISREG(mode):
        hint = "; give a file name such as plan.json" if stat.S_ISDIR(mode) else "; give a regular file"
        raise bad_input(f"{field}: {str(path)!r} is {_kind(mode)}{hint}")
    if not target.parent.is_dir():
        raise bad_input(f"{field}: folder {str(path.parent)!r} does not exist")
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(os.path.realpath(a)) == Path(os.path.realpath(b))


def check_writable(
    path: Path, field: str = "output", inputs: Mapping[str, Path | None] | None = None
) -> Path:
    """Refuse, before any work, an output that could not be written or would overwrite an input.

    ``inputs`` maps each input's field name to its path (``None`` when not given).
    Returns the file that will be written (see :func:`output_target`).
    """
    target = output_target(path, field)
    for name, source in (inputs or {}).items():
        if source is not None and _same_file(path, source):
            raise bad_input(f"{field}: {str(path)!r} is the {name} input; write elsewhere")
    try:
        fd, probe = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise bad_input(f"{field}: cannot write in {str(target.parent)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)
    return target


def write_plan(plan: Plan, path: Path) -> None:
    """Write ``plan`` as JSON to ``path``, atomically (see :func:`write_atomic`)."""
    write_atomic(encode_plan(plan), path)


def write_atomic(data: bytes, path: Path, field: str = "output") -> None:
    """Write ``data`` to ``path`` (a symlink's target) through a temporary file and a rename.

    A failure or an interrupt leaves either the previous file or none, never a
    partial one; a path that is not a regular file is refused, never replaced.
    """
    target = output_target(path, field)
    try:
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise PlannerError(f"{field}: cannot write {str(path)!r}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # as an ordinary new file, not mkstemp's 0600
        os.replace(temporary, target)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise PlannerError(f"{field}: cannot write {str(path)!r}: {exc.strerror or exc}") from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
