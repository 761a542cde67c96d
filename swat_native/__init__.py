"""The compiled kernel core (``swat_native/_swatk*.so``, built by ``pip install -e .``) and the ISA it runs at.

It sits below ``training`` and ``swat_deploy`` (it imports neither), so the sparse inference
backend and SWAT's training products share one set of loops.

Why a C extension: the sparse row loop wins only if its output tile stays in vector
registers at the machine's full width. numba's LLVM targets 256-bit vectors on AVX-512 CPUs
and cannot be told which loop order keeps a tile's input window in L1; the C loops in
``swat_native/csrc/*.c`` are written once per ISA (AVX-512, AVX2+FMA, portable C) with gcc's
per-function ``target`` attribute, so one build runs on any x86-64 CPU and picks its path at
run time.

The ISA is the best this CPU runs, unless ``SWAT_ISA`` names a lower one (``avx2`` or
``generic``); tests use that to exercise the path a machine would not pick. The loops are
serial; `shift_rows` parallelises over (image chunk, tile group, row group) with numba's
prange, calling the C function from each worker (numba calls ctypes functions natively).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

# OpenMP's idle spin, shortened before any OpenMP runtime in this process starts (torch's and
# numba's each read it once, when they load). Why: after every parallel region libgomp's workers
# spin 300,000 PAUSEs (~5 ms on AMD Zen 4, longer on Intel) before they sleep. Our kernels run on
# their own pool (csrc/layer_f32.c), so each torch or numba op between two of our layers left a
# spinning worker that took one of the machine's cores from our pool for a whole scheduler slice:
# ResNet-50 at 224 (80 %, blocks of 4, batch 1, 2 threads, AMD EPYC) ran 27-34 ms a call with
# 4 ms stalls on layers of 0.3 ms, 17.5-19.4 ms with a spin of 10,000 (~0.2 ms, still longer than
# the gap between two torch ops). Dense torch alone lost 5-10 % at batch 1 (67 -> 72 ms). A value
# the user set wins; it must be set before `import torch` to reach torch's runtime.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

ISAS = ("generic", "avx2", "avx512")
_ISA_CODE = {"generic": 0, "avx2": 1, "avx512": 2}
_LIB_NAME = "_swatk"


class _Lib:
    def __init__(self, cdll: ctypes.CDLL) -> None:
        self.cdll = cdll
        u64, i64 = ctypes.c_uint64, ctypes.c_int64
        # Pointers travel as integers (numba passes ``arr.ctypes.data``); same x86-64 ABI.
        self.shift_f32 = cdll.swat_shift_f32
        self.shift_f32.argtypes = [i64, u64, u64, u64, u64, u64, u64, i64, i64, i64, i64, i64, i64]
        self.shift_f32.restype = ctypes.c_int
        self.shift_f32_epi = cdll.swat_shift_f32_epi
        self.shift_f32_epi.argtypes = [i64, u64, u64, u64, u64, u64, u64, u64] + [i64] * 9
        self.shift_f32_epi.restype = ctypes.c_int
        self.pack_phases_f32 = cdll.swat_pack_phases_f32
        self.pack_phases_f32.argtypes = [u64, u64] + [i64] * 14
        self.pack_phases_f32.restype = None
        self.im2col_f32 = cdll.swat_im2col_f32
        self.im2col_f32.argtypes = [u64, u64] + [i64] * 18
        self.im2col_f32.restype = None
        self.pack_shifted_f32 = cdll.swat_pack_shifted_f32
        self.pack_shifted_f32.argtypes = [u64, u64] + [i64] * 15
        self.pack_shifted_f32.restype = None
        cdll.swat_cpu_isas.restype = ctypes.c_int
        bits = cdll.swat_cpu_isas()
        self.cpu_isas = ("generic",) + (("avx2",) if bits & 1 else ()) + (("avx512",) if bits & 2 else ())


def _find_library() -> Path | None:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"{_LIB_NAME}{suffix}"
        if p.is_file():
            return p
    return None


@functools.lru_cache(maxsize=1)
def _lib() -> _Lib | None:
    path = _find_library()
    if path is None:
        return None
    try:
        return _Lib(ctypes.CDLL(str(path)))
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def build_id() -> str:
    """A short hash of the compiled library ("none" when it is not built). Kernel choices timed
    and cached on disk (inference autotune, training's sparse-vs-dense picks) are keyed by it: a
    rebuilt or upgraded kernel set is timed afresh instead of inheriting picks made when a
    kernel was missing or slower."""
    path = _find_library()
    if path is None:
        return "none"
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first value of each /proc/cpuinfo field, in file order (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name ("model name" on x86, "Model" / "Hardware" on ARM, whichever comes
    first), else what :mod:`platform` knows."""
    name = next((v for k, v in _cpuinfo().items() if k in ("model name", "Model", "Hardware")), "")
    return name or platform.processor() or platform.machine() or "unknown"


def cpu_signature() -> str:
    """vendor/family/model/stepping from /proc/cpuinfo (or ""): hypervisors may report the same
    model name ("AMD EPYC") for CPUs of different generations and vector widths."""
    info = _cpuinfo()
    parts = [info.get(k, "") for k in ("vendor_id", "cpu family", "model", "stepping")]
    return "/".join(parts) if any(parts) else ""


def available() -> bool:
    """Whether the compiled kernels were built and load (`pip install -e .` builds them)."""
    return _lib() is not None


def cpu_isas() -> tuple[str, ...]:
    """The ISAs this CPU can run, lowest first (always includes "generic")."""
    lib = _lib()
    return ("generic",) if lib is None else lib.cpu_isas


def isa() -> str:
    """The ISA the compiled kernels use here: the best the CPU has, or a lower one from SWAT_ISA."""
    return pick_isa(cpu_isas(), "this CPU runs only")


def pick_isa(runs: tuple[str, ...], what: str) -> str:
    """SWAT_ISA checked against the paths `runs` (lowest first), else the best of them; shared
    by the float32 and int8 kernels so one variable lowers both the same way."""
    want = os.environ.get("SWAT_ISA", "").strip().lower()
    if not want:
        return runs[-1]
    if want not in ISAS:
        raise ValueError(f"SWAT_ISA={want!r} is not one of {', '.join(ISAS)}; unset it or pick one of those")
    if want not in runs:
        raise ValueError(f"SWAT_ISA={want!r}, but {what} {', '.join(runs)}; unset SWAT_ISA")
    return want


_ISA_BY_ENV: dict[str, int] = {}


def isa_code(name: str | None = None) -> int:
    """The ISA's number as the C loops take it; without a name, the one `isa()` picks. Every
    layer call asks, so the pick is kept per value of SWAT_ISA (the variable is still read
    each time: tests and users may change it between calls)."""
    if name is not None:
        return _ISA_CODE[name]
    env = os.environ.get("SWAT_ISA", "")
    code = _ISA_BY_ENV.get(env)
    if code is None:
        code = _ISA_BY_ENV[env] = _ISA_CODE[isa()]
    return code


def lanes(name: str | None = None) -> int:
    """Floats per vector register on that ISA (16 AVX-512, 8 AVX2, 1 portable)."""
    return {"avx512": 16, "avx2": 8, "generic": 1}[name or isa()]


BLOCKS = (1, 2, 4, 8, 16)  # block heights the compiled loops have micro-kernels for


@functools.lru_cache(maxsize=1)
def _item_span() -> Any:
    """Work item i -> (image chunk b, rows r0..r1, grid t0..t1): items are chunk-major, then
    tile groups of `tg` floats, then `nrg` row groups (see `split`). Row groups hold equal
    shares of the non-zeros (not of the rows): rows of a sparse weight differ a lot in length,
    and an even row split left one of two threads with up to 1.5x the other's work."""
    from numba import njit

    @njit(cache=False, inline="always")
    def row_at(indptr, share, parts):  # noqa: ANN001, ANN202
        rows = indptr.shape[0] - 1
        if share <= 0:
            return 0
        if share >= parts:
            return rows
        want = (np.int64(indptr[rows]) * share) // parts
        lo, hi = 0, rows
        while lo < hi:  # first row whose start reaches `want`
            mid = (lo + hi) // 2
            if indptr[mid] < want:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @njit(cache=False, inline="always")
    def span(i, indptr, run, ntg, tg, nrg):  # noqa: ANN001, ANN202
        per_b = ntg * nrg
        b = i // per_b
        rest = i - b * per_b
        g = rest // nrg
        q = rest - g * nrg
        t0 = g * tg
        if nrg == 1:
            return b, 0, indptr.shape[0] - 1, t0, min(run, t0 + tg)
        return b, row_at(indptr, q, nrg), row_at(indptr, q + 1, nrg), t0, min(run, t0 + tg)

    return span


def shift_rows(par: bool) -> Any:
    """numba loop over (chunk, tile group, row group) calling the C shift kernel (see module doc)."""
    return _numba_loops()[1 if par else 0]


@functools.lru_cache(maxsize=1)
def _numba_loops() -> tuple[Any, Any]:
    from numba import njit, prange

    fn = _lib().shift_f32
    span = _item_span()

    # out[b][(r*B + j)*run + t] = bias + sum_k vals[k*B + j] * packed[b*chunk_in + offs[k] + t]
    @njit(cache=False, inline="always")
    def _item(i, code, indptr, offs, vals, bias, packed, chunk_in, out, run, nb, blk, ntg, tg, nrg):  # noqa: ANN001, ANN202
        rows = indptr.shape[0] - 1
        b, r0, r1, t0, t1 = span(i, indptr, run, ntg, tg, nrg)
        fn(code, indptr.ctypes.data, offs.ctypes.data, vals.ctypes.data, bias.ctypes.data,
           packed.ctypes.data + 4 * b * chunk_in, out.ctypes.data + 4 * b * rows * blk * run,
           blk, run, r0, r1, t0, t1)

    @njit(cache=False)
    def serial(code, indptr, offs, vals, bias, packed, chunk_in, out, run, nb, blk, ntg, tg, nrg):  # noqa: ANN001, ANN202
        for i in range(nb * ntg * nrg):
            _item(i, code, indptr, offs, vals, bias, packed, chunk_in, out, run, nb, blk, ntg, tg, nrg)

    @njit(cache=False, parallel=True)
    def parallel(code, indptr, offs, vals, bias, packed, chunk_in, out, run, nb, blk, ntg, tg, nrg):  # noqa: ANN001, ANN202
        for i in prange(nb * ntg * nrg):
            _item(i, code, indptr, offs, vals, bias, packed, chunk_in, out, run, nb, blk, ntg, tg, nrg)

    return serial, parallel


def pack_phases(par: bool) -> Any:
    """(x, packed, nchunk, sh, sw, pt, pl, hq, wq, chunk_in): the zero-padded, stride-phase-split
    input layout of `csr_direct` (see ``native/pack_f32.c``), over (chunk, channel) items."""
    return _pack_loops()[1 if par else 0]


def pack_shifted(par: bool) -> Any:
    """(x, packed, kw, sh, sw, dw, pt, pl, hq, pitch, copy_size, chunk_in): `csr_direct`'s aligned
    layout, kw column-shifted copies of the padded input, one image per chunk."""
    return _pack_loops()[5 if par else 4]


def im2col(par: bool) -> Any:
    """(x, packed, nchunk, kh, kw, sh, sw, dh, dw, pt, pl, h_out, w_out, run): `csr_im2col`'s rows."""
    return _pack_loops()[3 if par else 2]


@functools.lru_cache(maxsize=1)
def _pack_loops() -> tuple[Any, ...]:
    from numba import njit, prange

    lib = _lib()
    pack_fn, col_fn = lib.pack_phases_f32, lib.im2col_f32

    # Items (chunk, channel) in groups of `per` so a parallel call costs one C call per group.
    @njit(cache=False)
    def pack_serial(x, packed, nchunk, sh, sw, pt, pl, hq, wq, chunk_in):  # noqa: ANN001, ANN202
        n, c, h, w = x.shape
        nb = (n + nchunk - 1) // nchunk
        pack_fn(x.ctypes.data, packed.ctypes.data, n, c, h, w, nchunk, sh, sw, pt, pl, hq, wq, chunk_in, 0, nb * c)

    @njit(cache=False, parallel=True)
    def pack_parallel(x, packed, nchunk, sh, sw, pt, pl, hq, wq, chunk_in):  # noqa: ANN001, ANN202
        n, c, h, w = x.shape
        items = ((n + nchunk - 1) // nchunk) * c
        groups = min(items, 16)
        for g in prange(groups):
            pack_fn(x.ctypes.data, packed.ctypes.data, n, c, h, w, nchunk, sh, sw, pt, pl, hq, wq, chunk_in,
                    items * g // groups, items * (g + 1) // groups)

    @njit(cache=False)
    def col_serial(x, packed, nchunk, kh, kw, sh, sw, dh, dw, pt, pl, h_out, w_out, run):  # noqa: ANN001, ANN202
        n, c, h, w = x.shape
        nb = (n + nchunk - 1) // nchunk
        col_fn(x.ctypes.data, packed.ctypes.data, n, c, h, w, nchunk, kh, kw, sh, sw, dh, dw, pt, pl, h_out, w_out,
               run, 0, nb * c)

    @njit(cache=False, parallel=True)
    def col_parallel(x, packed, nchunk, kh, kw, sh, sw, dh, dw, pt, pl, h_out, w_out, run):  # noqa: ANN001, ANN202
        n, c, h, w = x.shape
        items = ((n + nchunk - 1) // nchunk) * c
        groups = min(items, 16)
        for g in prange(groups):
            col_fn(x.ctypes.data, packed.ctypes.data, n, c, h, w, nchunk, kh, kw, sh, sw, dh, dw, pt, pl, h_out,
                   w_out, run, items * g // groups, items * (g + 1) // groups)

    shifted_fn = lib.pack_shifted_f32

    @njit(cache=False)
    def shifted_serial(x, packed, kw, sh, sw, dw, pt, pl, hq, pitch, copy_size, chunk_in):  # noqa: ANN001, ANN202
        n, c, h, w = x.shape
        shifted_fn(x.ctypes.data, packed.ctypes.data, c, h, w, kw, sh, sw, dw, pt, pl, hq, pitch, copy_size,
                   chunk_in, 0, n * c)

    @njit(cache=False, parallel=True)
    def shifted_parallel(x, packed, kw, sh, sw, dw, pt, pl, hq, pitch, copy_size, chunk_in):  # noqa: ANN001, ANN202
        n, c, h, w = x.shape
        items = n * c
        groups = min(items, 16)
        for g in prange(groups):
            shifted_fn(x.ctypes.data, packed.ctypes.data, c, h, w, kw, sh, sw, dw, pt, pl, hq, pitch, copy_size,
                       chunk_in, items * g // groups, items * (g + 1) // groups)

    return pack_serial, pack_parallel, col_serial, col_parallel, shifted_serial, shifted_parallel


def shift_rows_into(par: bool) -> Any:
    """Like `shift_rows`, one image per chunk, but written straight into the NCHW output with the
    residual and ReLU applied (the C ``swat_epi`` epilogue): no scratch rows, no unpack pass.

    (code, indptr, offs, vals, bias, packed, chunk_in, y, res, has_res, relu, pitch, w_out, plane,
    run, nb, blk, ntg, tg, nrg); `y` / `res` are flat (N * O * plane) float32 arrays, `run` the
    grid length per output channel (a multiple of 16)."""
    return _numba_epi_loops()[1 if par else 0]


@functools.lru_cache(maxsize=1)
def _numba_epi_loops() -> tuple[Any, Any]:
    from numba import njit, prange

    fn = _lib().shift_f32_epi
    span = _item_span()

    @njit(cache=False, inline="always")
    def _item(i, code, indptr, offs, vals, bias, packed, chunk_in, y, res, has_res, relu, pitch, w_out, plane,  # noqa: ANN001, ANN202
              run, nb, blk, ntg, tg, nrg):
        rows = indptr.shape[0] - 1
        b, r0, r1, t0, t1 = span(i, indptr, run, ntg, tg, nrg)
        img = 4 * b * rows * blk * plane
        rp = res.ctypes.data + img if has_res else 0
        fn(code, indptr.ctypes.data, offs.ctypes.data, vals.ctypes.data, bias.ctypes.data,
           packed.ctypes.data + 4 * b * chunk_in, y.ctypes.data + img, rp, blk, pitch, w_out, plane, relu,
           r0, r1, t0, t1)

    @njit(cache=False)
    def serial(code, indptr, offs, vals, bias, packed, chunk_in, y, res, has_res, relu, pitch, w_out, plane,  # noqa: ANN001, ANN202
               run, nb, blk, ntg, tg, nrg):
        for i in range(nb * ntg * nrg):
            _item(i, code, indptr, offs, vals, bias, packed, chunk_in, y, res, has_res, relu, pitch, w_out, plane,
                  run, nb, blk, ntg, tg, nrg)

    @njit(cache=False, parallel=True)
    def parallel(code, indptr, offs, vals, bias, packed, chunk_in, y, res, has_res, relu, pitch, w_out, plane,  # noqa: ANN001, ANN202
                 run, nb, blk, ntg, tg, nrg):
        for i in prange(nb * ntg * nrg):
            _item(i, code, indptr, offs, vals, bias, packed, chunk_in, y, res, has_res, relu, pitch, w_out, plane,
                  run, nb, blk, ntg, tg, nrg)

    return serial, parallel


def split(run: int, nb: int, rows: int, threads: int) -> tuple[int, int, int]:
    """(tile-group count, tile-group floats, row-group count) for one call.

    The C loop walks its tiles outermost, so a tile's input window stays in L1 whatever the
    group size; groups exist only to share the work. numba's prange hands each thread one
    contiguous block of items, so the items must be equal and their count a multiple of the
    thread count: then every thread gets the same work. Each image chunk is cut into
    `parts` equal pieces, by tiles when a piece keeps at least 8 vectors (full-width register
    tiles), else by rows of equal non-zero count (small maps such as 4x4 at batch 1).
    """
    tiles = -(-run // 16)
    if threads <= 1 or nb % threads == 0:
        return 1, tiles * 16, 1
    parts = threads // math.gcd(nb, threads)
    if tiles >= 8 * parts:
        tg = -(-tiles // parts) * 16
        return -(-run // tg), tg, 1
    return 1, tiles * 16, max(1, min(rows, parts))


def check_offsets(offs: np.ndarray) -> np.ndarray:
    """The per-non-zero offsets as int32 (the compiled loops' index type)."""
    if offs.dtype == np.int32 and offs.flags.c_contiguous:
        return offs
    if offs.size and int(offs.max()) >= 2**31:
        raise ValueError("a layer's input is larger than 2**31 floats per image chunk; the compiled kernels "
                         "cannot index it - run this model with kernel='dense'")
    return np.ascontiguousarray(offs, dtype=np.int32)
