"""Entry point of the ``planner`` command: Ctrl-C at any moment ends it with one line."""

from __future__ import annotations

import os
import sys
from typing import Any


def _interrupted() -> None:
    sys.stderr.write("error: interrupted\n")


def _unraisable(info: Any) -> None:
    """An interrupt that lands where Python can only report it (e.g. an import lock's
    callback while modules load) still ends the command, with its one line."""
    if issubclass(info.exc_type, KeyboardInterrupt):
        _interrupted()
        sys.stderr.flush()
        os._exit(130)
    sys.__unraisablehook__(info)


def main() -> None:
    """Run the ``planner`` command; an interrupt, even while it starts up, exits 130 without a traceback."""
    sys.unraisablehook = _unraisable
    try:
        from cli import app

        app(prog_name="planner")
    except KeyboardInterrupt:
        _interrupted()
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
