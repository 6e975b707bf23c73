"""Patterns for error messages that name a field and its limits, in whatever wording the
validating library uses (its wording is not ours to test)."""

from __future__ import annotations

import re


def naming(path: str, *values: str, prefix: str = "") -> str:
    """A ``re.search`` pattern for a message that contains ``prefix`` and names the JSON ``path``
    (``$.a.b[0]``, not a longer path that starts with it) and each of ``values``."""
    parts = [re.escape(prefix), re.escape(path) + r"(?![\w.\[])"]
    parts += [rf"(?<![\w.]){re.escape(value)}(?![\w.])" for value in values]
    return "(?s)" + "".join(f"(?=.*{part})" for part in parts)
