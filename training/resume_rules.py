"""What a resumed run may change, checked before any work is done.

A resumed run's files must describe a run that happened: options that change what is trained
must equal the run's; where and how it runs (workers, device, data dir) may change; the epoch
count may grow, or shrink down to the epochs already trained.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from training.config import TrainConfig
from training.errors import SwatError, option

__all__ = ["RESUME_MAY_CHANGE", "check_resume_epochs", "resume_config"]


# options a resumed run may take a new value for: where and how it runs, not what it trains
RESUME_MAY_CHANGE = ("workers", "device", "data_dir")


def check_resume_epochs(epochs: Any, done: int, planned: int, run_dir: str | Path) -> int:
    """A resume's ``epochs``: may extend (or shorten) the run, but never below what is trained."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise SwatError(f"{option('epochs')} {epochs!r} must be a positive integer")
    if epochs < done:
        raise SwatError(f"{option('epochs')} {epochs} is fewer than the {done} epochs {run_dir} has already "
                        f"trained; give {option('epochs')} {done} or more (or leave it out to finish the "
                        f"planned {planned})")
    return epochs


def _same_setting(field: str, given: Any, current: Any) -> bool:
    if field == "dataset":
        from training import data as datasets

        try:
            return datasets.canonical(given) == datasets.canonical(current)
        except SwatError:
            return False
    if field == "exclude":
        return tuple(given or ()) == tuple(current or ())
    if field == "per_layer":
        return {k: float(v) for k, v in (given or {}).items()} == {k: float(v) for k, v in (current or {}).items()}
    if field == "data_dir":
        return (str(Path(given)) if given else None) == (str(Path(current)) if current else None)
    return given == current


def resume_config(cfg: TrainConfig, given: Mapping[str, Any], run_dir: str | Path) -> TrainConfig:
    """Check the options given with ``--resume`` against the run's config (every one, none dropped).

    Equal to the run's: fine. ``RESUME_MAY_CHANGE`` (where and how it runs): applied. Anything
    else would make the run's files describe a run that never happened: refused, one line.
    ``epochs`` is not checked here (see :func:`check_resume_epochs`).
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    updates: dict[str, Any] = {}
    for field, value in given.items():
        if field == "epochs":
            continue
        if field not in fields:
            raise SwatError(f"{option(field)} is not a training setting; drop it")
        current = getattr(cfg, field)
        if _same_setting(field, value, current):
            continue
        if field in RESUME_MAY_CHANGE:
            updates[field] = value
            continue
        raise SwatError(f"{option(field)} {value!r} differs from the run's {current!r} ({run_dir}); a resumed run "
                        f"keeps its settings - drop {option(field)}, or start a new run in another "
                        f"{option('out')}")
    return dataclasses.replace(cfg, **updates).validate() if updates else cfg
