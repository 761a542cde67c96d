"""Bindings of ``csrc/bits_f32.c``: SWAT's per-step bitmask bookkeeping (ReLU + bitmask,
gradient masking, threshold -> bitmask, compact values <-> dense), vectorised at the
machine's ISA.

Same signatures as the numba loops in ``training/_swat_kernels.py`` (the fallback when the
library is not built) plus ``code`` (the ISA, see :func:`swat_native.isa_code`).

``parts`` > 1 splits a pass over that many threads (numba ``prange``; the C loops take an element
range [i0, i1), i0 a multiple of 8). Whether that pays depends on the machine: on the Zen 4
EPYC a 4 MB activation ran no faster on 2 vCPUs (0.107 vs 0.110 ms: memory-bound), on the Zen
3 EPYC (AVX2) the same ReLU + bitmask pass took 0.6x the time on 2 (288 -> 173 us; 1 MB: 71 ->
41 us). Callers pass parts = 1 below :data:`PARALLEL_MIN` elements. Results do not depend on
``parts`` (gather keeps the flat order).
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np

from . import _lib

__all__ = ["relu_pack", "mask_select", "pack_gt", "gather", "expand", "PARALLEL_MIN", "GATHER_SPARE"]

PARALLEL_MIN = 1 << 18  # elements: smaller tensors take one thread (a parallel region costs ~10 us)
GATHER_SPARE = 8  # slots past count a gather may write (its 8-lane stores)


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


@functools.lru_cache(maxsize=1)
def _par() -> tuple[Any, ...]:
    """numba loops running a pass on `parts` element ranges (compiled on first use, ~1 s)."""
    from numba import njit, prange

    relu, msel, pgt = _fns()[:3]

    @njit(cache=False, inline="always")
    def cut(n, p, parts):  # noqa: ANN001, ANN202 - range p of parts, starts on a bitmask byte
        return (n * p // parts) // 8 * 8, (n if p == parts - 1 else (n * (p + 1) // parts) // 8 * 8)

    @njit(cache=False, parallel=True)
    def relu_par(code, x, y, bits, parts):  # noqa: ANN001, ANN202
        counts = np.zeros(parts, np.int64)
        for p in prange(parts):
            i0, i1 = cut(x.size, p, parts)
            counts[p] = relu(code, x.ctypes.data, y.ctypes.data, bits.ctypes.data, i0, i1)
        return counts.sum()

    @njit(cache=False, parallel=True)
    def msel_par(code, x, bits, out, parts):  # noqa: ANN001, ANN202
        for p in prange(parts):
            i0, i1 = cut(x.size, p, parts)
            msel(code, x.ctypes.data, bits.ctypes.data, out.ctypes.data, i0, i1)

    @njit(cache=False, parallel=True)
    def pgt_par(code, x, thr, inner, period, bits, parts):  # noqa: ANN001, ANN202
        counts = np.zeros(parts, np.int64)
        for p in prange(parts):
            i0, i1 = cut(x.size, p, parts)
            counts[p] = pgt(code, x.ctypes.data, thr.ctypes.data, inner, period, bits.ctypes.data, i0, i1)
        return counts.sum()

    return relu_par, msel_par, pgt_par


def relu_pack(code: int, x: np.ndarray, y: np.ndarray, bits: np.ndarray, parts: int = 1) -> int:
    """y = relu(x) (``y`` may be ``x``), bit i = not (x[i] <= 0); returns the count."""
    if parts > 1:
        return int(_par()[0](code, x, y, bits, parts))
    return int(_fns()[0](code, x.ctypes.data, y.ctypes.data, bits.ctypes.data, 0, x.size))


def mask_select(code: int, x_u32: np.ndarray, bits: np.ndarray, out_u32: np.ndarray, parts: int = 1) -> None:
    """out = x where the bit is set, 0 elsewhere (uint32 views of float32 data)."""
    if parts > 1:
        _par()[1](code, x_u32, bits, out_u32, parts)
        return
    _fns()[1](code, x_u32.ctypes.data, bits.ctypes.data, out_u32.ctypes.data, 0, x_u32.size)


def pack_gt(code: int, x: np.ndarray, thr: np.ndarray, inner: int, period: int, bits: np.ndarray,
            parts: int = 1) -> int:
    """bit i = |x[i]| > thr[(i // inner) % period] (``thr`` float32); returns the count."""
    thr = np.ascontiguousarray(thr, dtype=np.float32)
    if parts > 1:
        return int(_par()[2](code, x, thr, int(inner), int(period), bits, parts))
    return int(_fns()[2](code, x.ctypes.data, thr.ctypes.data, int(inner), int(period), bits.ctypes.data, 0, x.size))


def gather(code: int, x: np.ndarray, bits: np.ndarray, vals: np.ndarray) -> int:
    """vals[:count] = x where the bit is set; returns count. ``vals`` needs count +
    ``GATHER_SPARE`` slots: the AVX2 loop stores 8 lanes at a time and may write up to 7 floats
    past count. One thread: split over 2 (each part's start from a popcount, the parts joined
    after) it ran 0.95x the time on the Zen 3 EPYC, not worth the code."""
    return int(_fns()[3](code, x.ctypes.data, bits.ctypes.data, vals.ctypes.data, 0, x.size))


def expand(code: int, bits: np.ndarray, vals: np.ndarray, out: np.ndarray) -> None:
    """out = dense tensor with ``vals`` at the set bits, zeros elsewhere."""
    _fns()[4](code, bits.ctypes.data, vals.ctypes.data, out.ctypes.data, 0, out.size)
