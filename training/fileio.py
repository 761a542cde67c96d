"""Crash-safe file writing and hashing.

A run that is killed mid-write must leave the previous file intact, so every file the project
writes goes to a temporary sibling first and is renamed over the target (atomic on POSIX).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save as _st_save

from training.errors import SwatError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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


def sha256_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """A hash of tensor names, dtypes, shapes and bytes in name order: stable across file formats."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # reshape: 0-dim too
    return h.hexdigest()
