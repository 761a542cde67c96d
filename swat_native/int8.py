"""Bindings of the int8 conv kernels (``csrc/int8_conv.c``) and their thread-parallel drivers.

Kept apart from ``swat_native/__init__.py`` (the float32 core): the int8 path has its own ISA
ladder, since its fast path needs AVX-512 *VNNI* (vpdpbusd), not just AVX-512F, and its AVX2
path exists for CPUs without any int8 dot product. ``SWAT_ISA`` lowers it the same way
(``avx2`` / ``generic``), which is how the tests run every path on one machine.

Parallelism: by default one C call per layer (``csrc/int8_layer.c``: pack + multiply on the
extension's own spinning thread pool, `QLayerCall`), or one per chain of layers (`QChainCall`);
an empty numba prange call costs ~30 us on the issue's 2-core Xeon, more than a batch-1 layer's
arithmetic. The numba drivers below (prange over a few equal work items, each one C call) remain
for builds without int8_layer.c and for ``SWAT_INT8_LAYER_CALL=0``.
"""
from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import numpy as np

from . import _lib, pick_isa

_CODE = {"generic": 0, "avx2": 1, "avx512": 2}


_QLAYER_FIXED = ("rows", "zy", "lo", "hi", "n", "c", "h", "w", "kw", "s", "nph", "pt", "pl", "R", "w_out", "zx",
                 "img_in", "plane", "pack_items", "by_rows", "row_parts", "isa", "threads")


class QLayerArgs(ctypes.Structure):
    """struct swat_qlayer of csrc/int8_layer.c (same field order and types)."""

    _fields_ = ([(k, ctypes.c_uint64) for k in ("indptr", "offs", "vals", "corr", "mult")]
                + [(k, ctypes.c_int64) for k in _QLAYER_FIXED]
                + [(k, ctypes.c_float) for k in ("ra", "rb", "rc")] + [("rlo", ctypes.c_int64)]
                + [(k, ctypes.c_uint64) for k in ("x", "xp", "y", "res")] + [("chunk", ctypes.c_int64)])


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
        # the one-call layer (csrc/int8_layer.c); None in a build from before it
        self.qlayer = getattr(cdll, "swat_qconv_layer", None)
        if self.qlayer is not None:
            self.qlayer.argtypes = [ctypes.POINTER(QLayerArgs)]
            self.qlayer.restype = ctypes.c_int
        self.qchain = getattr(cdll, "swat_qchain", None)
        if self.qchain is not None:
            self.qchain.argtypes = [ctypes.c_void_p, ctypes.c_int64]
            self.qchain.restype = ctypes.c_int
        self.qadd_mt = getattr(cdll, "swat_qadd_u8_mt", None)
        if self.qadd_mt is not None:
            self.qadd_mt.argtypes = [i64, u64, u64, u64, f32, f32, f32, i64, i64, i64]
            self.qadd_mt.restype = None
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
    if name:
        return _CODE[name]
    # once per layer call at batch 1: os.environ.get costs ~1.5 us here, its bytes dict 0.05 us
    env = getattr(os.environ, "_data", None)
    raw = env.get(b"SWAT_ISA") if isinstance(env, dict) else os.environ.get("SWAT_ISA", "")
    return _isa_code_for(raw or "")


@functools.lru_cache(maxsize=8)
def _isa_code_for(_env: object) -> int:
    return _CODE[isa()]


def layer_call_available() -> bool:
    """Whether the build has the one-call int8 layer and residual add (csrc/int8_layer.c)."""
    lib = _int8()
    return lib is not None and lib.qlayer is not None and lib.qadd_mt is not None


class QLayerCall:
    """The fixed arguments of one int8 conv at one input shape (`QLayerArgs`); `run` sets the
    per-call pointers and runs pack + multiply on the extension's own pool, GIL released.

    `arrays` (indptr, offs, vals, corr int32; mult float32) are kept referenced here so the
    struct's pointers stay valid."""

    def __init__(self, indptr: np.ndarray, offs: np.ndarray, vals: np.ndarray, corr: np.ndarray,
                 mult: np.ndarray, **fixed: int) -> None:
        for a, dt in ((indptr, np.int32), (offs, np.int32), (vals, np.int32), (corr, np.int32), (mult, np.float32)):
            if a.dtype != dt or not a.flags.c_contiguous:
                raise ValueError(f"QLayerCall needs contiguous {np.dtype(dt).name} arrays, got {a.dtype}")
        self._keep = (indptr, offs, vals, corr, mult)
        self.args = QLayerArgs(*(a.ctypes.data for a in self._keep), *(int(fixed.get(k, 0)) for k in _QLAYER_FIXED))
        self.args.chunk = int(fixed.get("chunk", 0))  # > 0: fused pack + multiply per chunk of images
        self._ptr = ctypes.pointer(self.args)
        self._fn = _int8().qlayer

    def set_residual(self, ra: float, rb: float, rc: float, rlo: int) -> None:
        """The fused residual add's constants (see swat_qconv_u8_res); used by calls with `res`."""
        a = self.args
        a.ra, a.rb, a.rc, a.rlo = ra, rb, rc, rlo

    def run(self, x: int, xp: int, y: int, isa: int, res: int = 0) -> None:
        """Pointers as integers: the uint8 NCHW input, the packed scratch, the uint8 NCHW output,
        the uint8 residual of y's shape (0: none)."""
        a = self.args
        a.x, a.xp, a.y, a.isa, a.res = x, xp, y, isa, res
        if self._fn(self._ptr):
            raise ValueError(f"the compiled int8 layer refused isa code {isa}")


def chain_available() -> bool:
    """Whether the build runs a list of one-call layers in one call (swat_qchain)."""
    lib = _int8()
    return layer_call_available() and lib.qchain is not None


class QChainCall:
    """Several `QLayerCall` structs run back to back by one C call; their pointers are set by
    the caller (`QLayerCall.args`) and stay fixed between runs except those it updates."""

    def __init__(self, calls: list[QLayerCall]) -> None:
        self.calls = calls
        self._arr = (ctypes.POINTER(QLayerArgs) * len(calls))(*(c._ptr for c in calls))
        self._addr = ctypes.addressof(self._arr)
        self._fn = _int8().qchain

    def run(self) -> None:
        if self._fn(self._addr, len(self.calls)):
            raise ValueError("the compiled int8 chain refused a layer's isa code")


def add_mt_ptr(code: int, a: int, b: int, y: int, ra: float, rb: float, c: float, lo: int, n: int,
               threads: int) -> None:
    """`add_mt` on raw pointers (``tensor.data_ptr()``): n contiguous uint8 elements."""
    _int8().qadd_mt(code, a, b, y, ra, rb, c, lo, n, threads)


def add_mt(code: int, a: np.ndarray, b: np.ndarray, y: np.ndarray, ra: float, rb: float, c: float, lo: int,
           threads: int) -> None:
    """onnxruntime's QLinearAdd over flat contiguous uint8 arrays in one call on the pool."""
    _int8().qadd_mt(code, a.ctypes.data, b.ctypes.data, y.ctypes.data, ra, rb, c, lo, y.size, threads)


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
