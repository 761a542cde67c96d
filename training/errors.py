"""The project's exception types, in library terms.

Every error a user can cause is raised as :class:`SwatError` with a message that names the
problem and the fix. Its ``kind`` says what sort of problem it is - the request was wrong
(:data:`BAD_INPUT`) or the work itself failed (:data:`FAILED`: a damaged file, a diverged or
failed run) - and nothing about how a program reports it: the ``swat`` command maps kinds to
exit codes (``cli/_app.py``).

A message may name a parameter of the library call with :func:`option` (``option("epochs")``):
``str(error)`` spells it as the Python parameter in backticks (```epochs```);
:meth:`SwatError.render` lets a front end spell it its own way (the CLI writes ``--epochs``).
"""
from __future__ import annotations

import re
from typing import Callable

__all__ = ["BAD_INPUT", "FAILED", "KINDS", "SwatError", "UnsafeInputError", "option"]

BAD_INPUT = "bad_input"  # the request or its inputs are wrong: fix them and run again
FAILED = "failed"        # the request was fine but the work failed (damaged file, failed run)
KINDS = (BAD_INPUT, FAILED)

_OPTION = re.compile(r"\x00opt:([A-Za-z_][A-Za-z0-9_]*)\x00")


def option(name: str) -> str:
    """A parameter name inside a message, spelled by whoever shows the message (see module doc)."""
    return f"\x00opt:{name}\x00"


class SwatError(Exception):
    """A problem the user can fix; ``kind`` is :data:`BAD_INPUT` (default) or :data:`FAILED`."""

    def __init__(self, message: str, kind: str = BAD_INPUT) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown SwatError kind {kind!r}; one of {KINDS}")
        super().__init__(message)
        self.kind = kind

    @property
    def template(self) -> str:
        """The message with its parameter markers (see :func:`option`)."""
        return str(self.args[0]) if self.args else ""

    def render(self, spell: Callable[[str], str] = lambda name: f"`{name}`") -> str:
        """The message with every :func:`option` name written as ``spell(name)``."""
        return _OPTION.sub(lambda m: spell(m.group(1)), self.template)

    def __str__(self) -> str:
        return self.render()


class UnsafeInputError(SwatError):
    """A file asked for something refused for safety (e.g. ONNX external data outside the
    model's folder). Its own type so callers can tell a refusal from a damaged file."""
