"""Shared pieces of the ``swat`` command: the Typer app and the error -> exit-code wrapper.

Each command group lives in its own module (``cli/main.py`` train/export/verify/prune, ``cli/bench.py``,
``cli/info.py``, ...) and registers on :data:`app`; ``cli/main.py`` imports them all.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import typer

from training.errors import SwatError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train sparse CNNs with SWAT, prune, export (ONNX / TorchScript), run sparse, verify.")


def fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handled(fn: Callable) -> Callable:
    """Turn project errors into one line + exit code; Ctrl-C into exit 130."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SwatError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted; the last checkpoint is kept (resume with `swat train --resume RUN`)", 130)
    return wrapper


def _csv(value: Optional[str]) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []
