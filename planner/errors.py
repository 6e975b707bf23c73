"""The one error type the planner reports to users."""

from __future__ import annotations


class PlannerError(Exception):
    """An expected failure, reported as one line.

    ``exit_code`` is 2 for input the user can fix (an unknown model, a missing
    checkpoint, a rejected setting) and 1 for anything else.
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def bad_input(message: str) -> PlannerError:
    """A ``PlannerError`` for input the user can fix (exit code 2)."""
    return PlannerError(message, exit_code=2)
