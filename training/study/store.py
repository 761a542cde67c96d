"""``runs.jsonl``: one JSON line per finished run, appended by one writer (the study process).

A line is written with a single ``write`` and fsync'd; a study killed mid-write leaves at most a
torn last line, which :func:`load` ignores and the next append starts after on a fresh line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["RUNS", "load", "append", "run_id"]

RUNS = "runs.jsonl"


def run_id(key: str, seed: int) -> str:
    return f"{key}/seed{seed}"


def load(out: str | Path) -> dict[str, dict[str, Any]]:
    """Finished runs by :func:`run_id` (a later line for the same run wins)."""
    p = Path(out) / RUNS
    res: dict[str, dict[str, Any]] = {}
    if not p.is_file():
        return res
    for line in p.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "key" in r and "seed" in r:
            res[run_id(r["key"], int(r["seed"]))] = r
    return res


def append(out: str | Path, record: dict[str, Any]) -> None:
    p = Path(out) / RUNS
    p.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(p, "ab") as f:
        if f.tell() > 0:
            with open(p, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":  # a torn line from a killed study: start a fresh one
                    line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())
