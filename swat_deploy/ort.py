"""The one way swat opens stock onnxruntime sessions (verify, bench, the Session's fallback).

``session.intra_op.allow_spinning=0``: onnxruntime's default keeps its worker threads
spinning after each call, which on a 2-core machine steals the cores from whatever runs next
(our kernels, torch, or onnxruntime's own next call when the machine is loaded); measured
here it was also the faster setting for onnxruntime itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def ort_session(model: bytes | str | Path, threads: int | None = None) -> Any:
    """A CPU ``onnxruntime.InferenceSession`` on a file path or serialized model bytes."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    src = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
