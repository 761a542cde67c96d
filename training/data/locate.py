"""Where data files are looked for, and the one-line error when they are not there.

A user may point ``data_dir`` at the folder holding the files, at its parent, or at a
torchvision-style root; we try those layouts rather than make them move files.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

ENV_VAR = "SWAT_DATA_DIR"


def roots(data_dir: str | Path | None) -> list[Path]:
    """The user's data roots: ``data_dir`` if given, else $SWAT_DATA_DIR, else ./data."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    return [Path("data")]


def candidates(bases: Iterable[Path], subdirs: Sequence[str]) -> list[Path]:
    """Each base itself, then each base/subdir, in that order, without duplicates."""
    out: list[Path] = []
    for base in bases:
        for sub in ("", *subdirs):
            p = base / sub if sub else base
            if p not in out:
                out.append(p)
    return out


def find_file(directory: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` that is a file in ``directory``."""
    for name in names:
        p = directory / name
        if p.is_file():
            return p
    return None


def describe(bases: Sequence[Path], subdirs: Sequence[str], extra: Sequence[Path] = ()) -> str:
    """Short text of where we looked: 'A (and its x/, y/ subfolders), B'."""
    parts = []
    for b in bases:
        s = str(b)
        if subdirs:
            s += " (and its " + ", ".join(f"{d}/" for d in subdirs) + ")"
        parts.append(s)
    parts.extend(str(p) for p in extra)
    return ", ".join(parts)
