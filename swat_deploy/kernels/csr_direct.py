"""Direct sparse convolution: CSR weights times shifted views of the input, no im2col.

Why: materialising im2col costs 1.5-4x a whole oneDNN conv on small images, which eats the
sparse win. Instead every non-zero w[o, c, i, j] adds ``w * (input plane c shifted by (i, j))``
to output plane o, and the shift is a constant offset into one flat buffer:

* the input is packed once per call into a zero-padded buffer of layout
  (batch-chunk, C, sh, sw, Hq, Wq, Nc) - stride phases (sh, sw) split out so that a strided
  conv reads each phase with unit stride, and Nc images of a chunk innermost so that small
  feature maps (4x4) still give long contiguous inner loops;
* the output plane is computed on the (H_out, Wq) grid, i.e. with the padded row pitch, so
  one output plane is one contiguous run of L = H_out * Wq * Nc floats and every non-zero is
  one axpy ``out[o, 0:L] += w * x[off : off + L]`` (the extra Wq - W_out columns are junk
  and dropped when unpacking);
* offsets per non-zero (channel, phase, shift) are computed once per input shape.

The row loop (one output channel per task) parallelises over channels x chunks with prange.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import _numba_common as nc
import swat_native as native
import swat_native.layer as native_layer
from ._csr_conv import CsrConvWeights, epilogue_ok
from swat_deploy.threads import numba_threads
from .base import LayerSpec

# A batch chunk's packed input should stay in the per-core L2 (1 MiB on the machine measured):
# every output channel of the chunk re-reads it. Nc images per chunk are as many as fit.
_CHUNK_BYTES = 384 * 1024
_MAX_SHAPES = 8
_LANES = 16
# Up to this size a layer keeps its own zero-padded input buffer per thread (see __call__).
_OWN_PAD_BYTES = 4 << 20
_UIDS = itertools.count()
# Output widths up to this use the compact (im2col-row) pitch in _aligned_geometry.
_COMPACT_MAX_W = 8
# Output planes of at least this many pixels run one image per chunk at any batch size, as
# per-image items of the one-call layer, instead of interleaving several images per chunk:
# measured at batch 64, one thread, 90 %: 1.9x (B=1) / 1.35x (B=4) at 16x16, 1.4x / 1.25x at
# 8x8 (the interleaving pack and unpack passes cost more than the longer rows save); at 4x4
# interleaving stays (per-image lost 0.81x with B=4).
_PER_IMAGE_MIN_PLANE = 64


def _layer_call_enabled() -> bool:
    """The one-call layer (swat_native.layer) is built and not switched off (SWAT_LAYER_CALL=0)."""
    return os.environ.get("SWAT_LAYER_CALL", "1") != "0" and native_layer.available()


@dataclass
class _Geometry:
    n: int
    nb: int       # number of batch chunks
    nchunk: int   # images per chunk (Nc)
    h_out: int
    w_out: int
    hq: int
    wq: int
    run: int      # L = h_out * wq * nchunk rounded up to 16 (vector width)
    chunk_in: int  # floats per packed input chunk
    offs: np.ndarray  # per non-zero offset into a packed chunk
    copy_size: int = 0  # floats per shifted copy (_aligned_geometry); -1: the input itself (_view_geometry)


class _CsrDirectConv:
    uses_torch_threads = False  # numba loops; see base.thread_scope
    fuses_epilogue = True  # __call__ takes residual / relu (see Op.fused)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec) -> None:
        self.w = CsrConvWeights(weight, bias, spec)
        self.nbytes = self.w.nbytes
        self.spec = spec
        self._geo: dict[tuple[int, int, int], _Geometry] = {}
        self._calls: dict[tuple[int, int, int, int, bool], native_layer.ConvCall | None] = {}
        self._uid = next(_UIDS)  # owns its padded buffers; id() could be reused by a later layer
        if spec.input_shape is not None:
            nc.warm_up(self, spec.input_shape)

    def _geometry(self, n: int, h: int, w: int) -> _Geometry:
        key = (n, h, w)
        g = self._geo.get(key)
        if g is not None:
            return g
        wt = self.w
        sh, sw = self.spec.stride
        dh, dw = self.spec.dilation
        pt, pl, pb, pr = self.spec.padding
        hp, wp = h + pt + pb, w + pl + pr
        h_out, w_out = wt.out_size(h, w)
        qi, ri = np.divmod(wt.tap_i * dh, sh)
        qj, rj = np.divmod(wt.tap_j * dw, sw)
        wq = -(-wp // sw)
        qi_max = (dh * (wt.kh - 1)) // sh
        # Extra rows below: the junk columns of the last output rows, rounded up to whole
        # vectors, read up to wq + 15 floats past the last data row; they must stay inside.
        hq = max(-(-hp // sh), qi_max + h_out + 1 + -(-_LANES // wq))
        image_bytes = 4 * wt.c * sh * sw * hq * wq
        nchunk = int(min(n, max(1, _CHUNK_BYTES // image_bytes)))
        if nchunk > 1 and h_out * w_out >= _PER_IMAGE_MIN_PLANE and _layer_call_enabled():
            nchunk = 1  # see _PER_IMAGE_MIN_PLANE
        # Block weights at stride 1 keep the padded layout (measured faster for B = 4: aligned rows
        # cost more than they save when one load feeds B outputs); strided ones take the shifted
        # copies rather than stride phases (1.5-2x at batch 1, see _aligned_geometry).
        if nchunk == 1 and native.available() and (self.w.block == 1 or _is_plain_1x1(self.spec) or sh > 1 or sw > 1):
            g = (self._view_geometry(n, h, w) if _is_plain_1x1(self.spec) and (h * w) % _LANES == 0
                 else self._aligned_geometry(n, h_out, w_out, qi, ri, compact=w_out <= _COMPACT_MAX_W))
            if len(self._geo) >= _MAX_SHAPES:
                self._geo.pop(next(iter(self._geo)))
            self._geo[key] = g
            return g
        nb = -(-n // nchunk)
        phase_sz = hq * wq * nchunk
        offs = (((wt.chan * sh + ri) * sw + rj) * phase_sz + (qi * wq + qj) * nchunk)
        chunk_in = wt.c * sh * sw * phase_sz
        run = -(-(h_out * wq * nchunk) // _LANES) * _LANES
        offs = offs.astype(np.int32 if chunk_in * nb + run < 2**31 else np.int64)
        g = _Geometry(n, nb, nchunk, h_out, w_out, hq, wq, run, chunk_in, offs)
        if len(self._geo) >= _MAX_SHAPES:
            self._geo.pop(next(iter(self._geo)))
        self._geo[key] = g
        return g

    def _view_geometry(self, n: int, h: int, w: int) -> _Geometry:
        """A 1x1, stride-1, unpadded conv whose planes are whole vectors reads the input as it is:
        offsets c * H * W, every load aligned, nothing packed (the bulk of ResNet-50's and
        MobileNet's 1x1 convs at 56x56 and 28x28)."""
        wt = self.w
        plane = h * w
        offs = native.check_offsets((wt.chan * plane).astype(np.int64))
        return _Geometry(n, n, 1, h, w, h, w, plane, wt.c * plane, offs, -1)

    def _aligned_geometry(self, n: int, h_out: int, w_out: int, qi: np.ndarray, ri: np.ndarray,
                          compact: bool = False) -> _Geometry:
        """One image per chunk, as kw column-shifted copies with a row pitch of whole vectors.

        Output row pitch = input row pitch = 16 * ceil(w_out / 16), so every load of the shift
        kernel is 64-byte aligned (measured 2x the multiply speed of the padded-pitch layout,
        whose taps j = 1, 2 read across cache lines); junk is only the rounding of w_out.

        ``compact``: the pitch is w_out itself, so the grid is the output plane (im2col rows).
        For narrow maps (w_out <= 8) whole-vector rows would be mostly junk: a 4x4 output used
        a quarter of every vector. Unaligned loads cost less than that (batch 1, Xeon AVX-512,
        90 % unstructured: 512->512 at 4x4 977 -> 645 us on one thread, 256->256 at 8x8
        478 -> 354 us)."""
        wt = self.w
        sh = self.spec.stride[0]
        pitch = w_out if compact else -(-w_out // _LANES) * _LANES
        hq = (self.spec.dilation[0] * (wt.kh - 1)) // sh + h_out
        copy_size = wt.c * sh * hq * pitch
        chunk_in = wt.kw * copy_size
        offs = wt.tap_j * copy_size + ((wt.chan * sh + ri) * hq + qi) * pitch
        offs = native.check_offsets(offs.astype(np.int64))
        run = -(-(h_out * pitch) // _LANES) * _LANES
        return _Geometry(n, n, 1, h_out, w_out, hq, pitch, run, chunk_in, offs, copy_size)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
        wt = self.w
        wt.check_input(x)
        n, _, h, w = x.shape
        g = self._geometry(n, h, w)
        sh, sw = self.spec.stride
        pt, pl = self.spec.padding[0], self.spec.padding[1]
        par = nc.parallel(wt.vals.size * g.run * g.nb)
        if epilogue_ok((n, wt.o, g.h_out, g.w_out), residual):
            threads = numba_threads() if par else 1
            call = self._one_call(g, n, h, w, threads, residual is not None or relu)
            if call is not None:
                return self._run_one_call(call, g, x, n, h, w, residual, relu, threads)
        if g.copy_size < 0:  # see _view_geometry
            packed = x.numpy().reshape(-1)
        elif g.copy_size:
            packed = nc.workspace(0, g.nb * g.chunk_in + _LANES)  # a compact run's last vector reads past
            native.pack_shifted(par)(x.numpy(), packed, wt.kw, sh, sw, self.spec.dilation[1], pt, pl, g.hq, g.wq,
                                     g.copy_size, g.chunk_in)
        elif g.nchunk == 1 and sh == sw == 1:
            # One image per chunk, no stride phases: the packed layout is just the zero-padded
            # input. Its padding is written once (a buffer of this layer and shape), so a call
            # only copies the data in: 2-6x faster than torch's pad, which re-pads every call.
            size = g.nb * g.chunk_in
            if size * 4 <= _OWN_PAD_BYTES:
                packed = nc.zeroed_workspace((self._uid, n, h, w), size)
                nc.pad_interior(par)(x.numpy(), packed, pt, pl, g.hq, g.wq)
            else:
                packed = F.pad(x, (pl, g.wq - w - pl, pt, g.hq - h - pt)).numpy().reshape(-1)
        else:
            packed = nc.workspace(0, g.nb * g.chunk_in)
            pack = native.pack_phases(par) if native.available() else nc.pack(par)
            pack(x.numpy(), packed, g.nchunk, sh, sw, pt, pl, g.hq, g.wq, g.chunk_in)
        return wt.multiply_unpack(packed, g, n, g.wq, par, residual, relu)


    def _one_call(self, g: _Geometry, n: int, h: int, w: int, threads: int,
                  epilogue: bool) -> native_layer.ConvCall | None:
        """The whole layer as one compiled call (see swat_native.layer), for the layouts it
        knows: the input read in place, the padded input, the shifted copies. None otherwise
        (stride phases, several images per chunk): those keep the step-by-step path."""
        key = (n, h, w, threads, epilogue)
        if key in self._calls:
            return self._calls[key]
        call = None
        sh, sw = self.spec.stride
        # On unless SWAT_LAYER_CALL=0: at batch 1, 2 threads it measured 1.2-1.5x the step-by-step
        # numba path per layer (which also stalled for milliseconds on some layers).
        if _layer_call_enabled() and g.nchunk == 1:
            # Several images: one image per item, packed into its thread's own buffer (see
            # swat_conv_f32's per_image mode); one image: all threads share its rows and tiles.
            per_image = n > 1 and n >= threads
            if g.copy_size < 0:
                layout, epi = "view", True
            elif g.copy_size > 0:
                layout, epi = "shifted", True
            elif sh == sw == 1 and 4 * (threads if per_image else g.nb) * g.chunk_in <= _OWN_PAD_BYTES:
                layout, epi = "padded", g.wq % _LANES == 0
            else:
                layout = None
            if layout is not None:
                wt = self.w
                rows = wt.indptr.shape[0] - 1
                ntg, tg, nrg = native.split(g.run, g.nb, rows, threads)
                call = native_layer.ConvCall(
                    wt.indptr.astype(np.int32), native.check_offsets(g.offs), wt.vals, wt.bias,
                    B=wt.block, rows=rows, layout=native_layer.LAYOUTS[layout], n=n, c_in=wt.c, h=h, w=w, o=wt.o,
                    h_out=g.h_out, w_out=g.w_out, pt=self.spec.padding[0], pl=self.spec.padding[1], hq=g.hq,
                    wq=g.wq, kw=wt.kw, sh=sh, sw=sw, dw=self.spec.dilation[1], copy_size=max(g.copy_size, 0),
                    chunk_in=g.chunk_in, run=g.run, pitch=g.wq, ntg=ntg, tg=tg, nrg=nrg, epi=int(epi),
                    per_image=int(per_image), slot_packed=g.chunk_in + _LANES)
        if len(self._calls) >= 4 * _MAX_SHAPES:
            self._calls.pop(next(iter(self._calls)))
        self._calls[key] = call
        return call

    def _run_one_call(self, call: native_layer.ConvCall, g: _Geometry, x: torch.Tensor, n: int, h: int, w: int,
                      residual: torch.Tensor | None, relu: bool, threads: int) -> torch.Tensor:
        wt = self.w
        a = call.args
        # per-image mode: one buffer slot per thread (slot_packed floats apart), else every image
        images = threads if a.per_image else g.nb
        if a.layout == native_layer.LAYOUTS["padded"]:
            # the padding is zeroed once per buffer; calls only ever write the interior
            size = (threads * a.slot_packed) if a.per_image else g.nb * g.chunk_in
            packed = nc.zeroed_workspace((self._uid, n, h, w, threads), size).ctypes.data
        elif a.layout == native_layer.LAYOUTS["shifted"]:
            packed = nc.workspace(0, images * a.slot_packed if a.per_image else g.nb * g.chunk_in + _LANES).ctypes.data
        else:
            packed = 0
        scratch = 0 if a.epi else nc.workspace(1, images * wt.o * g.run).ctypes.data
        y = torch.empty((n, wt.o, g.h_out, g.w_out), dtype=torch.float32)
        call(x.data_ptr(), y.data_ptr(), 0 if residual is None else residual.data_ptr(), relu, packed, scratch,
             native.isa_code(), threads)
        return y


def _is_plain_1x1(spec: LayerSpec) -> bool:
    return (spec.weight_shape[2:] == (1, 1) and spec.stride == (1, 1) and spec.padding == (0, 0, 0, 0)
            and spec.dilation == (1, 1))


class CsrDirectKernel:
    """numba direct sparse conv over shifted input views (any stride, padding, dilation, groups)."""

    name = "csr_direct"
    thread_pool = "native"  # the one-call layer (swat_native.layer); numba only for layouts it lacks
    rule_min_sparsity = 0.8

    def supports(self, spec: LayerSpec) -> bool:
        return spec.kind == "conv2d"

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec) -> _CsrDirectConv:
        return _CsrDirectConv(weight, bias, spec)
