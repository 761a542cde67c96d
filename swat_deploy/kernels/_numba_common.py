"""numba loops shared by the CSR kernels (packing, the CSR row loop, unpacking).

Every loop exists twice: a serial build and a ``parallel=True`` build over the same body.
The serial one is used when one thread is asked for, because entering a parallel region
costs a few microseconds - a visible share of a batch-1 layer on a 4x4 feature map.

Compilation happens on first use of each signature (~1-3 s per loop, once per machine:
``cache=True`` stores the machine code next to this file or in NUMBA_CACHE_DIR); kernels call
`warm_up` at prepare time so that cost never lands in a timed call.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import numba
import numpy as np
import torch
from numba import njit, prange

from swat_deploy.threads import numba_threads, thread_scope
from ._simd import LANES, vadd, vfma, vload, vrelu, vsplat, vstore

_workspace = threading.local()


def workspace(slot: int, size: int) -> np.ndarray:
    """A float32 scratch array of `size` reused across calls on this thread (contents undefined).

    Fresh large numpy arrays page-fault on first touch; at batch 64 that was ~20 % of a layer.
    Ops on one thread run one after another, so one buffer per slot and thread is enough; it
    only grows, to the largest layer seen.
    """
    bufs = getattr(_workspace, "bufs", None)
    if bufs is None:
        bufs = _workspace.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.size < size:
        buf = bufs[slot] = _aligned(max(size, 1024), np.empty)
    return buf[:size]


def _aligned(size: int, alloc: Any) -> np.ndarray:
    """A float32 array whose first element sits on a 64-byte cache line.

    numpy only promises 16 bytes; the 16-float row tiles then straddle cache lines or not by
    chance, which made whole-model times differ by up to 25 % between processes.
    """
    raw = alloc(size + 16, np.float32)
    skip = (-raw.ctypes.data % 64) // 4
    return raw[skip:skip + size]


def zeroed_workspace(key: object, size: int) -> np.ndarray:
    """A float32 array of `size` owned by `key` on this thread, zero when first made.

    For zero-padded inputs: a caller that only ever writes the interior gets padding that
    stays zero, so each call copies the data and never clears or re-pads the borders.
    """
    bufs = getattr(_workspace, "zeroed", None)
    if bufs is None:
        bufs = _workspace.zeroed = {}
    buf = bufs.get(key)
    if buf is None or buf.size != size:
        if len(bufs) >= 256:  # many layers x shapes: start over rather than grow without bound
            bufs.clear()
        buf = bufs[key] = _aligned(size, np.zeros)
    return buf


def _start_pool() -> None:
    """Start numba's thread pool now, keeping torch's thread count.

    With numba's OpenMP threading layer the pool shares the OpenMP runtime with torch, and
    starting it (the first numba.get_num_threads() does) sets OpenMP's thread count to numba's:
    torch.set_num_threads(1) silently became 2 after the first sparse op."""
    t = torch.get_num_threads()
    numba.get_num_threads()
    if torch.get_num_threads() != t:
        torch.set_num_threads(t)


_start_pool()


# Below this many multiply-adds (~10 us on one core) a call runs serially: entering a
# parallel region costs ~2 us on an idle machine. Measured on an idle 2-core box, the CSR row
# loop of a batch-1 64x64x3x3 conv at 95 % sparsity (2 M multiply-adds) went from 78 us to
# 43 us with two threads. On a loaded box a parallel region can stall for a timeslice (a
# 0.3 ms layer took 26-60 ms as its median at load 4-8); that is not decided here: the
# Session times whole runs with all threads and with one (`Session.plans`) and keeps the
# faster, and the per-layer autotuner times a serial candidate too.
PARALLEL_MIN_WORK = 250_000


def parallel(work: int) -> bool:
    """Use the parallel builds when more than one numba thread is active and `work` is worth it."""
    from .base import serial_call

    return work >= PARALLEL_MIN_WORK and not serial_call() and numba_threads() > 1


def warm_up(prepared: Callable[[torch.Tensor], torch.Tensor], input_shape: tuple[int, ...]) -> None:
    """One call on zeros of `input_shape`: compiles (or loads from cache) every loop it needs
    in both serial and parallel form and fills the kernel's per-shape geometry cache."""
    x = torch.zeros(input_shape, dtype=torch.float32)
    # numba's OpenMP threading layer shares the OpenMP runtime with torch: starting or resizing
    # its pool sets the process's OpenMP thread count, which torch then reports and uses (a
    # user's torch.set_num_threads(1) silently became 2). Restore torch's count afterwards.
    torch_threads = torch.get_num_threads()
    try:
        prepared(x)
        if numba.config.NUMBA_NUM_THREADS > 1:
            with thread_scope(2 if numba_threads() == 1 else 1, torch_threads=False):
                prepared(x)
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


# ------------------------------------------------------------------ CSR x shifted rows
@njit(cache=True, inline="always")
def _shift_row(t, indptr, offs, vals, bias, packed, chunk_in, out, run):  # noqa: ANN001, ANN202
    # Output row t = (chunk b, channel o) is run floats (a multiple of 16); tiles of 64, 32
    # and 16 floats live in vector registers across the whole non-zero loop. Short tiles
    # split the non-zeros over two accumulator sets to hide the FMA latency.
    n_out = indptr.shape[0] - 1
    b = t // n_out
    o = t - b * n_out
    ob = t * run
    xb = b * chunk_in
    s = indptr[o]
    e = indptr[o + 1]
    bv = vsplat(bias[o])
    z = vsplat(0.0)
    t0 = 0
    while t0 + 4 * LANES <= run:
        a0 = bv
        a1 = bv
        a2 = bv
        a3 = bv
        for k in range(s, e):
            w = vsplat(vals[k])
            p = xb + offs[k] + t0
            a0 = vfma(a0, w, vload(packed, p))
            a1 = vfma(a1, w, vload(packed, p + LANES))
            a2 = vfma(a2, w, vload(packed, p + 2 * LANES))
            a3 = vfma(a3, w, vload(packed, p + 3 * LANES))
        vstore(out, ob + t0, a0)
        vstore(out, ob + t0 + LANES, a1)
        vstore(out, ob + t0 + 2 * LANES, a2)
        vstore(out, ob + t0 + 3 * LANES, a3)
        t0 += 4 * LANES
    if t0 + 2 * LANES <= run:
        a0 = bv
        a1 = bv
        c0 = z
        c1 = z
        k = s
        while k + 1 < e:
            w = vsplat(vals[k])
            p = xb + offs[k] + t0
            w2 = vsplat(vals[k + 1])
            p2 = xb + offs[k + 1] + t0
            a0 = vfma(a0, w, vload(packed, p))
            a1 = vfma(a1, w, vload(packed, p + LANES))
            c0 = vfma(c0, w2, vload(packed, p2))
            c1 = vfma(c1, w2, vload(packed, p2 + LANES))
            k += 2
        if k < e:
            w = vsplat(vals[k])
            p = xb + offs[k] + t0
            a0 = vfma(a0, w, vload(packed, p))
            a1 = vfma(a1, w, vload(packed, p + LANES))
        vstore(out, ob + t0, vadd(a0, c0))
        vstore(out, ob + t0 + LANES, vadd(a1, c1))
        t0 += 2 * LANES
    if t0 + LANES <= run:
        a0 = bv
        c0 = z
        k = s
        while k + 1 < e:
            a0 = vfma(a0, vsplat(vals[k]), vload(packed, xb + offs[k] + t0))
            c0 = vfma(c0, vsplat(vals[k + 1]), vload(packed, xb + offs[k + 1] + t0))
            k += 2
        if k < e:
            a0 = vfma(a0, vsplat(vals[k]), vload(packed, xb + offs[k] + t0))
        vstore(out, ob + t0, vadd(a0, c0))

@njit(cache=True)
def _shift_rows_serial(indptr, offs, vals, bias, packed, chunk_in, out, run, nb):  # noqa: ANN001, ANN202
    for t in range(nb * (indptr.shape[0] - 1)):
        _shift_row(t, indptr, offs, vals, bias, packed, chunk_in, out, run)

@njit(cache=True, parallel=True)
def _shift_rows_parallel(indptr, offs, vals, bias, packed, chunk_in, out, run, nb):  # noqa: ANN001, ANN202
    for t in prange(nb * (indptr.shape[0] - 1)):
        _shift_row(t, indptr, offs, vals, bias, packed, chunk_in, out, run)

# ------------------------------------------------------------------ CSR x vector (batch 1)
# Four partial sums break the FMA dependency chain (measured 1.7x over one sum; letting
# LLVM reassociate instead made it vectorise with gathers, which was slower still).
@njit(cache=True, fastmath={"contract"}, inline="always")
def _dot_row(o, indptr, cols, vals, bias, x, y):  # noqa: ANN001, ANN202
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    k = indptr[o]
    e = indptr[o + 1]
    while k + 3 < e:
        a0 += vals[k] * x[cols[k]]
        a1 += vals[k + 1] * x[cols[k + 1]]
        a2 += vals[k + 2] * x[cols[k + 2]]
        a3 += vals[k + 3] * x[cols[k + 3]]
        k += 4
    while k < e:
        a0 += vals[k] * x[cols[k]]
        k += 1
    y[o] = ((a0 + a1) + (a2 + a3)) + bias[o]

@njit(cache=True)
def _csr_dot_serial(indptr, cols, vals, bias, x, y):  # noqa: ANN001, ANN202
    for o in range(indptr.shape[0] - 1):
        _dot_row(o, indptr, cols, vals, bias, x, y)

@njit(cache=True, parallel=True)
def _csr_dot_parallel(indptr, cols, vals, bias, x, y):  # noqa: ANN001, ANN202
    for o in prange(indptr.shape[0] - 1):
        _dot_row(o, indptr, cols, vals, bias, x, y)

# ------------------------------------------------------------------ (N, I) -> (I, Np)
@njit(cache=True, inline="always")
def _transpose_one(i, x, xt, pitch):  # noqa: ANN001, ANN202
    n = x.shape[0]
    row = xt[i * pitch:(i + 1) * pitch]
    for j in range(n):
        row[j] = x[j, i]
    row[n:] = 0.0

@njit(cache=True)
def _transpose_serial(x, xt, pitch):  # noqa: ANN001, ANN202
    for i in range(x.shape[1]):
        _transpose_one(i, x, xt, pitch)

@njit(cache=True, parallel=True)
def _transpose_parallel(x, xt, pitch):  # noqa: ANN001, ANN202
    for i in prange(x.shape[1]):
        _transpose_one(i, x, xt, pitch)

# ------------------------------------------------------------------ packing
@njit(cache=True, inline="always")
def _pack_one(t, x, packed, nchunk, sh, sw, pt, pl, hq, wq, chunk_in):  # noqa: ANN001, ANN202
    # Fills every float of the stride phases of input channel c in chunk b (data or 0),
    # so the buffer can be reused between calls without clearing it first.
    n, c_in, h, w = x.shape
    phase_sz = hq * wq * nchunk
    row_len = wq * nchunk
    b = t // c_in
    c = t - b * c_in
    for ri in range(sh):
        for rj in range(sw):
            # phase columns v whose input column v*sw + rj - pl lies inside [0, w)
            v_lo = min(wq, max(0, (pl - rj + sw - 1) // sw))
            v_hi = max(v_lo, min(wq, (w + pl - rj + sw - 1) // sw))
            col0 = v_lo * sw + rj - pl
            for u in range(hq):
                start = b * chunk_in + ((c * sh + ri) * sw + rj) * phase_sz + u * row_len
                drow = packed[start:start + row_len]
                hrow = u * sh + ri - pt
                if hrow < 0 or hrow >= h:
                    drow[:] = 0.0
                    continue
                drow[:v_lo * nchunk] = 0.0
                drow[v_hi * nchunk:] = 0.0
                if nchunk == 1:
                    src = x[b, c, hrow, col0:]
                    dst = drow[v_lo:v_hi]
                    if sw == 1:
                        dst[:] = src[:v_hi - v_lo]
                    else:
                        for m in range(v_hi - v_lo):
                            dst[m] = src[m * sw]
                else:
                    for m in range(v_hi - v_lo):
                        col = col0 + m * sw
                        dst = drow[(v_lo + m) * nchunk:(v_lo + m + 1) * nchunk]
                        for nn in range(nchunk):
                            img = b * nchunk + nn
                            dst[nn] = x[img, c, hrow, col] if img < n else 0.0

# ------------------------------------------------------------------ copy into a padded buffer
@njit(cache=True, inline="always")
def _pad_interior_one(t, x, buf, pt, pl, hq, wq):  # noqa: ANN001, ANN202
    # Plane t = (image, channel) of x into rows pt.. / columns pl.. of plane t of buf.
    h = x.shape[2]
    w = x.shape[3]
    src = x.reshape(-1)
    for i in range(h):
        s0 = (t * h + i) * w
        d0 = (t * hq + pt + i) * wq + pl
        j = 0
        while j + LANES <= w:
            vstore(buf, d0 + j, vload(src, s0 + j))
            j += LANES
        for k in range(j, w):
            buf[d0 + k] = src[s0 + k]

@njit(cache=True)
def _pad_interior_serial(x, buf, pt, pl, hq, wq):  # noqa: ANN001, ANN202
    for t in range(x.shape[0] * x.shape[1]):
        _pad_interior_one(t, x, buf, pt, pl, hq, wq)

@njit(cache=True, parallel=True)
def _pad_interior_parallel(x, buf, pt, pl, hq, wq):  # noqa: ANN001, ANN202
    for t in prange(x.shape[0] * x.shape[1]):
        _pad_interior_one(t, x, buf, pt, pl, hq, wq)

@njit(cache=True)
def _pack_serial(x, packed, nchunk, sh, sw, pt, pl, hq, wq, chunk_in):  # noqa: ANN001, ANN202
    nb = (x.shape[0] + nchunk - 1) // nchunk
    for t in range(nb * x.shape[1]):
        _pack_one(t, x, packed, nchunk, sh, sw, pt, pl, hq, wq, chunk_in)

@njit(cache=True, parallel=True)
def _pack_parallel(x, packed, nchunk, sh, sw, pt, pl, hq, wq, chunk_in):  # noqa: ANN001, ANN202
    nb = (x.shape[0] + nchunk - 1) // nchunk
    for t in prange(nb * x.shape[1]):
        _pack_one(t, x, packed, nchunk, sh, sw, pt, pl, hq, wq, chunk_in)

# ------------------------------------------------------------------ im2col packing
@njit(cache=True, inline="always")
def _im2col_one(t, x, packed, nchunk, kh, kw, sh, sw, dh, dw, pt, pl, h_out, w_out, run):  # noqa: ANN001, ANN202
    # Channel c of chunk b -> kh*kw rows of `run` floats: row (c, i, j) holds the input
    # samples tap (i, j) multiplies, (h_out, w_out, Nc) with images innermost; 0 outside.
    n, c_in, h, w = x.shape
    b = t // c_in
    c = t - b * c_in
    for i in range(kh):
        for j in range(kw):
            base = (b * c_in * kh * kw + (c * kh + i) * kw + j) * run
            row = packed[base:base + run]
            row[:] = 0.0
            for oh in range(h_out):
                hh = oh * sh + i * dh - pt
                if hh < 0 or hh >= h:
                    continue
                for ow in range(w_out):
                    ww = ow * sw + j * dw - pl
                    if ww < 0 or ww >= w:
                        continue
                    p = (oh * w_out + ow) * nchunk
                    for nn in range(nchunk):
                        img = b * nchunk + nn
                        if img < n:
                            row[p + nn] = x[img, c, hh, ww]

@njit(cache=True)
def _im2col_serial(x, packed, nchunk, kh, kw, sh, sw, dh, dw, pt, pl, h_out, w_out, run):  # noqa: ANN001, ANN202
    nb = (x.shape[0] + nchunk - 1) // nchunk
    for t in range(nb * x.shape[1]):
        _im2col_one(t, x, packed, nchunk, kh, kw, sh, sw, dh, dw, pt, pl, h_out, w_out, run)

@njit(cache=True, parallel=True)
def _im2col_parallel(x, packed, nchunk, kh, kw, sh, sw, dh, dw, pt, pl, h_out, w_out, run):  # noqa: ANN001, ANN202
    nb = (x.shape[0] + nchunk - 1) // nchunk
    for t in prange(nb * x.shape[1]):
        _im2col_one(t, x, packed, nchunk, kh, kw, sh, sw, dh, dw, pt, pl, h_out, w_out, run)

# ------------------------------------------------------------------ unpacking, Nc = 1
# Unpacking is also the conv's epilogue: `mode` bit 1 adds `res` (same layout as y: a
# fused residual Add), bit 2 applies ReLU, so the result is written once and the graph
# runs no separate Add / Relu op over it. With mode 0, `res` is unused (pass y).
@njit(cache=True, inline="always")
def _unpack1_one(t, out, y, h_out, w_out, wq, run, res, mode):  # noqa: ANN001, ANN202
    # Row t = (image, channel): h_out rows of pitch wq -> w_out floats each, vector copies.
    add = (mode & 1) != 0
    relu = (mode & 2) != 0
    for oh in range(h_out):
        src = t * run + oh * wq
        dst = (t * h_out + oh) * w_out
        ow = 0
        while ow + LANES <= w_out:
            v = vload(out, src + ow)
            if add:
                v = vadd(v, vload(res, dst + ow))
            if relu:
                v = vrelu(v)
            vstore(y, dst + ow, v)
            ow += LANES
        for k in range(ow, w_out):
            a = out[src + k]
            if add:
                a += res[dst + k]
            if relu and a < 0.0:
                a = np.float32(0.0)
            y[dst + k] = a

@njit(cache=True)
def _unpack1_serial(out, y, rows, h_out, w_out, wq, run, res, mode):  # noqa: ANN001, ANN202
    for t in range(rows):
        _unpack1_one(t, out, y, h_out, w_out, wq, run, res, mode)

@njit(cache=True, parallel=True)
def _unpack1_parallel(out, y, rows, h_out, w_out, wq, run, res, mode):  # noqa: ANN001, ANN202
    for t in prange(rows):
        _unpack1_one(t, out, y, h_out, w_out, wq, run, res, mode)

# ------------------------------------------------------------------ unpacking
@njit(cache=True, inline="always")
def _unpack_one(t, out, y, nchunk, wq, run, res, mode):  # noqa: ANN001, ANN202
    # Row t = (chunk b, channel o) of the (H_out, Wq, Nc) grid -> y[img, o], junk dropped.
    n, n_out, h_out, w_out = y.shape
    add = (mode & 1) != 0
    relu = (mode & 2) != 0
    b = t // n_out
    o = t - b * n_out
    for nn in range(nchunk):
        img = b * nchunk + nn
        if img >= n:
            break
        dst = y[img, o]
        r = res[img, o]
        for oh in range(h_out):
            src = t * run + oh * wq * nchunk + nn
            for ow in range(w_out):
                a = out[src + ow * nchunk]
                if add:
                    a += r[oh, ow]
                if relu and a < 0.0:
                    a = np.float32(0.0)
                dst[oh, ow] = a

@njit(cache=True)
def _unpack_serial(out, y, nchunk, wq, run, res, mode):  # noqa: ANN001, ANN202
    nb = (y.shape[0] + nchunk - 1) // nchunk
    for t in range(nb * y.shape[1]):
        _unpack_one(t, out, y, nchunk, wq, run, res, mode)

@njit(cache=True, parallel=True)
def _unpack_parallel(out, y, nchunk, wq, run, res, mode):  # noqa: ANN001, ANN202
    nb = (y.shape[0] + nchunk - 1) // nchunk
    for t in prange(nb * y.shape[1]):
        _unpack_one(t, out, y, nchunk, wq, run, res, mode)


def csr_shift_rows(par: bool) -> Any:
    """out[t*L:(t+1)*L] = bias[o] + sum_k vals[k] * packed[b*chunk_in + offs[k] : ... + L], t = b*O + o.

    L (`run`) must be a multiple of 16 and `packed` readable 16 floats past every range."""
    return _shift_rows_parallel if par else _shift_rows_serial


def pack(par: bool) -> Any:
    return _pack_parallel if par else _pack_serial


def pad_interior(par: bool) -> Any:
    """buf planes (hq x wq, flat) get x's planes at row pt / column pl; the rest is not touched."""
    return _pad_interior_parallel if par else _pad_interior_serial


def unpack(par: bool) -> Any:
    return _unpack_parallel if par else _unpack_serial


def csr_dot(par: bool) -> Any:
    """y[o] = bias[o] + sum_k vals[k] * x[cols[k]] over row o's non-zeros."""
    return _csr_dot_parallel if par else _csr_dot_serial


def transpose_pad(par: bool) -> Any:
    """xt[i*pitch + j] = x[j, i] for j < N, 0 for N <= j < pitch."""
    return _transpose_parallel if par else _transpose_serial


def im2col(par: bool) -> Any:
    """Fill `packed` with per-(channel, tap) rows of `run` floats (see `_im2col_one`)."""
    return _im2col_parallel if par else _im2col_serial


def unpack1(par: bool) -> Any:
    """y_flat[(t*h_out + oh)*w_out + ow] = out[t*run + oh*wq + ow] for every row t (one image per
    chunk), plus the residual and / or ReLU that `mode` asks for."""
    return _unpack1_parallel if par else _unpack1_serial
