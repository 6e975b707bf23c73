"""Entry point of the ``planner`` command: Ctrl-C at any moment ends it with one line."""

from __future__ import annotations

import sys


def main() -> None:
    """Run the ``planner`` command; an interrupt, even while it starts up, exits 130 without a traceback."""
    try:
        from cli import app

        app(prog_name="planner")
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
