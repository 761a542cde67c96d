"""Crash-safe file writing and hashing.

A run that is killed mid-write must leave the previous file intact, so every file the project
writes goes to a temporary sibling first and is renamed over the target (atomic on POSIX). The
temporary file is created private (0600) and gets the final mode before the rename: the mode
an existing target already has, otherwise ``0666 & ~umask`` like any other tool's new file.

Hashes are of *tensors*, not files: a safetensors / ONNX / TorchScript file can store the same
tensors with its header keys in another order, so a file hash is not reproducible. See
:func:`canonical_digest`.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import save as _st_save

from training.errors import SwatError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux >= 4.7)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it; set it straight back
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode(path: str | Path) -> int:
    """The mode a written file gets: the existing file's, else 0666 minus the umask."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~current_umask()


def _write_error(path: Path, e: OSError) -> SwatError:
    reason = e.strerror or type(e).__name__
    return SwatError(f"cannot write {path} ({reason}); choose a writable location or free some space")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp sibling + rename; OS errors become one-line SwatErrors."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        os.fchmod(fd, new_file_mode(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_writable_dir(path: str | Path, what: str = "directory") -> Path:
    """Fail fast, before any work, if files cannot be created in ``path`` (or where it would be made).

    Probes by creating and removing a temp file: permission bits alone mislead (root, ACLs,
    read-only mounts).
    """
    path = Path(path)
    probe_dir = path
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise SwatError(f"cannot write to {what} {path}: {probe_dir} is not a directory; choose another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".swat-write-test.", dir=probe_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise SwatError(f"cannot write to {what} {path} ({e.strerror or type(e).__name__} in {probe_dir}); "
                        f"choose a writable location") from None
    return path


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically (contiguous CPU copies; shared storage is fine)."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, _st_save(flat, metadata=dict(metadata or {})))


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file (no pickle) and its string metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SwatError(f"{path} not found; check the path (a run dir holds model.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, dict(meta)
    except SwatError:
        raise
    except Exception as e:  # safetensors raises several types for damaged files
        raise SwatError(f"{path} is not a readable safetensors file ({e}); re-create it") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


HASH_SCHEME = "swat-tensors-v1"  # what run.json's ``weights_hash`` names; bump if the layout changes


def canonical_digest(items: Iterable[tuple[str, str, Sequence[int], bytes]]) -> str:
    """SHA-256 of tensors as (name, dtype, shape, little-endian bytes), sorted by name.

    Every field is length-prefixed, so no two different tensor sets hash alike by running one
    field into the next; the order of keys in a file's header cannot change the digest.
    """
    h = hashlib.sha256()
    h.update(HASH_SCHEME.encode() + b"\0")
    for name, dtype, shape, data in sorted(items, key=lambda it: (it[0], it[1], tuple(it[2]))):
        for field in (name.encode("utf-8"), dtype.encode("ascii")):
            h.update(struct.pack("<Q", len(field)))
            h.update(field)
        h.update(struct.pack("<Q", len(shape)))
        h.update(struct.pack(f"<{len(shape)}q", *[int(d) for d in shape]))
        h.update(struct.pack("<Q", len(data)))
        h.update(data)
    return h.hexdigest()


def array_item(name: str, a: np.ndarray) -> tuple[str, str, list[int], bytes]:
    """One :func:`canonical_digest` entry for a numpy array (bytes made little-endian)."""
    a = np.asarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return name, a.dtype.name, list(a.shape), np.ascontiguousarray(a).tobytes()


def tensor_item(name: str, t: torch.Tensor) -> tuple[str, str, list[int], bytes]:
    """One :func:`canonical_digest` entry for a torch tensor (dtype named as numpy names it)."""
    t = t.detach().to("cpu")
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return name, str(t.dtype).replace("torch.", ""), list(t.shape), data


def sha256_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """Canonical hash of torch tensors (see :func:`canonical_digest`): stable across file formats."""
    return canonical_digest(tensor_item(k, v) for k, v in tensors.items())


def sha256_arrays(arrays: Iterable[tuple[str, np.ndarray]]) -> str:
    """Canonical hash of (name, numpy array) pairs; a torch tensor and its numpy copy hash alike."""
    return canonical_digest(array_item(k, v) for k, v in arrays)
