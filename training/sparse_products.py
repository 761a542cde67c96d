"""SWAT's conv products on CPU through the sparse inference kernel core (:mod:`swat_native`).

Why: SWAT does less arithmetic than dense training only if the products skip the zeros.
Two of a SWAT conv's three products have a sparse operand that is a *weight*:

* forward ``y = conv(a, TopK(W))``;
* input gradient ``grad_a = conv_transpose(grad_y, TopK(W))``, which for a stride-1 conv is
  ``conv(grad_y, W_t)`` with ``W_t`` the weight with input and output channels swapped and the
  kernel flipped, padded by ``d * (k - 1) - p``: the same sparse conv again; for a strided
  conv (no dilation), one small stride-1 sparse conv per stride phase of the input grid
  (:func:`_strided_input_grad`), without inserting zeros into ``grad_y``.

Where the map allows (one group; a stride-1 conv whose output is as large as its input, or a
strided conv whose stride phases are as large as its output - ResNet's 3x3 and 1x1 layers,
CIFAR's 32x32 and Fashion-MNIST's 28x28 maps alike; AVX-512 or AVX2) both run on the *direct* kernel of
``swat_native/csrc/train_conv_f32.c`` (:func:`_direct_conv`, :func:`_direct_strided_input_grad`):
it reads the NCHW input itself (a strided conv: one copy split into stride phases) and writes
NCHW, the zero padding being lane masks. Elsewhere they run on the inference shift kernel over
a packed input (kw shifted copies, or stride phases with images innermost). At 90 % sparsity the
multiply is a fraction of a millisecond per ResNet-20 layer, and packing 3x the input had cost
more than the multiply: the direct kernel took the forward and input-gradient products from
~0.9x to ~0.4x of torch's time. Both kernels hold a block row of output channels x a tile of
vectors in registers across the row's non-zeros. The sparse form is built per call straight from
the masked weight by a compiled pass (tens of microseconds; the mask changes every step, so
there is nothing to cache), into per-thread buffers; per-shape tables (offsets, masks) are
computed once.

The third product, the weight gradient ``grad_y x TopK(a)^T``, has a sparse *activation*: see
:func:`conv_weight_grad` (loops in ``swat_native/csrc/train_wgrad_f32.c``; stride 1 and 2 read
a zero-padded NHWC copy of the output gradient, so no kept entry tests the border).

Whether the sparse path wins depends on the layer, its density and the thread count (a
3-channel first conv or a 4x4 map is faster dense), so the first call of each (product,
shapes, density bucket, threads, ISA) times both once and keeps the winner (:func:`choose`).
The choice is part of a run's numerics (the two round differently), so it is made once per
machine and kept in a cache file and in the run's checkpoint (:mod:`training.sparse_choices`):
every process, and a resumed run, applies the same one. ``SWAT_AUTOTUNE=0``: no timing, a fixed
rule decides (tests). ``SWAT_SPARSE_PRODUCTS``: unset / ``auto`` (default) the choice above,
``force`` always the sparse kernels where supported (tests), ``off`` / ``0`` dense torch
products. Non-CPU or non-float32 tensors always use torch.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from training import sparse_choices

__all__ = ["MODES", "mode", "use_mode", "enabled_for", "conv_forward", "conv_input_grad", "choose"]

MODES = ("auto", "off", "force")
_LANES = 16
_CHUNK_BYTES = 384 * 1024  # a batch chunk's packed input should stay in L2 (as the inference kernel)
_MIN_WEIGHTS = 1024  # a weight smaller than this stays dense (no timing): too little work to win
_override: Optional[str] = None


def mode() -> str:
    """The active mode: a :func:`use_mode` override, else ``SWAT_SPARSE_PRODUCTS``, else off."""
    if _override is not None:
        return _override
    v = os.environ.get("SWAT_SPARSE_PRODUCTS", "").strip().lower()
    if v in ("0", "off", "false", "no", "dense"):
        return "off"
    if v == "force":
        return "force"
    return "auto"


@contextlib.contextmanager
def use_mode(name: str) -> Iterator[None]:
    """Force ``auto`` / ``off`` / ``force`` inside the block (tests, benchmarks)."""
    global _override
    if name not in MODES:
        raise ValueError(f"unknown sparse-product mode {name!r}; choose one of: {', '.join(MODES)}")
    old, _override = _override, name
    try:
        yield
    finally:
        _override = old


@functools.lru_cache(maxsize=1)
def _native() -> object | None:
    try:
        import swat_native
    except ImportError:  # pragma: no cover
        return None
    return swat_native if swat_native.available() else None


def enabled_for(*tensors: Tensor) -> bool:
    """Whether the sparse products may run on these tensors (CPU float32, kernels built, not off)."""
    if mode() == "off" or _native() is None:
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32:
            return False
    return True


# ------------------------------------------------------------------------ choice
# A sparse product must beat dense by this much to be chosen: a near tie is not worth
# trading torch's result for another rounding.
SPARSE_MARGIN = 0.97
# Without timing (SWAT_AUTOTUNE=0): sparse at this density or lower on maps this large
# (the break-even seen on the Xeon AVX-512 at ResNet-20 sizes, scripts/bench_training.py).
RULE_MAX_DENSITY = 0.3
RULE_MIN_PLANE = 256


@functools.lru_cache(maxsize=4096)
def _key_text(key: tuple) -> str:
    """The cache-file text of a choice key (memoised: dataclasses.astuple took ~100 us a call,
    ~6 ms of a ResNet-20 step)."""
    import dataclasses

    return "|".join(str(dataclasses.astuple(p)) if dataclasses.is_dataclass(p) else str(p) for p in key)


def choose(key: tuple, sparse: Callable[[], Tensor], dense: Callable[[], Tensor], rule: bool = False) -> Tensor:
    """Run the sparse or the dense product for ``key``.

    A key seen before (in this process, the machine's cache file or the resumed run's
    checkpoint) applies that choice. Otherwise both are timed (the sparse one after one
    untimed call that compiles its loops), the choice recorded, and the *chosen* product's
    result returned - so a step computes the same whether its choice was timed or read.
    ``rule``: the choice when timing is off (``SWAT_AUTOTUNE=0``)."""
    if mode() == "force":
        return sparse()
    text = _key_text(key)
    pick = sparse_choices.lookup(text)
    if pick is None and not sparse_choices.timing_enabled():
        pick = sparse_choices.decide(text, rule)
    if pick is not None:
        return sparse() if pick else dense()
    out_s = sparse()  # warm-up: numba compilation, buffers
    out_d = dense()
    ts, td = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        out_s = sparse()
        t1 = time.perf_counter()
        out_d = dense()
        t2 = time.perf_counter()
        ts.append(t1 - t0)
        td.append(t2 - t1)
    pick = sparse_choices.decide(text, min(ts) < SPARSE_MARGIN * min(td),
                                 {"sparse": 1e6 * min(ts), "dense": 1e6 * min(td)})
    return out_s if pick else out_d


def _rule(density: float, plane: int) -> bool:
    return density <= RULE_MAX_DENSITY + 1e-9 and plane >= RULE_MIN_PLANE


def choices() -> dict[str, bool]:
    """The choices this process applied so far (key text -> sparse?), for benchmarks and reports."""
    return sparse_choices.used()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _density_bucket(d: float) -> int:
    return int(round(d * 20))


# -------------------------------------------------------------------- CSR build
@functools.lru_cache(maxsize=1)
def _builders() -> tuple:
    from numba import njit

    @njit(cache=True, nogil=True)
    def csr(w2, block, table, rows_per_group, k, indptr, vals, offs):  # noqa: ANN001, ANN202
        """Block CSR of the (R*block, k) matrix w2: a block column is kept if any of its
        `block` values is non-zero. offs[n] = table[group(row) * k + col]. Returns nnz."""
        nrows = w2.shape[0] // block
        n = 0
        indptr[0] = 0
        for r in range(nrows):
            base = (r // rows_per_group) * k
            for c in range(k):
                keep = False
                for j in range(block):
                    if w2[r * block + j, c] != 0.0:
                        keep = True
                        break
                if keep:
                    for j in range(block):
                        vals[n * block + j] = w2[r * block + j, c]
                    offs[n] = table[base + c]
                    n += 1
            indptr[r + 1] = n
        return n

    return (csr,)


_ws = threading.local()


def _buffer(slot: str, size: int, dtype: type) -> np.ndarray:
    """A per-thread scratch array of at least ``size`` (contents undefined), 64-byte aligned."""
    bufs = getattr(_ws, "bufs", None)
    if bufs is None:
        bufs = _ws.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.size < size or buf.dtype != dtype:
        item = np.dtype(dtype).itemsize
        raw = np.empty(max(size, 1024) + 64 // item, dtype)
        skip = (-raw.ctypes.data % 64) // item
        buf = bufs[slot] = raw[skip:skip + max(size, 1024)]
    return buf[:size]


@dataclass
class _Csr:
    indptr: np.ndarray
    vals: np.ndarray
    offs: np.ndarray
    block: int
    nnz: int


def _build_csr(w4: Tensor, block: int, table: np.ndarray, groups: int, tag: str) -> _Csr:
    o = w4.shape[0]
    w2 = w4.detach().reshape(o, -1).contiguous().numpy()
    k = w2.shape[1]
    rows = o // block
    indptr = _buffer(tag + "p", rows + 1, np.int32)
    vals = _buffer(tag + "v", o * k, np.float32)
    offs = _buffer(tag + "o", rows * k, np.int32)
    nnz = _builders()[0](w2, block, table, max(1, rows // groups), k, indptr, vals, offs)
    return _Csr(indptr, vals[:nnz * block], offs[:nnz], block, int(nnz))


# ---------------------------------------------------------------- conv geometry
@dataclass(frozen=True)
class _ConvSpec:
    c: int
    o: int
    kh: int
    kw: int
    groups: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


@dataclass
class _Plan:
    layout: str  # "aligned" (one image per chunk, kw shifted copies) or "phases" (images innermost)
    n: int
    nb: int
    nchunk: int
    h_out: int
    w_out: int
    hq: int
    wq: int  # row pitch of the packed input / output grid
    run: int
    chunk_in: int
    copy_size: int
    table: np.ndarray  # offset per (group, column of the (O, cg*kh*kw) weight view)


_PLANS: dict[tuple, _Plan] = {}


def _plan(spec: _ConvSpec, n: int, h: int, w: int, threads: int = 1) -> _Plan:
    key = (spec, n, h, w, threads)
    p = _PLANS.get(key)
    if p is None:
        if len(_PLANS) > 256:
            _PLANS.clear()
        p = _PLANS[key] = _make_plan(spec, n, h, w, threads)
    return p


def _make_plan(s: _ConvSpec, n: int, h: int, w: int, threads: int) -> _Plan:
    sh, sw = s.stride
    dh, dw = s.dilation
    pt, pl = s.padding
    h_out = (h + 2 * pt - dh * (s.kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pl - dw * (s.kw - 1) - 1) // sw + 1
    cg = s.c // s.groups
    col = np.arange(cg * s.kh * s.kw, dtype=np.int64)
    chan_in_group = col // (s.kh * s.kw)
    tap_i = (col // s.kw) % s.kh
    tap_j = col % s.kw
    chan = (np.arange(s.groups, dtype=np.int64)[:, None] * cg + chan_in_group[None, :])  # (groups, K)
    qi, ri = np.divmod(tap_i * dh, sh)
    if w_out % _LANES == 0:
        # one image per chunk, kw column-shifted copies with a row pitch of whole vectors: every
        # load aligned, the output written straight into NCHW (swat_native.shift_rows_into)
        pitch = w_out
        hq = (dh * (s.kh - 1)) // sh + h_out
        copy_size = s.c * sh * hq * pitch
        table = tap_j[None, :] * copy_size + ((chan * sh + ri[None, :]) * hq + qi[None, :]) * pitch
        return _Plan("aligned", n, n, 1, h_out, w_out, hq, pitch, h_out * pitch, s.kw * copy_size, copy_size,
                     _offsets(table))
    qj, rj = np.divmod(tap_j * dw, sw)
    hp, wp = h + 2 * pt, w + 2 * pl
    wq = -(-wp // sw)
    qi_max = (dh * (s.kh - 1)) // sh
    hq = max(-(-hp // sh), qi_max + h_out + 1 + -(-_LANES // wq))
    image_bytes = 4 * s.c * sh * sw * hq * wq
    nchunk = int(min(n, max(1, _CHUNK_BYTES // image_bytes)))
    nb = -(-n // nchunk)
    if threads > 1 and nb % threads:  # equal chunks per thread (each thread takes whole chunks)
        nb = -(-nb // threads) * threads
        nchunk = -(-n // nb)
        nb = -(-n // nchunk)
    phase_sz = hq * wq * nchunk
    table = ((chan * sh + ri[None, :]) * sw + rj[None, :]) * phase_sz + (qi[None, :] * wq + qj[None, :]) * nchunk
    chunk_in = s.c * sh * sw * phase_sz
    run = -(-(h_out * wq * nchunk) // _LANES) * _LANES
    return _Plan("phases", n, nb, nchunk, h_out, w_out, hq, wq, run, chunk_in, 0, _offsets(table))


def _offsets(table: np.ndarray) -> np.ndarray:
    if table.size and int(table.max()) >= 2**31:
        raise OverflowError("input too large for the compiled kernels' 32-bit offsets")
    return np.ascontiguousarray(table.reshape(-1), dtype=np.int32)


@functools.lru_cache(maxsize=1)
def _fused_loops() -> tuple:
    """Pack one image (chunk) and multiply it right away, per thread: the packed copy of an
    image (3 shifted copies for a 3x3 conv) stays in L2 instead of going to memory and back,
    which had made packing the whole batch first cost as much as the multiply itself."""
    from numba import njit, prange

    lib = _native()._lib()
    pack_sh, pack_ph = lib.pack_shifted_f32, lib.pack_phases_f32
    mul_epi, mul = lib.shift_f32_epi, lib.shift_f32

    @njit(cache=False, nogil=True)
    def aligned_part(p, parts, code, x, packed, indptr, offs, vals, bias, y, n, c, h, w, kw, sh, sw, dw, pt, pl,
                     hq, pitch, copy_size, chunk_in, blk, w_out, plane, run, o):  # noqa: ANN001, ANN202
        buf = packed.ctypes.data + 4 * p * chunk_in
        rows = indptr.shape[0] - 1
        for b in range(n * p // parts, n * (p + 1) // parts):
            pack_sh(x.ctypes.data + 4 * b * c * h * w, buf, c, h, w, kw, sh, sw, dw, pt, pl, hq, pitch, copy_size,
                    chunk_in, 0, c)
            mul_epi(code, indptr.ctypes.data, offs.ctypes.data, vals.ctypes.data, bias.ctypes.data, buf,
                    y.ctypes.data + 4 * b * o * plane, 0, blk, pitch, w_out, plane, 0, 0, rows, 0, run)

    @njit(cache=False, nogil=True)
    def phases_part(p, parts, code, x, packed, indptr, offs, vals, bias, out, n, c, h, w, nchunk, nb, sh, sw,
                    pt, pl, hq, wq, chunk_in, blk, run, o):  # noqa: ANN001, ANN202
        buf = packed.ctypes.data + 4 * p * chunk_in
        rows = indptr.shape[0] - 1
        for b in range(nb * p // parts, nb * (p + 1) // parts):
            first = b * nchunk
            pack_ph(x.ctypes.data + 4 * first * c * h * w, buf, n - first, c, h, w, nchunk, sh, sw, pt, pl, hq, wq,
                    chunk_in, 0, c)
            mul(code, indptr.ctypes.data, offs.ctypes.data, vals.ctypes.data, bias.ctypes.data, buf,
                out.ctypes.data + 4 * b * o * run, blk, run, 0, rows, 0, run)

    @njit(cache=False, parallel=True)
    def aligned_par(parts, code, x, packed, indptr, offs, vals, bias, y, n, c, h, w, kw, sh, sw, dw, pt, pl, hq,
                    pitch, copy_size, chunk_in, blk, w_out, plane, run, o):  # noqa: ANN001, ANN202
        for p in prange(parts):
            aligned_part(p, parts, code, x, packed, indptr, offs, vals, bias, y, n, c, h, w, kw, sh, sw, dw, pt,
                         pl, hq, pitch, copy_size, chunk_in, blk, w_out, plane, run, o)

    @njit(cache=False, parallel=True)
    def phases_par(parts, code, x, packed, indptr, offs, vals, bias, out, n, c, h, w, nchunk, nb, sh, sw, pt, pl,
                   hq, wq, chunk_in, blk, run, o):  # noqa: ANN001, ANN202
        for p in prange(parts):
            phases_part(p, parts, code, x, packed, indptr, offs, vals, bias, out, n, c, h, w, nchunk, nb, sh, sw,
                        pt, pl, hq, wq, chunk_in, blk, run, o)

    return aligned_part, aligned_par, phases_part, phases_par


# ------------------------------------------------------------------ direct conv
# A stride-1 conv whose output is as large as its input (ResNet's 3x3, pad 1; its input
# gradient too), or a strided conv read through its input's stride phases: the kernel of
# swat_native/csrc/train_conv_f32.c reads NCHW (or the phases, one copy of the input instead of
# the shift kernel's kw shifted copies) with the zero padding as lane masks.
@dataclass
class _Direct:
    h_out: int
    w_out: int
    masks: np.ndarray  # (V, kh*kw) uint16: lanes of output vector v whose tap source is inside x
    dtab: np.ndarray  # (kh*kw,) int32: the tap's shift in the (phase) planes of one channel
    phased: bool  # strided: the kernel reads the stride phases, not x itself
    cs: int  # floats per input channel for several images or stride phases (native_train.tconv_cstride)


_DIRECT: dict[tuple, Optional[_Direct]] = {}


def _lane_masks(inside: np.ndarray) -> np.ndarray:
    """(P, taps) bool -> (ceil(P / 16), taps) uint16 lane masks; lanes past P stay clear (the
    plane's last vector may be partial: 28 x 28 = 49 vectors, 7 x 7 = 3 vectors and 1 lane)."""
    plane, taps = inside.shape
    v = -(-plane // _LANES)
    full = np.zeros((v * _LANES, taps), bool)
    full[:plane] = inside
    lanes = full.reshape(v, _LANES, taps).astype(np.uint32) << np.arange(_LANES, dtype=np.uint32)[None, :, None]
    return np.ascontiguousarray(lanes.sum(1), dtype=np.uint16)


def _direct_plan(spec: _ConvSpec, h: int, w: int, block: int) -> Optional[_Direct]:
    """The direct kernel's tables for this conv, or None where it does not apply (groups,
    a stride-1 conv that changes the map size, stride phases larger than the output, neither AVX-512 nor AVX2)."""
    key = (spec, h, w, block, _native().isa_code())
    if key in _DIRECT:
        return _DIRECT[key]
    if len(_DIRECT) > 256:
        _DIRECT.clear()
    _DIRECT[key] = plan = _make_direct(spec, h, w, block)
    return plan


def _make_direct(s: _ConvSpec, h: int, w: int, block: int) -> Optional[_Direct]:
    from swat_native import train as native_train
    (sh, sw), (pt, pl), (dh, dw) = s.stride, s.padding, s.dilation
    h_out = (h + 2 * pt - dh * (s.kh - 1) - 1) // sh + 1
    w_out = (w + 2 * pl - dw * (s.kw - 1) - 1) // sw + 1
    plane, kk = h_out * w_out, s.kh * s.kw
    phased = (sh, sw) != (1, 1)
    if (s.groups != 1 or kk > 255 or h_out < 1 or w_out < 1 or (not phased and (h_out, w_out) != (h, w))
            or not native_train.tconv_supported(_native().isa_code(), block, plane)):
        return None
    cs = native_train.tconv_cstride(sh * sw * plane if phased else h * w)
    if s.c * cs + 2 * plane >= 2**31:
        return None
    t = native_train.direct_tables(s.kh, s.kw, (sh, sw), (pt, pl), (dh, dw), h, w, h_out, w_out)
    if t is None:  # a source pixel outside the phase plane: not this kernel
        return None
    masks, dtab = t
    return _Direct(h_out, w_out, masks, dtab, phased, cs)


def _direct_conv(x: Tensor, w4: Tensor, bias: Optional[Tensor], spec: _ConvSpec, block: int, d: _Direct,
                 key: Optional[tuple] = None) -> Tensor:
    """conv2d(x, w4, bias) with the zeros of w4 skipped, straight into the NCHW output. A stride-1
    conv on several images reads x in place or copied at the padded channel stride ``d.cs``,
    whichever was faster the first time ``key`` (the caller's choice key) came by
    (swat_native.layout_choice; the two ways give identical results)."""
    n, _, h, w = x.shape
    if d.phased:  # the phases are copied anyway: always at the padded stride
        return _direct_run(x, w4, bias, spec, block, d, True)
    return _in_layout(key, n > 1 and d.cs != h * w, lambda pad: _direct_run(x, w4, bias, spec, block, d, pad))


def _in_layout(key: Optional[tuple], choice: bool, run: Callable[[bool], Tensor]) -> Tensor:
    """``run(pad)`` with the input read in place (``pad`` False) or copied at the padded channel
    stride: in place where there is no ``choice`` (one image, or a stride that does not alias);
    padded without a ``key``; else the way layout_choice timed faster for the key."""
    if not choice:
        return run(False)
    if key is None:
        return run(True)
    from swat_native import layout_choice
    return run(layout_choice.padded_wins(key + ("layout",), lambda: run(False), lambda: run(True)))


def _direct_run(x: Tensor, w4: Tensor, bias: Optional[Tensor], spec: _ConvSpec, block: int, d: _Direct,
                pad: bool) -> Tensor:
    from swat_native import train as native_train
    n, c, h, w = x.shape
    plane, kk = d.h_out * d.w_out, spec.kh * spec.kw
    xn = x.numpy()
    cstride = d.cs if pad else h * w
    if d.phased:
        xn = native_train.tconv_phases(xn, spec.stride[0], spec.stride[1], d.h_out, d.w_out, _threads(), d.cs,
                                       _buffer("dx", n * c * d.cs, np.float32))
    elif pad and d.cs != h * w:
        xn = native_train.tconv_restride(xn, d.cs, _threads(), _buffer("dx", n * c * d.cs, np.float32))
    w2 = w4.detach().reshape(spec.o, -1).contiguous().numpy()
    rows, k = spec.o // block, w2.shape[1]
    indptr = _buffer("dp", rows * kk + 1, np.int32)
    offs = _buffer("do", rows * (k // kk) * kk, np.int32)
    vals = _buffer("dv", spec.o * k, np.float32)
    native_train.tconv_csr(w2, block, kk, cstride, d.dtab, indptr, offs, vals)
    y = torch.empty((n, spec.o, d.h_out, d.w_out), dtype=torch.float32)
    b = None if bias is None else bias.detach().contiguous()
    parts = max(1, min(_threads(), n))
    rc = native_train.tconv_loop(parts > 1)(_native().isa_code(), indptr, offs, vals,
                                           0 if b is None else b.data_ptr(), d.masks, kk, xn, y.data_ptr(),
                                           c * cstride, spec.o, plane, plane, block, n, parts)
    if rc != 0:
        raise RuntimeError("internal: the direct conv kernel has no loop for this layer")
    return y


@dataclass
class _PhaseTaps:
    ti: list[int]  # kernel rows that reach this input phase
    tj: list[int]  # kernel columns
    masks: np.ndarray  # (V, len(ti) * len(tj)) uint16 over the output-gradient plane
    dtab: np.ndarray  # shift per tap in the output-gradient plane


_DGRAD: dict[tuple, Optional[list[tuple[int, int, Optional[_PhaseTaps]]]]] = {}


def _direct_dgrad_plan(w_shape: tuple, x_shape: tuple, g_shape: tuple, stride: tuple[int, int],
                       padding: tuple[int, int]) -> Optional[list[tuple[int, int, Optional[_PhaseTaps]]]]:
    """Per input stride phase (ry, rx): the taps that reach it and the direct kernel's tables, for a
    strided conv's input gradient whose every phase is as large as the output gradient (ResNet's
    downsampling convs on even maps); None where that does not hold (then _strided_input_grad)."""
    key = (tuple(w_shape), tuple(x_shape), tuple(g_shape), tuple(stride), tuple(padding), _native().isa_code())
    if key in _DGRAD:
        return _DGRAD[key]
    if len(_DGRAD) > 256:
        _DGRAD.clear()
    _DGRAD[key] = plan = _make_dgrad(w_shape, x_shape, g_shape, stride, padding)
    return plan


def _make_dgrad(w_shape: tuple, x_shape: tuple, g_shape: tuple, stride: tuple[int, int],
                padding: tuple[int, int]) -> Optional[list[tuple[int, int, Optional[_PhaseTaps]]]]:
    from swat_native import train as native_train
    _, _, kh, kw = w_shape
    _, c, h, w = x_shape
    ho, wo = g_shape[2], g_shape[3]
    (sh, sw), (ph, pw) = stride, padding
    plane = ho * wo
    if (kh * kw > 255 or max(c, w_shape[0]) * native_train.tconv_cstride(plane) >= 2**31
            or not native_train.tconv_supported(_native().isa_code(), 1, plane)):
        return None
    out = []
    for ry in range(sh):
        for rx in range(sw):
            if -(-(h - ry) // sh) != ho or -(-(w - rx) // sw) != wo:
                return None
            ey0, ti = _phase_taps(kh, ph, sh, ry)
            ex0, tj = _phase_taps(kw, pw, sw, rx)
            if not ti or not tj:
                out.append((ry, rx, None))  # no tap lands here: a zero gradient
                continue
            ey = np.arange(len(ti)) + ey0  # output-gradient row offset of each tap (consecutive)
            ex = np.arange(len(tj)) + ex0
            q = np.arange(plane)
            m = (q // wo)[:, None, None] + ey[None, :, None]
            k = (q % wo)[:, None, None] + ex[None, None, :]
            inside = ((m >= 0) & (m < ho) & (k >= 0) & (k < wo)).reshape(plane, -1)
            masks = _lane_masks(inside)
            dtab = np.ascontiguousarray((ey[:, None] * wo + ex[None, :]).reshape(-1), dtype=np.int32)
            out.append((ry, rx, _PhaseTaps(ti, tj, masks, dtab)))
    return out


def _direct_strided_input_grad(g: Tensor, w: Tensor, x_shape: torch.Size, stride: tuple[int, int],
                               plan: list[tuple[int, int, Optional[_PhaseTaps]]], key: Optional[tuple] = None) -> Tensor:
    """grad_input of a strided conv (one group, no dilation): per input stride phase, one direct
    sparse conv of the output gradient with the taps that reach the phase, written into a phase
    buffer, then one pass that interleaves the phases into NCHW (no zeros inserted, no padding).
    The output gradient is read in place or at the padded channel stride as in :func:`_direct_conv`."""
    from swat_native import train as native_train
    plane = g.shape[2] * g.shape[3]
    return _in_layout(key, g.shape[0] > 1 and native_train.tconv_cstride(plane) != plane,
                      lambda pad: _direct_strided_input_grad_run(g, w, x_shape, stride, plan, pad))


def _direct_strided_input_grad_run(g: Tensor, w: Tensor, x_shape: torch.Size, stride: tuple[int, int],
                                   plan: list[tuple[int, int, Optional[_PhaseTaps]]], pad: bool) -> Tensor:
    from swat_native import train as native_train
    n, c, h, w_in = x_shape
    o = w.shape[0]
    ho, wo = g.shape[2], g.shape[3]
    (sh, sw), plane = stride, ho * wo
    gn = g.detach().contiguous().numpy()
    parts = max(1, min(_threads(), n))
    cs = native_train.tconv_cstride(plane) if pad else plane  # see _Direct.cs, _direct_conv
    if cs != plane:
        gn = native_train.tconv_restride(gn, cs, parts, _buffer("dx", n * o * cs, np.float32))
    empty = any(t is None for _, _, t in plan)
    phases = _buffer("ph", n * c * sh * sw * ho * wo, np.float32).reshape(n, c, sh, sw, ho, wo)
    if empty:
        phases.fill(0.0)
    wt = w.detach().transpose(0, 1)  # (C, O, kh, kw)
    loop = native_train.tconv_loop(parts > 1)
    for ry, rx, taps in plan:
        if taps is None:
            continue
        sub = wt[:, :, taps.ti][:, :, :, taps.tj]
        kk = len(taps.ti) * len(taps.tj)
        w2 = sub.reshape(c, -1).contiguous().numpy()
        indptr = _buffer("gp", c * kk + 1, np.int32)
        offs = _buffer("go", w2.size, np.int32)
        vals = _buffer("gv", w2.size, np.float32)
        native_train.tconv_csr(w2, 1, kk, cs, taps.dtab, indptr, offs, vals)
        base = phases.ctypes.data + 4 * (ry * sw + rx) * plane
        rc = loop(_native().isa_code(), indptr, offs, vals, 0, taps.masks, kk, gn, base, o * cs, c, plane,
                  sh * sw * plane, 1, n, parts)
        if rc != 0:
            raise RuntimeError("internal: the direct conv kernel has no loop for this input gradient")
    out = torch.empty(tuple(x_shape), dtype=torch.float32)
    native_train.tconv_unphase(phases, out.numpy(), parts)
    return out


def _sparse_conv(x: Tensor, w4: Tensor, bias: Optional[Tensor], spec: _ConvSpec, block: int,
                 key: Optional[tuple] = None) -> Tensor:
    """conv2d(x, w4, bias) with the zeros of w4 skipped (symmetric zero padding); ``key``: the
    caller's choice key, for the direct kernel's input layout (:func:`_direct_conv`)."""
    nat = _native()
    x = x.detach().contiguous()
    n, c, h, w = x.shape
    d = _direct_plan(spec, h, w, block)
    if d is not None:
        return _direct_conv(x, w4, bias, spec, block, d, key)
    threads = _threads()
    p = _plan(spec, n, h, w, threads)
    csr = _build_csr(w4, block, p.table, spec.groups, "f")
    b = np.zeros(spec.o, np.float32) if bias is None else bias.detach().contiguous().numpy()
    parts = max(1, min(threads, p.nb))
    xn = x.numpy()
    code = nat.isa_code()
    packed = _buffer("packed", parts * p.chunk_in + _LANES, np.float32)
    sh, sw = spec.stride
    pt, pl = spec.padding
    a_part, a_par, ph_part, ph_par = _fused_loops()
    if p.layout == "aligned":
        plane = p.h_out * p.w_out
        y = np.empty(n * spec.o * plane, np.float32)
        args = (code, xn, packed, csr.indptr, csr.offs, csr.vals, b, y, n, c, h, w, spec.kw, sh, sw,
                spec.dilation[1], pt, pl, p.hq, p.wq, p.copy_size, p.chunk_in, block, p.w_out, plane, p.run, spec.o)
        if parts > 1:
            a_par(parts, *args)
        else:
            a_part(0, 1, *args)
        return torch.from_numpy(y).view(n, spec.o, p.h_out, p.w_out)
    out = _buffer("out", p.nb * spec.o * p.run, np.float32)
    args = (code, xn, packed, csr.indptr, csr.offs, csr.vals, b, out, n, c, h, w, p.nchunk, p.nb, sh, sw, pt, pl,
            p.hq, p.wq, p.chunk_in, block, p.run, spec.o)
    if parts > 1:
        ph_par(parts, *args)
    else:
        ph_part(0, 1, *args)
    grid = p.h_out * p.wq * p.nchunk
    t = torch.from_numpy(out).view(p.nb, spec.o, p.run)[:, :, :grid]
    t = t.reshape(p.nb, spec.o, p.h_out, p.wq, p.nchunk)[:, :, :, :p.w_out, :]
    y = torch.empty((p.nb, p.nchunk, spec.o, p.h_out, p.w_out), dtype=torch.float32)
    y.copy_(t.permute(0, 4, 1, 2, 3))
    return y.view(p.nb * p.nchunk, spec.o, p.h_out, p.w_out)[:n]


# ----------------------------------------------------------------- public products
def _spec_of(w: Tensor, groups: int, stride: tuple[int, int], padding: tuple[int, int],
             dilation: tuple[int, int]) -> _ConvSpec:
    o, cg, kh, kw = w.shape
    return _ConvSpec(cg * groups, o, kh, kw, groups, tuple(stride), tuple(padding), tuple(dilation))  # type: ignore[arg-type]


def _work(spec: _ConvSpec) -> int:
    return spec.o * (spec.c // spec.groups) * spec.kh * spec.kw


def _usable_block(spec: _ConvSpec, block: int) -> int:
    nat = _native()
    b = block if block in nat.BLOCKS else 1
    while b > 1 and (spec.o // spec.groups) % b:
        b //= 2
    return b


def conv_forward(x: Tensor, w_sparse: Tensor, bias: Optional[Tensor], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], groups: int, density: float,
                 block: int = 1) -> Tensor:
    """``F.conv2d(x, w_sparse, bias, ...)``: sparse kernel or torch, whichever wins here.

    ``density``: the kept fraction of ``w_sparse`` (part of the choice key); ``block``: output
    channels sharing one zero pattern (SWAT's ``--block``), used by the kernel's block rows."""
    def dense() -> Tensor:
        return F.conv2d(x, w_sparse, bias, stride, padding, dilation, groups)

    if not enabled_for(x, w_sparse) or x.dim() != 4:
        return dense()
    spec = _spec_of(w_sparse, groups, stride, padding, dilation)
    if mode() != "force" and (_work(spec) < _MIN_WEIGHTS or spec.c < 8):
        return dense()
    blk = _usable_block(spec, block)
    key = ("fwd", spec, tuple(x.shape), _density_bucket(density), blk, _threads(), _native().isa())
    h_out = (x.shape[2] + 2 * spec.padding[0] - spec.dilation[0] * (spec.kh - 1) - 1) // spec.stride[0] + 1
    w_out = (x.shape[3] + 2 * spec.padding[1] - spec.dilation[1] * (spec.kw - 1) - 1) // spec.stride[1] + 1
    return choose(key, lambda: _sparse_conv(x, w_sparse, bias, spec, blk, key), dense,
                  _rule(_density_bucket(density) / 20, h_out * w_out))


def input_grad_supported(stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                         kernel: tuple[int, int]) -> bool:
    """Stride 1 and padding at most d * (k - 1): then grad_input is a plain sparse conv."""
    return (tuple(stride) == (1, 1) and padding[0] <= dilation[0] * (kernel[0] - 1)
            and padding[1] <= dilation[1] * (kernel[1] - 1))


def transposed_weight(w: Tensor, groups: int) -> Tensor:
    """The weight of the conv that computes a stride-1 conv's input gradient: per group,
    input and output channels swapped, kernel flipped: (C, O/groups, kh, kw)."""
    o, cg, kh, kw = w.shape
    wt = w.detach().reshape(groups, o // groups, cg, kh, kw).transpose(1, 2)
    return wt.reshape(groups * cg, o // groups, kh, kw).flip(2, 3).contiguous()


def _phase_taps(k: int, p: int, s: int, r: int) -> tuple[int, list[int]]:
    """Input rows y = s * m + r of a stride-s, dilation-1 conv read output rows m + e for the taps
    i with (r + p - i) = s * e: returns (smallest e, the taps i in order of increasing e) - the
    taps are s apart, so their e are consecutive."""
    taps = [i for i in range(k) if (r + p - i) % s == 0]
    taps.sort(key=lambda i: (r + p - i) // s)
    return ((r + p - taps[0]) // s if taps else 0), taps


def _strided_input_grad(g: Tensor, w: Tensor, x_shape: torch.Size, stride: tuple[int, int],
                        padding: tuple[int, int], groups: int) -> Tensor:
    """grad_input of a strided conv as s_h * s_w stride-1 sparse convs, one per phase (ry, rx)
    of the input grid: phase rows y = s * m + ry see only the taps i with (ry + p - i) % s == 0,
    as a small kernel over the output gradient (no zeros inserted into it)."""
    n, c, h, w_in = x_shape
    o, cg, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    ho, wo = g.shape[2], g.shape[3]
    wt = w.detach().reshape(groups, o // groups, cg, kh, kw).transpose(1, 2).reshape(c, o // groups, kh, kw)
    phases = [(ry, rx, *_phase_taps(kh, ph, sh, ry), *_phase_taps(kw, pw, sw, rx))
              for ry in range(min(sh, h)) for rx in range(min(sw, w_in))]
    full = all(ti and tj for _, _, _, ti, _, tj in phases)
    out = (torch.empty if full else torch.zeros)(tuple(x_shape), dtype=torch.float32)
    # one zero border around g, wide enough for every phase (instead of a padded copy per phase)
    need = [(max(0, -e0y), max(0, -e0x), max(0, e0y + -(-(h - ry) // sh) + len(ti) - 1 - ho),
             max(0, e0x + -(-(w_in - rx) // sw) + len(tj) - 1 - wo)) for ry, rx, e0y, ti, e0x, tj in phases]
    top, left, bottom, right = (max(v[i] for v in need) for i in range(4))
    gp_all = F.pad(g, (left, right, top, bottom)) if (top or left or bottom or right) else g
    for ry, rx, e0y, ti, e0x, tj in phases:
        my, mx = -(-(h - ry) // sh), -(-(w_in - rx) // sw)
        if not ti or not tj:
            continue  # no tap lands on these input pixels: their gradient is zero
        sub = wt[:, :, ti][:, :, :, tj].contiguous()
        ly, lx = len(ti), len(tj)
        # rows e0y .. e0y + my + ly - 2 of g (zero outside), then a 'valid' conv
        gp = gp_all[:, :, e0y + top:e0y + top + my + ly - 1, e0x + left:e0x + left + mx + lx - 1]
        spec = _ConvSpec(o, c, ly, lx, groups, (1, 1), (0, 0), (1, 1))
        out[:, :, ry::sh, rx::sw] = _sparse_conv(gp, sub, None, spec, 1)
    return out


def conv_input_grad(g: Tensor, w_sparse: Tensor, x_shape: torch.Size, stride: tuple[int, int],
                    padding: tuple[int, int], dilation: tuple[int, int], groups: int, density: float,
                    dense: Callable[[], Tensor]) -> Tensor:
    """grad of conv2d w.r.t. its input, through the sparse kernel when it wins: a sparse conv
    with the transposed, flipped weight for stride 1; one per stride phase for a strided conv
    without dilation (:func:`_strided_input_grad`). ``dense()`` computes the same with torch."""
    kh, kw = w_sparse.shape[2:]
    if not enabled_for(g, w_sparse) or g.dim() != 4 or len(x_shape) != 4:
        return dense()
    rule = _rule(_density_bucket(density) / 20, x_shape[2] * x_shape[3])
    if not input_grad_supported(stride, padding, dilation, (kh, kw)):
        if tuple(dilation) != (1, 1) or tuple(stride) == (1, 1) or max(padding) >= max(kh, kw):
            return dense()
        o, cg = w_sparse.shape[:2]
        if mode() != "force" and (o * cg * kh * kw < _MIN_WEIGHTS or o // groups < 8):
            return dense()
        key = ("dgrad-s", tuple(w_sparse.shape), groups, tuple(stride), tuple(padding), tuple(g.shape),
               tuple(x_shape), _density_bucket(density), _threads(), _native().isa())
        plan = _direct_dgrad_plan(w_sparse.shape, x_shape, g.shape, stride, padding) if groups == 1 else None
        if plan is not None:
            return choose(key, lambda: _direct_strided_input_grad(g, w_sparse, x_shape, stride, plan, key), dense,
                          rule)
        return choose(key, lambda: _strided_input_grad(g, w_sparse, x_shape, stride, padding, groups), dense, rule)
    wt = transposed_weight(w_sparse, groups)
    pad = (dilation[0] * (kh - 1) - padding[0], dilation[1] * (kw - 1) - padding[1])
    spec = _spec_of(wt, groups, (1, 1), pad, dilation)
    if mode() != "force" and (_work(spec) < _MIN_WEIGHTS or spec.c < 8):
        return dense()
    key = ("dgrad", spec, tuple(g.shape), _density_bucket(density), _threads(), _native().isa())

    def sparse() -> Tensor:
        out = _sparse_conv(g, wt, None, spec, 1, key)
        if tuple(out.shape) != tuple(x_shape):  # rows / columns a strided forward never read
            raise RuntimeError(f"internal: input gradient {tuple(out.shape)}, expected {tuple(x_shape)}")
        return out

    return choose(key, sparse, dense, rule)


def weight_grad_supported(w_shape: torch.Size, groups: int) -> bool:
    """Whether the compiled weight-gradient loop covers this layer at the active ISA."""
    nat = _native()
    if nat is None or groups != 1:
        return False
    from swat_native import train as native_train
    o, _, kh, kw = w_shape
    return native_train.wgrad_block(nat.isa_code(), kh, kw, o) > 0


def _sparse_wgrad(g: Tensor, a_vals: Tensor, a_bits: Tensor, x_shape: torch.Size, w_shape: torch.Size,
                  stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    from swat_native import train as native_train
    nat = _native()
    n, c, h, w = x_shape
    o, _, kh, kw = w_shape
    h_out, w_out = g.shape[2], g.shape[3]
    code = nat.isa_code()
    bits = a_bits.numpy()
    vals = a_vals.detach().contiguous().numpy()
    starts = native_train.plane_starts(bits, n * c, h * w)
    if int(starts[-1]) != vals.size:
        raise RuntimeError(f"internal: activation bitmask holds {int(starts[-1])} kept entries, values {vals.size}")
    dwt = np.zeros(c * kh * kw * o, np.float32)
    items = c * (o // native_train.wgrad_block(code, kh, kw, o))
    threads = _threads()
    parts = max(1, min(threads, items))
    by_img = native_train.split_by_images(n, c, h * w, parts)
    if tuple(stride) == (1, 1) and native_train.wgrad_s1_supported(code, kh, kw, o, h * w):
        # the output gradient zero-padded so that every tap of every kept entry reads a row
        top = max(0, dilation[0] * (kh - 1) - padding[0])
        left = max(0, dilation[1] * (kw - 1) - padding[1])
        hp, wp = top + max(h_out, h + padding[0]), left + max(w_out, w + padding[1])
        gpad = native_train.to_nhwc_padded(code, g.detach().contiguous().numpy(), top, left, hp, wp, threads)
        rc = native_train.wgrad_s1_loop(parts > 1, by_img)(code, bits, vals, starts, gpad, dwt, n, c, h, w, o, kh,
                                                           kw, padding[0], padding[1], dilation[0], dilation[1], hp,
                                                           wp, top, left, items, parts)
        if rc != 0:
            raise RuntimeError("internal: the stride-1 weight-gradient loop has no kernel for this layer")
        return torch.from_numpy(dwt).view(c, kh, kw, o).permute(3, 0, 1, 2).contiguous()
    if (tuple(stride) == (2, 2) and tuple(dilation) == (1, 1)
            and native_train.wgrad_s2_supported(code, kh, kw, o, h * w)):
        top, left = (kh - 1) // 2 + 1, (kw - 1) // 2 + 1
        hp = top + max(h_out, (h - 1 + padding[0]) // 2 + 1)
        wp = left + max(w_out, (w - 1 + padding[1]) // 2 + 1)
        gpad = native_train.to_nhwc_padded(code, g.detach().contiguous().numpy(), top, left, hp, wp, threads)
        rc = native_train.wgrad_s2_loop(parts > 1, by_img)(code, bits, vals, starts, gpad, dwt, n, c, h, w, o, kh,
                                                           kw, padding[0], padding[1], hp, wp, top, left, items, parts)
        if rc != 0:
            raise RuntimeError("internal: the stride-2 weight-gradient loop has no kernel for this layer")
        return torch.from_numpy(dwt).view(c, kh, kw, o).permute(3, 0, 1, 2).contiguous()
    g_nhwc = native_train.to_nhwc(g.detach().contiguous().numpy())
    rc = native_train.wgrad_loop(parts > 1)(code, bits, vals, starts, g_nhwc, dwt, n, c, h, w, o, kh, kw,
                                            stride[0], stride[1], padding[0], padding[1], dilation[0],
                                            dilation[1], h_out, w_out, items, parts)
    if rc != 0:
        raise RuntimeError("internal: the weight-gradient loop has no kernel for this layer")
    return torch.from_numpy(dwt).view(c, kh, kw, o).permute(3, 0, 1, 2).contiguous()


def conv_weight_grad(g: Tensor, a_vals: Tensor, a_bits: Tensor, x_shape: torch.Size, w_shape: torch.Size,
                     stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                     dense: Callable[[], Tensor]) -> Tensor:
    """grad of conv2d w.r.t. its weight from the compact TopK(a) (values + packed bitmask,
    :mod:`training.memory`), walking its kept entries without decoding them; ``dense()``
    computes the same with torch (and is used where the compiled loop does not apply)."""
    if (not enabled_for(g, a_vals) or g.dim() != 4 or len(x_shape) != 4 or a_bits.dtype != torch.uint8
            or not weight_grad_supported(w_shape, groups)):
        return dense()
    o, cg, kh, kw = w_shape
    if mode() != "force" and (o * cg * kh * kw < _MIN_WEIGHTS or cg < 8):
        return dense()
    density = a_vals.numel() / max(1, int(torch.Size(x_shape).numel()))
    key = ("wgrad", tuple(w_shape), tuple(x_shape), tuple(stride), tuple(padding), tuple(dilation),
           _density_bucket(density), _threads(), _native().isa())
    return choose(key, lambda: _sparse_wgrad(g, a_vals, a_bits, x_shape, w_shape, stride, padding, dilation),
                  dense, _rule(_density_bucket(density) / 20, x_shape[2] * x_shape[3]))
