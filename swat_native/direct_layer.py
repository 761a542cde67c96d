"""Binding of ``swat_tconv_layer_f32`` (``csrc/train_conv_f32.c``): the lane-masked direct conv
as one inference layer call (stride phases, multiply, residual + ReLU) on the extension's thread
pool. The Python side is `swat_deploy.kernels.masked_direct`."""
from __future__ import annotations

import ctypes
import functools
import threading
from typing import Any

import numpy as np

from . import _lib
from .layer import _own_copy

_INTS = ("kk", "o", "B", "P", "c", "h", "w", "sh", "sw", "ho", "wo", "n", "isa", "threads")


class _LayerArgs(ctypes.Structure):
    # field order and types are struct swat_tconv_layer's
    _fields_ = ([(k, ctypes.c_uint64) for k in ("indptr", "offs", "vals", "bias", "masks")]
                + [(k, ctypes.c_int64) for k in _INTS]
                + [(k, ctypes.c_uint64) for k in ("x", "phases", "y", "res")]
                + [(k, ctypes.c_int64) for k in ("relu", "nrg", "per_item", "dw", "cs")] + [("rc", ctypes.c_int)])


@functools.lru_cache(maxsize=1)
def _fn() -> Any:
    lib = _lib()
    fn = None if lib is None else getattr(lib.cdll, "swat_tconv_layer_f32", None)
    if fn is not None:
        fn.argtypes = [ctypes.POINTER(_LayerArgs)]
        fn.restype = ctypes.c_int
    return fn


def available() -> bool:
    """Whether the built extension has the one-call direct layer (an older build may not)."""
    return _fn() is not None


class DirectLayerCall:
    """The fixed arguments of one layer at one input shape; `__call__` runs it. The arrays
    (tap-major block CSR, bias, lane masks) stay referenced so their pointers stay valid."""

    def __init__(self, indptr: np.ndarray, offs: np.ndarray, vals: np.ndarray, bias: np.ndarray,
                 masks: np.ndarray, **fixed: int) -> None:
        for a, dt in ((indptr, np.int32), (offs, np.int32), (vals, np.float32), (bias, np.float32),
                      (masks, np.uint16)):
            if a.dtype != dt or not a.flags.c_contiguous:
                raise ValueError(f"DirectLayerCall needs contiguous {np.dtype(dt).name} arrays, got {a.dtype}")
        missing = set(_INTS) - set(fixed) - {"isa", "threads", "n"}
        if missing:
            raise ValueError(f"DirectLayerCall is missing {sorted(missing)}")
        self._keep = (indptr, offs, vals, bias, masks)
        self.args = _LayerArgs(indptr.ctypes.data, offs.ctypes.data, vals.ctypes.data, bias.ctypes.data,
                               masks.ctypes.data, *(int(fixed.get(k, 0)) for k in _INTS))
        # 1: strided depthwise, stride phases per row; 2: only phase (0, 0) is read and copied (C side)
        self.args.dw = int(fixed.get("dw", 0))
        self.args.cs = int(fixed.get("cs", 0))  # floats per input channel the offsets assume; 0: plain
        self._local = threading.local()  # per-call fields: one struct copy per Python thread

    def scratch_floats(self, n: int) -> int:
        """Floats of scratch a call on n images needs: the stride phases of a strided conv, or the
        input copied at a padded channel stride (`cs`); 0 when the kernel reads x itself (the C
        side's tl_copies)."""
        a = self.args
        strided = (a.sh, a.sw) != (1, 1)
        plain = a.P if a.dw == 2 else (a.sh * a.sw * a.P if strided else a.h * a.w)
        cs = a.cs or plain
        return 0 if a.dw == 1 or (not strided and cs == plain) else n * a.c * cs

    def __call__(self, x: int, y: int, n: int, res: int, relu: bool, phases: int, isa: int, threads: int) -> None:
        """Pointers as integers; `res` 0 for none, `phases` a scratch of n * C * cs floats where the
        kernel reads a copy (:meth:`scratch_floats`; 0 otherwise)."""
        a = _own_copy(self._local, self.args)
        a.x, a.y, a.n, a.res, a.relu, a.phases, a.isa, a.threads = x, y, n, res, int(relu), phases, isa, threads
        if _fn()(ctypes.byref(a)):
            raise ValueError(f"the compiled direct layer refused its arguments (B={a.B}, P={a.P}, isa={isa})")
