"""Where :mod:`training.sparse_products` remembers its sparse-vs-dense choices, so that every
process on one machine, and a resumed run anywhere, makes the same ones.

Why: the sparse kernel and torch round differently, so a choice is part of a run's numerics.
Timed afresh in each process, a close call could go the other way in the next process: two
runs with one seed would differ, and a run resumed after a kill would not be bit-identical to
the uninterrupted one. So a choice is made once per machine and kept:

* in a JSON file next to the inference autotune cache (the directory of ``SWAT_AUTOTUNE_CACHE``,
  default ``~/.cache/swat/``), ``sparse_training.json``, one section per machine (CPU model,
  cores, torch version; the ISA and thread count are part of each key). The first process to
  time a key writes it under a lock; a process that timed the same key concurrently adopts the
  written choice instead of its own.
* in the run's checkpoint (:func:`used` / :func:`pin`): a resumed run takes the killed run's
  choices even if the cache file was deleted in between.

``SWAT_AUTOTUNE=0`` (tests, like the inference autotuner): nothing is timed or written; the
caller's deterministic rule decides. A damaged cache file is ignored (and replaced on the next
write), never an error.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from training.fileio import atomic_write_json

__all__ = ["timing_enabled", "cache_path", "lookup", "decide", "used", "pin", "forget"]

VERSION = 5  # bump when the kernels change speed: the old choices no longer hold
_FILE = "sparse_training.json"

_lock = threading.Lock()
_memory: dict[str, bool] = {}  # this process's choices (from the file or timed here)
_pinned: dict[str, bool] = {}  # from a resumed run's checkpoint: these win over everything
_used: dict[str, bool] = {}  # every choice this process applied (what a checkpoint records)
_file_seen: dict[str, Any] = {"stamp": None}


def timing_enabled() -> bool:
    """False when ``SWAT_AUTOTUNE=0`` (or off/false/no): no timing, no cache file."""
    return os.environ.get("SWAT_AUTOTUNE", "1").strip().lower() not in ("0", "off", "false", "no")


def cache_path() -> Path:
    """``sparse_training.json`` in the inference autotune cache's directory."""
    env = os.environ.get("SWAT_AUTOTUNE_CACHE")
    folder = Path(env).expanduser().parent if env else Path.home() / ".cache" / "swat"
    return folder / _FILE


def machine_key() -> str:
    """The cache partition: a choice made on one CPU (or torch build, or kernel build) says nothing
    about another."""
    import swat_native as native

    return (f"{native.cpu_model()}|cpu={native.cpu_signature()}|cores={os.cpu_count()}|torch={torch.__version__}"
            f"|kernels={native.build_id()}")


def _read_section(path: Path) -> dict[str, bool]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("machines"), dict):
        return {}
    section = data["machines"].get(machine_key())
    if not isinstance(section, dict):
        return {}
    return {k: v["sparse"] for k, v in section.items()
            if isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("sparse"), bool)}


def _refresh_from_file() -> None:
    """Merge the file's choices into memory if it changed since the last read (by mtime/size)."""
    path = cache_path()
    try:
        st = path.stat()
        stamp = (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return
    if stamp == _file_seen["stamp"]:
        return
    _file_seen["stamp"] = stamp
    for k, v in _read_section(path).items():
        _memory.setdefault(k, v)


def lookup(key: str) -> Optional[bool]:
    """The remembered choice for ``key`` (True: sparse), or None when it must be decided."""
    with _lock:
        pick = _pinned.get(key)
        if pick is None:
            pick = _memory.get(key)
        if pick is None and timing_enabled():
            _refresh_from_file()
            pick = _memory.get(key)
        if pick is not None:
            _used[key] = pick
        return pick


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: last writer wins
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def decide(key: str, sparse: bool, times_us: Optional[dict[str, float]] = None) -> bool:
    """Record a choice made here and return the one to apply: a choice another process wrote
    for the same key first wins over ours. ``times_us`` is kept in the file for reports.
    Without timing (``SWAT_AUTOTUNE=0``) the choice stays in memory only."""
    with _lock:
        pick = _pinned.get(key, _memory.get(key))
        if pick is None and timing_enabled():
            pick = _write(key, sparse, times_us or {})
        if pick is None:
            pick = sparse
        _memory[key] = pick
        _used[key] = pick
        return pick


def _write(key: str, sparse: bool, times_us: dict[str, float]) -> Optional[bool]:
    path = cache_path()
    try:
        with _file_lock(path):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = None
            if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("machines"), dict):
                data = {"version": VERSION, "machines": {}}
            section = data["machines"].setdefault(machine_key(), {})
            if not isinstance(section, dict):
                section = data["machines"][machine_key()] = {}
            old = section.get(key)
            if isinstance(old, dict) and isinstance(old.get("sparse"), bool):
                return old["sparse"]  # another process decided first
            section[key] = {"sparse": sparse, "times_us": {k: round(v, 1) for k, v in times_us.items()}}
            atomic_write_json(path, data)
    except Exception:  # noqa: BLE001 - an unwritable cache must not stop training; the choice stays in memory
        return None
    return sparse


def used() -> dict[str, bool]:
    """Every choice this process applied so far (key -> sparse?): a checkpoint stores these."""
    with _lock:
        return dict(_used)


def pin(choices: Any) -> None:
    """Apply a checkpoint's choices (from :func:`used`): they win over the cache file and timing,
    so a resumed run computes exactly what the killed one did. Invalid entries are ignored."""
    if not isinstance(choices, dict):
        return
    with _lock:
        for k, v in choices.items():
            if isinstance(k, str) and isinstance(v, bool):
                _pinned[k] = v


def forget() -> None:
    """Drop every choice held in this process (tests; the file is left alone)."""
    with _lock:
        _memory.clear()
        _pinned.clear()
        _used.clear()
        _file_seen["stamp"] = None
