"""Bindings of the int8 conv kernels (``csrc/int8_conv.c``) and their thread-parallel drivers.

Kept apart from ``swat_native/__init__.py`` (the float32 core): the int8 path has its own ISA
ladder, since its fast path needs AVX-512 *VNNI* (vpdpbusd), not just AVX-512F, and its AVX2
path exists for CPUs without any int8 dot product. ``SWAT_ISA`` lowers it the same way
(``avx2`` / ``generic``), which is how the tests run every path on one machine.

Parallelism as in the float32 core: numba's prange over a few equal work items, each one C call
(numba calls ctypes functions natively, without the GIL).
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any

from . import _lib, pick_isa

_CODE = {"generic": 0, "avx2": 1, "avx512": 2}


class _Int8Lib:
    def __init__(self, cdll: ctypes.CDLL) -> None:
        u64, i64 = ctypes.c_uint64, ctypes.c_int64
        self.qconv = cdll.swat_qconv_u8
        self.qconv.argtypes = [i64, u64, u64, u64, u64, u64, i64, i64, i64, u64, i64, u64, i64, i64,
                               i64, i64, i64, i64]
        self.qconv.restype = ctypes.c_int
        self.qpack = cdll.swat_qpack_u8
        self.qpack.argtypes = [u64, u64] + [i64] * 14
        self.qpack.restype = None
        f32 = ctypes.c_float
        self.qadd = cdll.swat_qadd_u8
        self.qadd.argtypes = [i64, u64, u64, u64, f32, f32, f32, i64, i64, i64]
        self.qadd.restype = None
        cdll.swat_int8_isas.restype = ctypes.c_int
        bits = cdll.swat_int8_isas()
        self.cpu_isas = ("generic",) + (("avx2",) if bits & 1 else ()) + (("avx512",) if bits & 2 else ())


@functools.lru_cache(maxsize=1)
def _int8() -> _Int8Lib | None:
    lib = _lib()
    if lib is None:
        return None
    try:
        return _Int8Lib(lib.cdll)
    except AttributeError:  # a build from before the int8 kernels
        return None


def available() -> bool:
    """Whether the compiled int8 kernels were built and load."""
    return _int8() is not None


def cpu_isas() -> tuple[str, ...]:
    """int8 paths this CPU runs, lowest first: "avx512" means AVX-512 F/BW/VL + VNNI."""
    lib = _int8()
    return ("generic",) if lib is None else lib.cpu_isas


def isa() -> str:
    """The int8 path used here: the best this CPU runs, or the lower one SWAT_ISA names."""
    return pick_isa(cpu_isas(), "this CPU's int8 kernels run only")


def isa_code(name: str | None = None) -> int:
    return _CODE[name or isa()]


def conv_loop(par: bool) -> Any:
    """(code, indptr, offs, vals, corr, mult, zy, lo, hi, xp, img_in, y, img_out, plane, ntiles, parts,
    by_rows): the sparse int8 conv over `parts` work items, each a range of 16-pixel tiles (whole
    groups of 8) or, when there are too few tiles, a range of rows holding an equal share of the
    non-zero blocks."""
    return _loops()[1 if par else 0]


def pack_loop(par: bool) -> Any:
    """(x, xp, C, H, W, kw, s, nph, pt, pl, R, w_out, zx, img_in, items, parts): the packed input
    (see ``swat_qpack_u8``) over `parts` ranges of (image, channel group) items."""
    return _loops()[3 if par else 2]


def add_loop(par: bool) -> Any:
    """(code, a, b, y, ra, rb, c, lo, parts): onnxruntime's QLinearAdd over flat uint8 arrays
    (see ``swat_qadd_u8``), in `parts` equal ranges."""
    return _loops()[5 if par else 4]


@functools.lru_cache(maxsize=1)
def _loops() -> tuple[Any, ...]:
    from numba import njit, prange

    lib = _int8()
    qconv, qpack = lib.qconv, lib.qpack

    @njit(cache=False, inline="always")
    def row_at(indptr, share, parts):  # noqa: ANN001, ANN202 - first row whose start reaches the share
        rows = indptr.shape[0] - 1
        if share <= 0:
            return 0
        if share >= parts:
            return rows
        want = (indptr[rows] * share) // parts
        lo, hi = 0, rows
        while lo < hi:
            mid = (lo + hi) // 2
            if indptr[mid] < want:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @njit(cache=False, inline="always")
    def item(q, code, indptr, offs, vals, corr, mult, zy, lo, hi, xp, img_in, y, img_out, plane, ntiles,  # noqa: ANN001, ANN202
             parts, by_rows):
        rows = indptr.shape[0] - 1
        if by_rows:
            g0, g1, r0, r1 = 0, ntiles, row_at(indptr, q, parts), row_at(indptr, q + 1, parts)
        else:
            per = ((ntiles + parts - 1) // parts + 7) // 8 * 8
            g0, g1, r0, r1 = min(q * per, ntiles), min((q + 1) * per, ntiles), 0, rows
        if g0 < g1 and r0 < r1:
            qconv(code, indptr.ctypes.data, offs.ctypes.data, vals.ctypes.data, corr.ctypes.data,
                  mult.ctypes.data, zy, lo, hi, xp.ctypes.data, img_in, y.ctypes.data, img_out, plane,
                  g0, g1, r0, r1)

    @njit(cache=False)
    def conv_serial(code, indptr, offs, vals, corr, mult, zy, lo, hi, xp, img_in, y, img_out, plane, ntiles,  # noqa: ANN001, ANN202
                    parts, by_rows):
        for q in range(parts):
            item(q, code, indptr, offs, vals, corr, mult, zy, lo, hi, xp, img_in, y, img_out, plane, ntiles,
                 parts, by_rows)

    @njit(cache=False, parallel=True)
    def conv_parallel(code, indptr, offs, vals, corr, mult, zy, lo, hi, xp, img_in, y, img_out, plane, ntiles,  # noqa: ANN001, ANN202
                      parts, by_rows):
        for q in prange(parts):
            item(q, code, indptr, offs, vals, corr, mult, zy, lo, hi, xp, img_in, y, img_out, plane, ntiles,
                 parts, by_rows)

    @njit(cache=False)
    def pack_serial(x, xp, c, h, w, kw, s, nph, pt, pl, r, w_out, zx, img_in, items, parts):  # noqa: ANN001, ANN202
        qpack(x.ctypes.data, xp.ctypes.data, c, h, w, kw, s, nph, pt, pl, r, w_out, zx, img_in, 0, items)

    @njit(cache=False, parallel=True)
    def pack_parallel(x, xp, c, h, w, kw, s, nph, pt, pl, r, w_out, zx, img_in, items, parts):  # noqa: ANN001, ANN202
        for q in prange(parts):
            qpack(x.ctypes.data, xp.ctypes.data, c, h, w, kw, s, nph, pt, pl, r, w_out, zx, img_in,
                  items * q // parts, items * (q + 1) // parts)

    qadd = lib.qadd

    @njit(cache=False)
    def add_serial(code, a, b, y, ra, rb, c, lo, parts):  # noqa: ANN001, ANN202
        qadd(code, a.ctypes.data, b.ctypes.data, y.ctypes.data, ra, rb, c, lo, 0, y.size)

    @njit(cache=False, parallel=True)
    def add_parallel(code, a, b, y, ra, rb, c, lo, parts):  # noqa: ANN001, ANN202
        n = y.size
        for q in prange(parts):
            qadd(code, a.ctypes.data, b.ctypes.data, y.ctypes.data, ra, rb, c, lo, n * q // parts,
                 n * (q + 1) // parts)

    return conv_serial, conv_parallel, pack_serial, pack_parallel, add_serial, add_parallel
