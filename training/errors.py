"""The project's one exception type.

Every error a user can cause is raised as :class:`SwatError` with a message that names the
problem and the fix, so the CLI can print it as one line and exit non-zero instead of a
traceback.
"""
from __future__ import annotations


class SwatError(Exception):
    """A problem the user can fix; ``exit_code`` is what the CLI exits with (2 = bad usage)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UnsafeInputError(SwatError):
    """A file asked for something refused for safety (e.g. ONNX external data outside the
    model's folder). Its own type so callers can tell a refusal from a damaged file."""
