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

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..formats import to_csr
from . import _numba_common as nc
from .base import LayerSpec

# A batch chunk's packed input should stay in the per-core L2 (1 MiB on the machine measured):
# every output channel of the chunk re-reads it. Nc images per chunk are as many as fit.
_CHUNK_BYTES = 384 * 1024
_MAX_SHAPES = 8
_LANES = 16


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


class _CsrDirectConv:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec) -> None:
        o, cg, kh, kw = spec.weight_shape
        self.csr = to_csr(weight)
        self.nbytes = self.csr.nbytes
        self.spec = spec
        self.o, self.cg, self.kh, self.kw = o, cg, kh, kw
        self.c = cg * spec.groups
        self.indptr = self.csr.indptr.numpy()
        self.vals = self.csr.values.numpy()
        col = self.csr.indices.numpy().astype(np.int64)
        counts = np.diff(self.indptr.astype(np.int64))
        row = np.repeat(np.arange(o, dtype=np.int64), counts)
        # Per non-zero: global input channel and tap position; fixed for the layer.
        self.chan = (row // (o // spec.groups)) * cg + col // (kh * kw)
        self.tap_i = (col // kw) % kh
        self.tap_j = col % kw
        self.bias = (np.zeros(o, np.float32) if bias is None else bias.detach().float().contiguous().numpy())
        self._geo: dict[tuple[int, int, int], _Geometry] = {}
        if spec.input_shape is not None:
            nc.warm_up(self, spec.input_shape)

    def _geometry(self, n: int, h: int, w: int) -> _Geometry:
        key = (n, h, w)
        g = self._geo.get(key)
        if g is not None:
            return g
        sh, sw = self.spec.stride
        dh, dw = self.spec.dilation
        pt, pl, pb, pr = self.spec.padding
        hp, wp = h + pt + pb, w + pl + pr
        h_out = (hp - dh * (self.kh - 1) - 1) // sh + 1
        w_out = (wp - dw * (self.kw - 1) - 1) // sw + 1
        if h_out < 1 or w_out < 1:
            raise ValueError(f"conv input {h}x{w} is smaller than the dilated kernel; check the model's input size")
        qi, ri = np.divmod(self.tap_i * dh, sh)
        qj, rj = np.divmod(self.tap_j * dw, sw)
        wq = -(-wp // sw)
        qi_max = (dh * (self.kh - 1)) // sh
        hq = max(-(-hp // sh), qi_max + h_out) + 1  # +1 row: junk columns of the last row read past it
        image_bytes = 4 * self.c * sh * sw * hq * wq
        nchunk = int(min(n, max(1, _CHUNK_BYTES // image_bytes)))
        nb = -(-n // nchunk)
        phase_sz = hq * wq * nchunk
        offs = (((self.chan * sh + ri) * sw + rj) * phase_sz + (qi * wq + qj) * nchunk)
        chunk_in = self.c * sh * sw * phase_sz
        run = -(-(h_out * wq * nchunk) // _LANES) * _LANES
        offs = offs.astype(np.int32 if chunk_in * nb + run < 2**31 else np.int64)
        g = _Geometry(n, nb, nchunk, h_out, w_out, hq, wq, run, chunk_in, offs)
        if len(self._geo) >= _MAX_SHAPES:
            self._geo.pop(next(iter(self._geo)))
        self._geo[key] = g
        return g

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.c:
            raise ValueError(f"conv expects input (N, {self.c}, H, W), got {tuple(x.shape)}")
        n, _, h, w = x.shape
        g = self._geometry(n, h, w)
        sh, sw = self.spec.stride
        pt, pl = self.spec.padding[0], self.spec.padding[1]
        xn = x.numpy()
        # + run: the last rows' junk columns (rounded up to whole vectors) read past the end;
        # what they read only lands in junk columns, so that tail is never initialised.
        packed = nc.workspace(0, g.nb * g.chunk_in + g.run)
        out = nc.workspace(1, g.nb * self.o * g.run)
        y = np.empty((n, self.o, g.h_out, g.w_out), np.float32)
        par = nc.parallel(self.vals.size * g.run * g.nb)
        nc.pack(par)(xn, packed, g.nchunk, sh, sw, pt, pl, g.hq, g.wq, g.chunk_in)
        nc.csr_shift_rows(par)(self.indptr, g.offs, self.vals, self.bias, packed, g.chunk_in, out, g.run, g.nb)
        nc.unpack(par)(out, y, g.nchunk, g.wq, g.run)
        return torch.from_numpy(y)


class CsrDirectKernel:
    """numba direct sparse conv over shifted input views (any stride, padding, dilation, groups)."""

    name = "csr_direct"
    rule_min_sparsity = 0.8

    def supports(self, spec: LayerSpec) -> bool:
        return spec.kind == "conv2d" and nc.available()

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec) -> _CsrDirectConv:
        return _CsrDirectConv(weight, bias, spec)
