"""One sparse conv layer per call (``swat_native/csrc/layer_f32.c``): pack, multiply, write NCHW.

Why a single call: at batch 1 a layer's multiply takes 40-150 us; three numba calls per layer
(pack, multiply, unpack) added 20-30 us of dispatch and glue and scaled poorly on two
threads. `ConvCall` holds the layer's fixed arguments in one C struct, built once per input
shape; a call fills in the per-call pointers and runs the three phases on the extension's own
thread pool (ctypes releases the GIL for the call).
"""
from __future__ import annotations

import ctypes
import functools
import threading
from typing import Any

import numpy as np

from . import _lib

LAYOUTS = {"view": 0, "padded": 1, "shifted": 2}

_FIXED = ("B", "rows", "layout", "n", "c_in", "h", "w", "o", "h_out", "w_out", "pt", "pl", "hq", "wq",
          "kw", "sh", "sw", "dw", "copy_size", "chunk_in", "run", "pitch", "ntg", "tg", "nrg", "epi", "isa",
          "threads", "per_image", "slot_packed")


class _ConvArgs(ctypes.Structure):
    # the field order and types are struct swat_conv's in layer_f32.c
    _fields_ = ([(k, ctypes.c_uint64) for k in ("indptr", "offs", "vals", "bias")]
                + [(k, ctypes.c_int64) for k in _FIXED]
                + [("x", ctypes.c_uint64), ("y", ctypes.c_uint64), ("res", ctypes.c_uint64), ("relu", ctypes.c_int64),
                   ("packed", ctypes.c_uint64), ("scratch", ctypes.c_uint64)])


@functools.lru_cache(maxsize=1)
def _fn() -> Any:
    lib = _lib()
    if lib is None:
        return None
    fn = getattr(lib.cdll, "swat_conv_f32", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.POINTER(_ConvArgs)]
    fn.restype = ctypes.c_int
    return fn


def available() -> bool:
    """Whether the built extension has the one-call layer (an older build may not)."""
    return _fn() is not None


def _own_copy(local: threading.local, template: ctypes.Structure) -> ctypes.Structure:
    """This Python thread's copy of `template`: the C call runs with the GIL released, so two
    threads running one layer at once must not share the struct they fill per call."""
    a = getattr(local, "args", None)
    if a is None:
        a = local.args = type(template)()
        ctypes.memmove(ctypes.byref(a), ctypes.byref(template), ctypes.sizeof(template))
    return a


class ConvCall:
    """The fixed arguments of one layer at one input shape; `__call__` runs it.

    `arrays` are the CSR arrays (indptr int32, offs int32, vals / bias float32, contiguous);
    they are kept referenced here so the pointers in the struct stay valid."""

    def __init__(self, indptr: np.ndarray, offs: np.ndarray, vals: np.ndarray, bias: np.ndarray,
                 **fixed: int) -> None:
        for a, dt in ((indptr, np.int32), (offs, np.int32), (vals, np.float32), (bias, np.float32)):
            if a.dtype != dt or not a.flags.c_contiguous:
                raise ValueError(f"ConvCall needs contiguous {np.dtype(dt).name} arrays, got {a.dtype}")
        missing = set(_FIXED) - set(fixed) - {"threads", "isa", "per_image", "slot_packed"}
        if missing:
            raise ValueError(f"ConvCall is missing {sorted(missing)}")
        self._keep = (indptr, offs, vals, bias)
        self.args = _ConvArgs(indptr.ctypes.data, offs.ctypes.data, vals.ctypes.data, bias.ctypes.data,
                              *(int(fixed.get(k, 0)) for k in _FIXED))
        self._local = threading.local()  # per-call fields: one struct copy per Python thread

    def __call__(self, x: int, y: int, res: int, relu: bool, packed: int, scratch: int, isa: int,
                 threads: int) -> None:
        """Pointers as integers (``tensor.data_ptr()`` / ``array.ctypes.data``); `res` 0 for none."""
        a = _own_copy(self._local, self.args)
        a.x, a.y, a.res, a.relu, a.packed, a.scratch, a.isa, a.threads = x, y, res, int(relu), packed, scratch, isa, threads
        if _fn()(ctypes.byref(a)):
            raise ValueError(f"the compiled layer refused its arguments (B={a.B}, layout={a.layout}, isa={isa})")


def pool_started() -> int:
    """Worker threads the extension's pool has started so far."""
    lib = _lib()
    return int(lib.cdll.swat_pool_started()) if lib is not None else 0
