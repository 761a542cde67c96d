"""Shared pieces of the ``swat`` command: the Typer app and the error -> exit-code wrapper.

Each command group lives in its own module (``cli/main.py`` train/export/verify/prune, ``cli/bench.py``,
``cli/info.py``, ...) and registers on :data:`app`; ``cli/main.py`` imports them all.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import typer

from training.errors import SwatError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train sparse CNNs with SWAT, prune, export (ONNX / TorchScript), run sparse, verify.")


def fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def one_line(text: str, limit: int = 500) -> str:
    """A message as one terminal-safe line: newlines folded, control characters escaped."""
    from training.text import escape_control

    return escape_control(" ".join(str(text).split()))[:limit]


def handled(fn: Callable) -> Callable:
    """Turn errors into one line + exit code, never a traceback.

    Project errors (SwatError) carry their own message and code. What the OS refuses (a full
    disk, a permission) is the user's to fix: one line, exit 1. Anything else is a bug: one line
    asking for a report, exit 1 - ``SWAT_TRACEBACK=1`` shows the traceback. Ctrl-C: exit 130.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SwatError as e:
            fail(one_line(str(e)), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted; the last checkpoint is kept (resume with `swat train --resume RUN`)", 130)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:
            if _exit_exception(e) or os.environ.get("SWAT_TRACEBACK", "") not in ("", "0"):
                raise
            if isinstance(e, OSError):
                where = f" {e.filename}" if getattr(e, "filename", None) else ""
                fail(one_line(f"cannot access{where} ({e.strerror or type(e).__name__}); check the path, its "
                              f"permissions and free disk space"), 1)
            if isinstance(e, MemoryError):
                fail("out of memory; use a smaller --batch-size / model, or a machine with more memory", 1)
            fail(one_line(f"internal error ({type(e).__name__}: {e}); please report it with the command you "
                          f"ran (SWAT_TRACEBACK=1 shows the traceback)"), 1)
    return wrapper


def _exit_exception(e: BaseException) -> bool:
    """click's own control-flow exceptions (usage errors, --help) pass through to click."""
    return type(e).__module__.split(".")[0] in ("click", "typer") and hasattr(e, "exit_code")


def _csv(value: Optional[str]) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []
