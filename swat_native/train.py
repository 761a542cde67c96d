"""Bindings of the training-only loops (``csrc/train_*.c``): SWAT's weight gradient from the
compact sparse activation (values + packed bitmask), with the dW tile in registers; the
sparse-weight conv for "same"-size stride-1 convs that reads NCHW directly (no packed copy,
``csrc/train_conv_f32.c``).

Kept apart from ``swat_native/__init__.py`` (the inference core) so the two evolve separately;
it uses the same library, ISA choice (``SWAT_ISA``) and numba-calls-ctypes pattern.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np

from . import _lib

__all__ = ["wgrad_block", "plane_starts", "wgrad_loop", "to_nhwc", "wgrad_s1_supported", "to_nhwc_padded",
           "wgrad_s1_loop", "wgrad_s2_supported", "wgrad_s2_loop", "tconv_supported", "tconv_csr", "tconv_phases",
           "tconv_cstride", "tconv_restride",
           "tconv_unphase", "tconv_loop"]


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


@functools.lru_cache(maxsize=1)
def _s1_fns() -> tuple[Any, Any, Any, Any, Any]:
    cdll = _lib().cdll
    u64, i64 = ctypes.c_uint64, ctypes.c_int64
    sup = cdll.swat_wgrad_s1_supported
    sup.argtypes = [i64, i64, i64, i64]
    sup.restype = ctypes.c_int
    loop = cdll.swat_wgrad_s1_f32
    loop.argtypes = [i64, u64, u64, u64, u64, u64] + [i64] * 17
    loop.restype = ctypes.c_int
    pad = cdll.swat_nchw_to_nhwc_pad_f32
    pad.argtypes = [i64, u64, u64] + [i64] * 9
    pad.restype = None
    sup2 = cdll.swat_wgrad_s2_supported
    sup2.argtypes = [i64] * 5
    sup2.restype = ctypes.c_int
    loop2 = cdll.swat_wgrad_s2_f32
    loop2.argtypes = [i64, u64, u64, u64, u64, u64] + [i64] * 15
    loop2.restype = ctypes.c_int
    return sup, loop, pad, sup2, loop2


def wgrad_s1_supported(isa_code: int, kh: int, kw: int, o: int, plane: int) -> bool:
    """Whether the stride-1 weight-gradient loop (padded gradient, no branch per kept entry)
    covers this (ISA, kernel, output channels, input H * W)."""
    return plane <= 4096 and bool(_s1_fns()[0](isa_code, kh, kw, o))


def wgrad_s2_supported(isa_code: int, kh: int, kw: int, o: int, plane: int) -> bool:
    """Whether the stride-2 weight-gradient loop (parity classes, padded gradient) covers this
    (ISA, kernel, output channels, input H * W)."""
    return bool(_s1_fns()[3](isa_code, kh, kw, o, plane))


def to_nhwc_padded(isa_code: int, x: np.ndarray, top: int, left: int, hp: int, wp: int, parts: int = 1) -> np.ndarray:
    """A C-contiguous float32 (N, C, H, W) array as a new zero-padded (N, hp, wp, C) one, pixel
    (y, x) at (y + top, x + left); ``parts`` > 1 splits the images over that many threads."""
    n, c, h, w = x.shape
    out = np.empty((n, hp, wp, c), np.float32)
    if parts > 1 and n > 1:
        _image_loops()[0](isa_code, x, out, c, h, w, hp, wp, top, left, n, min(parts, n))
    else:
        _s1_fns()[2](isa_code, x.ctypes.data, out.ctypes.data, c, h, w, hp, wp, top, left, 0, n)
    return out


@functools.lru_cache(maxsize=1)
def _image_loops() -> tuple[Any, ...]:
    """The per-image data movement above, split over threads (numba prange, as the kernels):
    single-threaded, these copies had become a third of a 2-thread weight gradient."""
    from numba import njit, prange

    pad = _s1_fns()[2]
    phases, unphase, restride = _tconv_fns()[3], _tconv_fns()[4], _tconv_fns()[6]

    @njit(cache=False, parallel=True)
    def pad_par(code, x, out, c, h, w, hp, wp, top, left, n, parts):  # noqa: ANN001, ANN202
        for p in prange(parts):
            pad(code, x.ctypes.data, out.ctypes.data, c, h, w, hp, wp, top, left, n * p // parts, n * (p + 1) // parts)

    @njit(cache=False, parallel=True)
    def move_par(fn_id, src, dst, c, h, w, sh, sw, ho, wo, n, parts, cs):  # noqa: ANN001, ANN202
        for p in prange(parts):
            if fn_id == 0:
                phases(src.ctypes.data, dst.ctypes.data, c, h, w, sh, sw, ho, wo, cs, n * p // parts,
                       n * (p + 1) // parts)
            elif fn_id == 2:
                restride(src.ctypes.data, dst.ctypes.data, c, h * w, cs, n * p // parts, n * (p + 1) // parts)
            else:
                unphase(src.ctypes.data, dst.ctypes.data, c, h, w, sh, sw, ho, wo, n * p // parts,
                        n * (p + 1) // parts)

    return pad_par, move_par


def wgrad_s1_loop(par: bool, by_images: bool = False) -> Any:
    """numba loop (code, bits, vals, starts, gpad, dwt, n, c, h, w, o, kh, kw, pt, pl, dh, dw, hp, wp,
    top, left, items, parts) calling the stride-1 C loop on `parts` equal item ranges, or with
    `by_images` on `parts` image ranges (see :func:`split_by_images`)."""
    return _s1_loops()[4 if par and by_images else 1 if par else 0]


def wgrad_s2_loop(par: bool, by_images: bool = False) -> Any:
    """numba loop (code, bits, vals, starts, gpad, dwt, n, c, h, w, o, kh, kw, pt, pl, hp, wp, top, left,
    items, parts) calling the stride-2 C loop on `parts` equal item ranges (or image ranges)."""
    return _s1_loops()[5 if par and by_images else 3 if par else 2]


def split_by_images(n: int, c: int, plane: int, parts: int) -> bool:
    """Whether the padded-gradient weight-gradient loops should split images, not channels, over
    threads. Split by channels, every thread streams the whole batch's gradient (4.7 MB for a
    16-channel 32x32 batch of 64) once per channel group, from L3: two threads halved each
    other's bandwidth and the loop ran only 1.2x faster on two. Split by images, each thread
    reads its own images once into a private dW (at most C * 9 * O floats), summed after.
    Needs every image's bitmask to start on a byte (C * H * W a multiple of 8)."""
    return parts > 1 and n >= parts and (c * plane) % 8 == 0


@functools.lru_cache(maxsize=1)
def _s1_loops() -> tuple[Any, ...]:
    from numba import njit, prange

    fn = _s1_fns()[1]

    @njit(cache=False)
    def serial(code, bits, vals, starts, g, dwt, n, c, h, w, o, kh, kw, pt, pl, dh, dw, hp, wp, top, left,  # noqa: ANN001, ANN202
               items, parts):
        return fn(code, bits.ctypes.data, vals.ctypes.data, starts.ctypes.data, g.ctypes.data, dwt.ctypes.data,
                  n, c, h, w, o, kh, kw, pt, pl, dh, dw, hp, wp, top, left, 0, items)

    @njit(cache=False, parallel=True)
    def parallel(code, bits, vals, starts, g, dwt, n, c, h, w, o, kh, kw, pt, pl, dh, dw, hp, wp, top, left,  # noqa: ANN001, ANN202
                 items, parts):
        rc = np.zeros(parts, np.int32)
        for p in prange(parts):
            rc[p] = fn(code, bits.ctypes.data, vals.ctypes.data, starts.ctypes.data, g.ctypes.data, dwt.ctypes.data,
                       n, c, h, w, o, kh, kw, pt, pl, dh, dw, hp, wp, top, left, items * p // parts,
                       items * (p + 1) // parts)
        return rc.min()

    @njit(cache=False, inline="always")
    def image_part(p, parts, n, c, plane, g_img, bits, starts, g, dwt, acc):  # noqa: ANN001, ANN202
        # part p's images: pointers to their bitmask, value starts and gradient, its own dW
        b0, b1 = n * p // parts, n * (p + 1) // parts
        dst = dwt.ctypes.data if p == 0 else acc[p - 1].ctypes.data
        return (bits.ctypes.data + b0 * (c * plane // 8), starts.ctypes.data + 8 * b0 * c,
                g.ctypes.data + 4 * b0 * g_img, dst, b1 - b0)

    @njit(cache=False)
    def fold(dwt, acc, rc):  # noqa: ANN001, ANN202
        for q in range(acc.shape[0]):
            dwt += acc[q]
        return rc.min()

    @njit(cache=False, parallel=True)
    def by_images(code, bits, vals, starts, g, dwt, n, c, h, w, o, kh, kw, pt, pl, dh, dw, hp, wp, top, left,  # noqa: ANN001, ANN202
                  items, parts):
        acc, rc = np.zeros((parts - 1, dwt.size), np.float32), np.zeros(parts, np.int32)
        for p in prange(parts):
            bp, sp, gp, dst, nb = image_part(p, parts, n, c, h * w, hp * wp * o, bits, starts, g, dwt, acc)
            rc[p] = fn(code, bp, vals.ctypes.data, sp, gp, dst, nb, c, h, w, o, kh, kw, pt, pl, dh, dw, hp, wp,
                       top, left, 0, items)
        return fold(dwt, acc, rc)

    fn2 = _s1_fns()[4]

    @njit(cache=False)
    def serial2(code, bits, vals, starts, g, dwt, n, c, h, w, o, kh, kw, pt, pl, hp, wp, top, left,  # noqa: ANN001, ANN202
                items, parts):
        return fn2(code, bits.ctypes.data, vals.ctypes.data, starts.ctypes.data, g.ctypes.data, dwt.ctypes.data,
                   n, c, h, w, o, kh, kw, pt, pl, hp, wp, top, left, 0, items)

    @njit(cache=False, parallel=True)
    def parallel2(code, bits, vals, starts, g, dwt, n, c, h, w, o, kh, kw, pt, pl, hp, wp, top, left,  # noqa: ANN001, ANN202
                  items, parts):
        rc = np.zeros(parts, np.int32)
        for p in prange(parts):
            rc[p] = fn2(code, bits.ctypes.data, vals.ctypes.data, starts.ctypes.data, g.ctypes.data,
                        dwt.ctypes.data, n, c, h, w, o, kh, kw, pt, pl, hp, wp, top, left, items * p // parts,
                        items * (p + 1) // parts)
        return rc.min()

    @njit(cache=False, parallel=True)
    def by_images2(code, bits, vals, starts, g, dwt, n, c, h, w, o, kh, kw, pt, pl, hp, wp, top, left,  # noqa: ANN001, ANN202
                   items, parts):
        acc, rc = np.zeros((parts - 1, dwt.size), np.float32), np.zeros(parts, np.int32)
        for p in prange(parts):
            bp, sp, gp, dst, nb = image_part(p, parts, n, c, h * w, hp * wp * o, bits, starts, g, dwt, acc)
            rc[p] = fn2(code, bp, vals.ctypes.data, sp, gp, dst, nb, c, h, w, o, kh, kw, pt, pl, hp, wp, top, left,
                        0, items)
        return fold(dwt, acc, rc)

    return serial, parallel, serial2, parallel2, by_images, by_images2


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


@functools.lru_cache(maxsize=1)
def _tconv_fns() -> tuple[Any, ...]:
    cdll = _lib().cdll
    u64, i64 = ctypes.c_uint64, ctypes.c_int64
    csr = cdll.swat_tconv_csr
    csr.argtypes = [u64, i64, i64, i64, i64, i64, u64, u64, u64, u64, i64]
    csr.restype = i64
    sup = cdll.swat_tconv_supported
    sup.argtypes = [i64, i64, i64]
    sup.restype = ctypes.c_int
    conv = cdll.swat_tconv_f32
    conv.argtypes = [i64, u64, u64, u64, u64, u64, i64, u64, u64, i64, i64, i64, i64, i64, i64, i64]
    conv.restype = ctypes.c_int
    phases = cdll.swat_tconv_phases_f32
    phases.argtypes = [u64, u64] + [i64] * 10
    phases.restype = None
    unphase = cdll.swat_tconv_unphase_f32
    unphase.argtypes = [u64, u64] + [i64] * 9
    unphase.restype = None
    cstride = cdll.swat_tconv_cstride
    cstride.argtypes = [i64]
    cstride.restype = i64
    restride = cdll.swat_tconv_restride_f32
    restride.argtypes = [u64, u64] + [i64] * 5
    restride.restype = None
    return csr, sup, conv, phases, unphase, cstride, restride


def tconv_supported(isa_code: int, block: int, plane: int) -> bool:
    """Whether the direct conv kernel has a loop for (ISA, block height, output H * W)."""
    return bool(_tconv_fns()[1](isa_code, block, plane))


def tconv_csr(w2: np.ndarray, block: int, kk: int, cstride: int, dtab: np.ndarray, indptr: np.ndarray,
              offs: np.ndarray, vals: np.ndarray, groups: int = 1) -> int:
    """Tap-major block CSR of the C-contiguous float32 (O, Cg * kk) weight into the given buffers
    (indptr O / block * kk + 1, offs O * Cg * kk / block, vals O * Cg * kk); returns nnz. With
    ``groups`` > 1 (``block`` dividing O / groups) the offsets of group g's rows start at input
    channel g * Cg: the same direct kernel then runs grouped and depthwise convs."""
    o, k = w2.shape
    if groups < 1 or o % groups or (o // groups) % block:
        raise ValueError(f"tconv_csr: {o} output channels do not split into {groups} groups of blocks of {block}")
    return int(_tconv_fns()[0](w2.ctypes.data, o // block, block, k, kk, cstride, dtab.ctypes.data,
                               indptr.ctypes.data, offs.ctypes.data, vals.ctypes.data, groups))


def tconv_cstride(floats: int) -> int:
    """Floats per input channel the direct kernel should read for channels of ``floats`` floats:
    one cache line more where the plain stride would put every channel in the same L1 sets."""
    return int(_tconv_fns()[5](floats))


def _out(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """``out`` (a float32 scratch of at least prod(shape) floats; reused: no fresh pages to
    fault in per call) viewed as ``shape``, or a new array."""
    size = int(np.prod(shape))
    if out is None:
        return np.empty(shape, np.float32)
    if out.dtype != np.float32 or out.size < size or not out.flags.c_contiguous:
        raise ValueError(f"scratch of {out.size} {out.dtype} for {size} float32")
    return out.reshape(-1)[:size].reshape(shape)


def tconv_phases(x: np.ndarray, sh: int, sw: int, ho: int, wo: int, parts: int = 1, cs: int = 0,
                 out: np.ndarray | None = None) -> np.ndarray:
    """The stride phases of the C-contiguous float32 (N, C, H, W) x: (N, C, sh, sw, ho, wo), or with
    ``cs`` > sh * sw * ho * wo an (N, C, cs) array whose first sh * sw * ho * wo floats per channel
    hold them (the rest unwritten: the kernel never reads them); written into ``out`` if given."""
    n, c, h, w = x.shape
    size = sh * sw * ho * wo
    cs = cs or size
    if cs < size:
        raise ValueError(f"tconv_phases: channel stride {cs} < {size} floats of phases")
    out = _out(out, (n, c, sh, sw, ho, wo) if cs == size else (n, c, cs))
    if parts > 1 and n > 1:
        _image_loops()[1](0, x, out, c, h, w, sh, sw, ho, wo, n, min(parts, n), cs)
    else:
        _tconv_fns()[3](x.ctypes.data, out.ctypes.data, c, h, w, sh, sw, ho, wo, cs, 0, n)
    return out


def tconv_restride(x: np.ndarray, cs: int, parts: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """The C-contiguous float32 (N, C, H, W) x as an (N, C, cs) array, each plane's H * W floats
    first (the rest unwritten), for the direct kernel's channel stride (:func:`tconv_cstride`);
    written into ``out`` if given."""
    n, c, h, w = x.shape
    if cs < h * w:
        raise ValueError(f"tconv_restride: channel stride {cs} < plane of {h * w} floats")
    out = _out(out, (n, c, cs))
    if parts > 1 and n > 1:
        _image_loops()[1](2, x, out, c, h, w, 1, 1, h, w, n, min(parts, n), cs)
    else:
        _tconv_fns()[6](x.ctypes.data, out.ctypes.data, c, h * w, cs, 0, n)
    return out


def tconv_unphase(ph: np.ndarray, out: np.ndarray, parts: int = 1) -> None:
    """Write the (N, C, sh, sw, ho, wo) stride phases ``ph`` into the C-contiguous (N, C, H, W) ``out``."""
    n, c, sh, sw, ho, wo = ph.shape
    if parts > 1 and n > 1:
        _image_loops()[1](1, ph, out, c, out.shape[2], out.shape[3], sh, sw, ho, wo, n, min(parts, n), 0)
    else:
        _tconv_fns()[4](ph.ctypes.data, out.ctypes.data, c, out.shape[2], out.shape[3], sh, sw, ho, wo, 0, n)


def tconv_loop(par: bool) -> Any:
    """numba loop (code, indptr, offs, vals, bias_ptr, masks, kk, x, y, xs, o, plane, yr, block, n, parts)
    running the direct conv on `parts` equal image ranges (output plane r of image b at
    y + (b * o + r) * yr floats); returns the lowest status (0 ok)."""
    return _tconv_loops()[1 if par else 0]


@functools.lru_cache(maxsize=1)
def _tconv_loops() -> tuple[Any, Any]:
    from numba import njit, prange

    fn = _tconv_fns()[2]

    @njit(cache=False)
    def serial(code, indptr, offs, vals, bias, masks, kk, x, y, xs, o, plane, yr, block, n, parts):  # noqa: ANN001, ANN202
        return fn(code, indptr.ctypes.data, offs.ctypes.data, vals.ctypes.data, bias, masks.ctypes.data, kk,
                  x.ctypes.data, y, xs, o, plane, yr, block, 0, n)

    @njit(cache=False, parallel=True)
    def parallel(code, indptr, offs, vals, bias, masks, kk, x, y, xs, o, plane, yr, block, n, parts):  # noqa: ANN001, ANN202
        rc = np.zeros(parts, np.int32)
        for p in prange(parts):
            rc[p] = fn(code, indptr.ctypes.data, offs.ctypes.data, vals.ctypes.data, bias, masks.ctypes.data, kk,
                       x.ctypes.data, y, xs, o, plane, yr, block, n * p // parts, n * (p + 1) // parts)
        return rc.min()

    return serial, parallel


def direct_tables(kh: int, kw: int, stride: tuple[int, int], pad: tuple[int, int], dilation: tuple[int, int],
                  h: int, w: int, h_out: int, w_out: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(lane masks (ceil(P / 16), kh * kw) uint16, per-tap shifts (kh * kw,) int32) of the direct
    conv kernel for an h x w input, or None when a tap's source pixel leaves its stride phase
    plane (the kernel does not apply). Tap (i, j) of output pixel q reads phase (ry, rx) at q + shift."""
    (sh, sw), (pt, pl), (dh, dw) = stride, pad, dilation
    plane = h_out * w_out
    ti = np.repeat(np.arange(kh), kw)
    tj = np.tile(np.arange(kw), kh)
    ry, rx = (ti * dh - pt) % sh, (tj * dw - pl) % sw  # the tap's phase
    dy, dx = (ti * dh - pt - ry) // sh, (tj * dw - pl - rx) // sw  # its shift inside the phase plane
    q = np.arange(plane)
    u = (q // w_out)[:, None] + dy[None, :]
    v = (q % w_out)[:, None] + dx[None, :]
    inside = (u * sh + ry >= 0) & (u * sh + ry < h) & (v * sw + rx >= 0) & (v * sw + rx < w)
    on_plane = (u >= 0) & (u < h_out) & (v >= 0) & (v < w_out)
    if bool((inside & ~on_plane).any()):
        return None
    vecs = -(-plane // 16)  # lanes past P stay clear (the plane's last vector may be partial)
    full = np.zeros((vecs * 16, kh * kw), bool)
    full[:plane] = inside
    lanes = full.reshape(vecs, 16, kh * kw).astype(np.uint32) << np.arange(16, dtype=np.uint32)[None, :, None]
    masks = np.ascontiguousarray(lanes.sum(1), dtype=np.uint16)
    return masks, np.ascontiguousarray((ry * sw + rx) * plane + dy * w_out + dx, dtype=np.int32)
