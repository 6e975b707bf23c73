"""Read a plan from a path, bytes, or a model folder."""

from __future__ import annotations

import os
from pathlib import Path

from schemas import Plan, PlanError, decode_plan

PLAN_FILENAME = "fastattn_plan.json"


def load_plan(source: str | os.PathLike[str] | bytes | Plan) -> Plan:
    """A checked ``Plan`` from a JSON file, raw bytes, or a folder holding ``fastattn_plan.json``.

    Anything else is a ``TypeError`` naming ``source``; a bad plan is a ``PlanError``.
    """
    if isinstance(source, Plan):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_plan(bytes(source))
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source: expected a path, bytes or Plan, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        path = path / PLAN_FILENAME
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PlanError(f"cannot read plan {str(path)!r}: {exc.strerror or exc}") from None
    return decode_plan(raw)
