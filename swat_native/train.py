"""Bindings of the training-only loops (``csrc/train_*.c``): SWAT's weight gradient from the
compact sparse activation (values + packed bitmask), with the dW tile in registers.

Kept apart from ``swat_native/__init__.py`` (the inference core) so the two evolve separately;
it uses the same library, ISA choice (``SWAT_ISA``) and numba-calls-ctypes pattern.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np

from . import _lib

__all__ = ["wgrad_block", "plane_starts", "wgrad_loop", "to_nhwc"]


@functools.lru_cache(maxsize=1)
def _fns() -> tuple[Any, Any, Any, Any]:
    cdll = _lib().cdll
    u64, i64 = ctypes.c_uint64, ctypes.c_int64
    starts = cdll.swat_wgrad_plane_starts
    starts.argtypes = [u64, i64, i64, u64]
    starts.restype = None
    block = cdll.swat_wgrad_block
    block.argtypes = [i64, i64, i64, i64]
    block.restype = i64
    wgrad = cdll.swat_wgrad_f32
    wgrad.argtypes = [i64, u64, u64, u64, u64, u64] + [i64] * 17
    wgrad.restype = ctypes.c_int
    nhwc = cdll.swat_nchw_to_nhwc_f32
    nhwc.argtypes = [u64, u64, i64, i64, i64, i64]
    nhwc.restype = None
    return starts, block, wgrad, nhwc


def to_nhwc(x: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 (N, C, H, W) array as a new (N, H, W, C) one (tiled transpose)."""
    n, c, h, w = x.shape
    out = np.empty((n, h, w, c), np.float32)
    _fns()[3](x.ctypes.data, out.ctypes.data, c, h * w, 0, n)
    return out


def wgrad_block(isa_code: int, kh: int, kw: int, o: int) -> int:
    """Output channels per work item of the weight-gradient loop, or -1 when this (ISA, kernel
    size, output count) has no compiled loop (the caller then uses dense torch)."""
    return int(_fns()[1](isa_code, kh, kw, o))


def plane_starts(bits: np.ndarray, nplanes: int, plane: int) -> np.ndarray:
    """Index of each (image, channel) plane's first kept value in the compact values (+ total)."""
    out = np.empty(nplanes + 1, np.int64)
    _fns()[0](bits.ctypes.data, nplanes, plane, out.ctypes.data)
    return out


def wgrad_loop(par: bool) -> Any:
    """numba loop over work items (code, bits, vals, starts, g_nhwc, dwt, n, c, h, w, o, kh, kw, sh, sw,
    pt, pl, dh, dw, h_out, w_out, items, parts) calling the C loop on `parts` equal item ranges."""
    return _loops()[1 if par else 0]


@functools.lru_cache(maxsize=1)
def _loops() -> tuple[Any, Any]:
    from numba import njit, prange

    fn = _fns()[2]

    @njit(cache=False)
    def serial(code, bits, vals, starts, g, dwt, n, c, h, w, o, kh, kw, sh, sw, pt, pl, dh, dw, h_out, w_out,  # noqa: ANN001, ANN202
               items, parts):
        return fn(code, bits.ctypes.data, vals.ctypes.data, starts.ctypes.data, g.ctypes.data, dwt.ctypes.data,
                  n, c, h, w, o, kh, kw, sh, sw, pt, pl, dh, dw, h_out, w_out, 0, items)

    @njit(cache=False, parallel=True)
    def parallel(code, bits, vals, starts, g, dwt, n, c, h, w, o, kh, kw, sh, sw, pt, pl, dh, dw, h_out, w_out,  # noqa: ANN001, ANN202
                 items, parts):
        rc = np.zeros(parts, np.int32)
        for p in prange(parts):
            rc[p] = fn(code, bits.ctypes.data, vals.ctypes.data, starts.ctypes.data, g.ctypes.data, dwt.ctypes.data,
                       n, c, h, w, o, kh, kw, sh, sw, pt, pl, dh, dw, h_out, w_out, items * p // parts,
                       items * (p + 1) // parts)
        return rc.min()

    return serial, parallel
