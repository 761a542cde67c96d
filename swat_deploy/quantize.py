"""int8 QDQ models from float32 ONNX: what a CPU user gets from onnxruntime's own quantiser.

A user who wants speed on a CPU quantises; so swat makes the same int8 model they would make
and judges itself against it. Settings (onnxruntime's recommended CNN recipe, and what our
int8 kernels read):

- ``quantize_static``, QDQ format: standard QuantizeLinear / DequantizeLinear around float ops,
  which stock onnxruntime fuses into QLinearConv / QGemm (int8 speed) at load;
- weights int8, symmetric, per output channel: zero point 0, so every zero weight is exactly 0
  after quantisation and the sparsity is kept (a tiny nonzero weight may round to 0 too;
  ``swat verify`` counts the zeros of the int8 weights);
- activations uint8, asymmetric, per tensor, MinMax-calibrated on real images: the run's
  training split (a fixed seeded sample) for a run dir, random [0, 1] images for a bare file.

The float input is first pre-processed as onnxruntime recommends (``quant_pre_process``:
constant folding - which also expands our compact float weights - and Conv+BN fusion), so any
float32 CNN ONNX quantises, ours or not. :func:`quantize_cached` keeps the result in the user's
cache dir, keyed by the model bytes and calibration, so ``swat bench`` quantises a model once.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from training.errors import SwatError, option
from training.fileio import atomic_write_bytes
from training.rundir import Run, read_run

CALIB_IMAGES = 256          # `swat export --int8` default: enough for stable MinMax ranges, seconds to run
CALIB_RANDOM = 16           # bare files: random images only fix the activation ranges' scale
CALIB_BATCH = 32
RECIPE = {"format": "QDQ", "weights": "int8 symmetric per-channel", "activations": "uint8 asymmetric per-tensor",
          "calibration": "MinMax"}
_CACHE_VERSION = 1          # bump when the recipe changes: cached models no longer match it


class CalibrationDataMissing(SwatError):
    """The run's training images are not on this machine (``swat bench`` then calibrates on random ones)."""


# --------------------------------------------------------------------------- calibration data
def calibration_images(run: Run | str | Path, n: int = CALIB_IMAGES, seed: int = 0,
                       data_dir: str | None = None) -> np.ndarray:
    """``n`` images of the run's training split (as trained: same ``--limit``), a seeded random
    sample, float32 NCHW in [0, 1] - what exported models take."""
    from training import data as datasets
    from training.evaluation import iterate_batches

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SwatError(f"{option('calib')} must be a positive number of images, got {n!r}; e.g. {CALIB_IMAGES}")
    run = run if isinstance(run, Run) else read_run(run)
    config = run.config
    options = {"limit": config.limit} if config.limit else {}
    try:
        ds = datasets.load(run.meta["dataset"], "train", data_dir or config.data_dir, **options)
    except SwatError as e:
        raise CalibrationDataMissing(f"cannot calibrate int8: training split of {run.meta['dataset']!r} "
                                     f"unavailable: {e}") from None
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.cat([x for x, _ in iterate_batches(ds, order, 256)]).numpy().astype(np.float32, copy=False)


def random_images(input_shape: tuple[int, ...], n: int = CALIB_RANDOM, seed: int = 0) -> np.ndarray:
    """``n`` uniform [0, 1] images of shape (C, H, W): calibration for a file without its data set."""
    return np.random.default_rng(seed).random((n, *input_shape), dtype=np.float32)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over an array, in batches."""

    def __init__(self, name: str, images: np.ndarray, batch: int) -> None:
        self._batches: Iterator[np.ndarray] = iter([images[i:i + batch] for i in range(0, len(images), batch)])
        self._name = name

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._batches, None)
        return None if x is None else {self._name: x}

    def rewind(self) -> None:  # part of the protocol; MinMax reads the data once
        pass


# --------------------------------------------------------------------------- quantisation
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantiser logs advice on the root logger and prints; keep the CLI's output clean."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def quantize_qdq(model: Any, images: np.ndarray, *, batch: int = CALIB_BATCH) -> Any:
    """A QDQ ModelProto of the float32 ``model`` (ModelProto, bytes or path), calibrated on ``images``.

    Weights are plain int8 initializers here; :func:`swat_deploy.qdq.encode_int8` stores them
    compactly. Raises :class:`SwatError` for a model the quantiser cannot handle.
    """
    import onnx
    CalibrationMethod, QuantFormat, QuantType, quantize_static, quant_pre_process = _ort_quantization()

    from swat_deploy.qdq import is_quantized

    proto = _as_proto(model)
    if is_quantized(proto):
        raise SwatError("the model is already quantised (it has QuantizeLinear / DequantizeLinear nodes); "
                        "pass its float32 model")
    if not proto.graph.input:
        raise SwatError("the model has no graph input to calibrate; pass a CNN that takes an image tensor")
    name = proto.graph.input[0].name
    images = np.ascontiguousarray(images, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="swat-int8-") as tmp, _quiet():
        src, pre, out = (os.path.join(tmp, f) for f in ("float.onnx", "pre.onnx", "qdq.onnx"))
        onnx.save_model(proto, src, save_as_external_data=proto.ByteSize() > 2**30, location="float.onnx.data")
        try:
            quant_pre_process(src, pre, skip_symbolic_shape=True)
            quantize_static(pre, out, _Reader(name, images, batch), quant_format=QuantFormat.QDQ,
                            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            # MinMax keeps one (min, max) pair per tensor and batch: small for any n
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        except SwatError:
            raise
        except Exception as e:
            msg = " ".join(str(e).split())[:200]
            raise SwatError(f"onnxruntime could not quantise the model ({type(e).__name__}: {msg}); "
                            "check that it runs in onnxruntime with float32 input") from None
        qdq = onnx.load(out, load_external_data=True)
    _tidy(qdq)
    return qdq


def _as_proto(model: Any) -> Any:
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    from swat_deploy.onnx_load import parse_model, read_model  # external data confined to the file's folder

    if isinstance(model, (bytes, bytearray)):
        return parse_model(bytes(model))
    return read_model(Path(model))


def _tidy(model: Any) -> None:
    """Drop what pre-processing adds but the graph does not need: shape hints and the opset
    imports of onnxruntime's internal domains (the file must load in any runtime)."""
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used or (o.domain == "ai.onnx" and "" in used)]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    del model.graph.value_info[:]


# --------------------------------------------------------------------------- export
def write_onnx_int8(base: Any, sm: Any, path: str | Path, images: np.ndarray, *, seed: int = 0,
                    weights: str = "sparse") -> Path:
    """Quantise ``base`` (torch's float32 export of ``sm``) on ``images``, store, embed metadata, check, save.

    Split from :func:`swat_deploy.export.export_onnx_int8` so one torch export serves the float32 and int8 files.
    """
    from swat_deploy.export_file import export_metadata, finish_onnx, strip_debug_info
    from swat_deploy.qdq import encode_int8

    model = quantize_qdq(base, images)
    strip_debug_info(model)
    encode_int8(model, weights=weights)
    meta = export_metadata(sm, weights=weights)
    meta["opset"] = str(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))
    meta["int8"] = "true"
    meta["quantization"] = json.dumps({**RECIPE, "calibration_split": "train", "calibration_images": len(images),
                                       "calibration_seed": seed, "tool": f"onnxruntime {_ort_version()}"})
    return finish_onnx(model, meta, path)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


# --------------------------------------------------------------------------- bench's cache
def cache_dir() -> Path:
    """Where quantised models are kept: $SWAT_INT8_CACHE, else the user cache dir (XDG) /swat/int8."""
    env = os.environ.get("SWAT_INT8_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "swat" / "int8"


def cache_key(float_model: bytes, calibration: str) -> str:
    """The model's content hash + how it is calibrated + the quantiser: same key, same int8 model."""
    h = hashlib.sha256()
    h.update(float_model)
    h.update(json.dumps({"calibration": calibration, "recipe": RECIPE, "v": _CACHE_VERSION,
                         "onnxruntime": _ort_version()}, sort_keys=True).encode())
    return h.hexdigest()


def quantize_cached(float_model: bytes, images: Callable[[], np.ndarray], calibration: str) -> tuple[bytes, bool]:
    """(compact QDQ model bytes, whether it came from the cache).

    ``calibration`` names where ``images()`` come from (e.g. ``"digits train 256 seed 0"``) and is
    part of the key; ``images`` is only called on a miss. A cache that cannot be written (read-only
    home) costs a re-quantisation next time, nothing else; an unreadable entry is rebuilt.
    """
    import onnx

    from swat_deploy.qdq import encode_int8

    path = cache_dir() / f"{cache_key(float_model, calibration)}.onnx"
    if path.is_file():
        try:
            data = path.read_bytes()
            onnx.load_from_string(data)
            return data, True
        except Exception:  # truncated or foreign: quantise afresh and replace it
            pass
    model = quantize_qdq(float_model, images())
    encode_int8(model)
    data = model.SerializeToString()
    try:
        atomic_write_bytes(path, data)
    except OSError:
        pass
    return data, False


def _ort_quantization() -> tuple[Any, ...]:
    """onnxruntime's quantisation API, imported without the side effect on sys.path.

    Importing it appends onnxruntime/transformers to sys.path, whose ``models`` package then
    shadows this project's ``models`` in every process started later with spawn (distributed
    training's ranks failed with "module 'models' has no attribute 'names'")."""
    import sys

    before = list(sys.path)
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    finally:
        sys.path[:] = before
    return CalibrationMethod, QuantFormat, QuantType, quantize_static, quant_pre_process
