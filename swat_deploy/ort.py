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
    return ort.InferenceSession(_checked(model), so, providers=["CPUExecutionProvider"])


def _checked(model: bytes | str | Path) -> bytes | str:
    """The model as onnxruntime should open it: external data read by :mod:`swat_deploy.onnx_load`
    (confined to the file's folder; refused for bytes, which have none), never resolved by
    onnxruntime's own rules. Protobuf cannot hold 2 GiB: a model that large goes by path, its
    locations checked already.
    """
    from .onnx_load import parse_model, read_model

    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
        parse_model(data)  # raises for external data (no folder to confine it to) or a damaged proto
        return data
    proto = read_model(Path(model))
    return proto.SerializeToString() if proto.ByteSize() < 2**31 - 2**20 else str(model)
