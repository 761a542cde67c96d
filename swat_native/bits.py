"""Bindings of ``csrc/bits_f32.c``: SWAT's per-step bitmask bookkeeping (ReLU + bitmask,
gradient masking, threshold -> bitmask, compact values <-> dense), vectorised at the
machine's ISA.

Same signatures as the numba loops in ``training/_swat_kernels.py`` (the fallback when the
library is not built) plus ``code`` (the ISA, see :func:`swat_native.isa_code`).

One thread on purpose: these passes stream memory, and splitting a 4 MB activation over the
2 vCPUs of the machines we measure on gained nothing (0.107 vs 0.110 ms, AMD EPYC) while a
numba parallel region now and then cost 0.7 ms to start. The C loops take an element range
[i0, i1) (i0 a multiple of 8), so a caller that wants threads can split a tensor.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np

from . import _lib

__all__ = ["relu_pack", "mask_select", "pack_gt", "gather", "expand"]


@functools.lru_cache(maxsize=1)
def _fns() -> tuple[Any, ...]:
    cdll = _lib().cdll
    u64, i64 = ctypes.c_uint64, ctypes.c_int64

    def fn(name: str, args: list[Any], res: Any) -> Any:
        f = getattr(cdll, name)
        f.argtypes = args
        f.restype = res
        return f

    return (fn("swat_relu_bits_f32", [i64, u64, u64, u64, i64, i64], i64),
            fn("swat_mask_select_u32", [i64, u64, u64, u64, i64, i64], None),
            fn("swat_pack_gt_f32", [i64, u64, u64, i64, i64, u64, i64, i64], i64),
            fn("swat_gather_f32", [i64, u64, u64, u64, i64, i64], i64),
            fn("swat_expand_f32", [i64, u64, u64, u64, i64, i64], None))


def relu_pack(code: int, x: np.ndarray, y: np.ndarray, bits: np.ndarray) -> int:
    """y = relu(x) (``y`` may be ``x``), bit i = not (x[i] <= 0); returns the count."""
    return int(_fns()[0](code, x.ctypes.data, y.ctypes.data, bits.ctypes.data, 0, x.size))


def mask_select(code: int, x_u32: np.ndarray, bits: np.ndarray, out_u32: np.ndarray) -> None:
    """out = x where the bit is set, 0 elsewhere (uint32 views of float32 data)."""
    _fns()[1](code, x_u32.ctypes.data, bits.ctypes.data, out_u32.ctypes.data, 0, x_u32.size)


def pack_gt(code: int, x: np.ndarray, thr: np.ndarray, inner: int, period: int, bits: np.ndarray) -> int:
    """bit i = |x[i]| > thr[(i // inner) % period] (``thr`` float32); returns the count."""
    thr = np.ascontiguousarray(thr, dtype=np.float32)
    return int(_fns()[2](code, x.ctypes.data, thr.ctypes.data, int(inner), int(period), bits.ctypes.data, 0, x.size))


def gather(code: int, x: np.ndarray, bits: np.ndarray, vals: np.ndarray) -> int:
    """vals[:count] = x where the bit is set; returns count. ``vals`` needs count + 7 slots: the
    AVX2 loop stores 8 lanes at a time and may write up to 7 floats past count."""
    return int(_fns()[3](code, x.ctypes.data, bits.ctypes.data, vals.ctypes.data, 0, x.size))


def expand(code: int, bits: np.ndarray, vals: np.ndarray, out: np.ndarray) -> None:
    """out = dense tensor with ``vals`` at the set bits, zeros elsewhere."""
    _fns()[4](code, bits.ctypes.data, vals.ctypes.data, out.ctypes.data, 0, out.size)
