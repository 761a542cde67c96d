"""Shared pieces of the ``swat`` command: the Typer app and the error -> exit-code wrapper.

Each command group lives in its own module (``cli/main.py`` train/export/verify/prune, ``cli/bench.py``,
``cli/info.py``, ...) and registers on :data:`app`; ``cli/main.py`` imports them all.

The library raises :class:`~training.errors.SwatError` in library terms; this module adds what is
the CLI's own: exit codes per error kind (:data:`EXIT_CODES`), the flag spelling of each library
parameter a message names (:func:`flag`), and how to continue an interrupted command.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import typer

from training.errors import BAD_INPUT, FAILED, SwatError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train sparse CNNs with SWAT, prune, export (ONNX / TorchScript), run sparse, verify.")


# error kind -> exit status: 2 the request was wrong (bad usage / input), 1 the work failed
EXIT_CODES = {BAD_INPUT: 2, FAILED: 1}
INTERRUPTED = 130  # the shell's code for Ctrl-C

# library parameter -> flag, where the flag is not simply --name-with-dashes
_FLAGS = {"per_layer": "--layer-sparsity", "cache_weight_threshold": "--refresh-weights", "fmt": "--format",
          "batch_sizes": "--batch-size"}


def flag(name: str) -> str:
    """The ``swat`` flag of a library parameter (``batch_size`` -> ``--batch-size``)."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def exit_code(error: SwatError) -> int:
    return EXIT_CODES.get(error.kind, 1)


def message(error: SwatError) -> str:
    """A library error as the CLI shows it: flags spelled as typed."""
    return error.render(flag)


def fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def one_line(text: str, limit: int = 500) -> str:
    """A message as one terminal-safe line: newlines folded, control characters escaped."""
    from training.text import escape_control

    return escape_control(" ".join(str(text).split()))[:limit]


def _how_to_continue(command: str, kwargs: dict) -> str:
    """What an interrupted command left and how to go on - per command, not always `--resume`."""
    if command == "train":
        run = kwargs.get("resume") or kwargs.get("out")
        if run is None:
            return "interrupted before training started; nothing was written"
        nproc = kwargs.get("nproc") or 1
        extra = f" --nproc {nproc}" if nproc != 1 else ""
        return (f"interrupted; the last checkpoint is kept - continue with `swat train --resume {run}{extra}` "
                f"(if no epoch finished, start again with --out {run} --force)")
    if command == "study":
        return "interrupted; finished runs are kept in runs.jsonl - run the same command again to continue"
    return f"interrupted; files are written atomically, so nothing is half-written - run `swat {command}` again"


def handled(fn: Callable) -> Callable:
    """Turn errors into one line + exit code, never a traceback.

    Project errors (SwatError): their message with flags spelled as typed, the exit code of
    their kind. What the OS refuses (a full disk, a permission) is the user's to fix: one line,
    exit 1. Anything else is a bug: one line asking for a report, exit 1 - ``SWAT_TRACEBACK=1``
    shows the traceback. Ctrl-C: how to continue this command, exit 130.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SwatError as e:
            fail(one_line(message(e)), exit_code(e))
        except KeyboardInterrupt:
            fail(one_line(_how_to_continue(fn.__name__, kwargs)), INTERRUPTED)
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


# ------------------------------------------------------------------ list options
# A comma-separated option value is parsed by Typer through ``parser=``: the command receives a
# list of the item type, and a malformed value is Typer's usage error (exit 2) naming the flag.
# The list subclasses are what tells Typer "one value that is a list", not a repeatable option.
class Ints(list):
    """``--batch-size 1,64`` -> ``[1, 64]``."""


class Floats(list):
    """``--sweep-sparsities 0.5,0.9`` -> ``[0.5, 0.9]``."""


class Names(list):
    """``--exclude conv1,fc`` -> ``['conv1', 'fc']``."""


def _split(value: object, item: Callable[[str], object], what: str, example: str) -> list:
    if isinstance(value, list):  # a default that is already parsed
        return value
    try:
        return [item(v.strip()) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a comma-separated list of {what}; e.g. {example}") from None


def ints(value: object) -> Ints:
    return Ints(_split(value, int, "integers", "1,64"))


def floats(value: object) -> Floats:
    return Floats(_split(value, float, "numbers", "0.5,0.9"))


def names(value: object) -> Names:
    return Names(_split(value, str, "names", "conv1,fc"))


def layer_sparsity(value: str) -> tuple[str, float]:
    """One ``NAME=S`` of the repeatable ``--layer-sparsity``."""
    name, sep, number = str(value).partition("=")
    try:
        sparsity = float(number)
    except ValueError:
        sep = ""
    if not sep or not name.strip():
        raise typer.BadParameter(f"{value!r} is not NAME=SPARSITY; e.g. --layer-sparsity conv1=0.5")
    return name.strip(), sparsity
