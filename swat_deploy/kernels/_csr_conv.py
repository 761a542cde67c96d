"""What the CSR conv kernels share: the weight as (block) CSR plus, per non-zero, which input
channel and kernel tap it multiplies (fixed for the layer, computed once), and the multiply
step that runs the compiled shift loop (`native.shift_rows`) over it.

Blocks: when B consecutive output channels share one zero pattern (``spec.block``), the
rows are block rows of B channels and each stored non-zero carries B values, so one input
load feeds B multiply-adds. B = 1 is plain CSR."""
from __future__ import annotations

import numpy as np
import torch

from ..formats import to_csr
from . import _numba_common as nc
import swat_native as native
from swat_deploy.threads import numba_threads
from .base import LayerSpec, add_relu_


class CsrConvWeights:
    """CSR over the (O, I/g * kh * kw) view, with per-non-zero channel / tap decomposition."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec) -> None:
        o, cg, kh, kw = spec.weight_shape
        self.spec = spec
        self.o, self.cg, self.kh, self.kw = o, cg, kh, kw
        self.c = cg * spec.groups
        self.block = block = spec.block if native.available() else 1
        indptr, col, self.vals, self.nbytes = block_csr(weight.reshape(o, -1), block)
        self.indptr = indptr
        row = np.repeat(np.arange(o // block, dtype=np.int64) * block, np.diff(indptr.astype(np.int64)))
        self.chan = (row // (o // spec.groups)) * cg + col // (kh * kw)  # global input channel
        self.tap_i = (col // kw) % kh
        self.tap_j = col % kw
        self.bias = np.zeros(o, np.float32) if bias is None else bias.detach().float().contiguous().numpy()

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.c:
            raise ValueError(f"conv expects input (N, {self.c}, H, W), got {tuple(x.shape)}")

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        sh, sw = self.spec.stride
        dh, dw = self.spec.dilation
        pt, pl, pb, pr = self.spec.padding
        h_out = (h + pt + pb - dh * (self.kh - 1) - 1) // sh + 1
        w_out = (w + pl + pr - dw * (self.kw - 1) - 1) // sw + 1
        if h_out < 1 or w_out < 1:
            raise ValueError(f"conv input {h}x{w} is smaller than the dilated kernel; check the model's input size")
        return h_out, w_out

    def _multiply_into(self, packed: np.ndarray, g, n: int, row_width: int, par: bool,
                       residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
        """One image per chunk, compiled kernels: the multiply writes the NCHW result itself
        (junk lanes dropped, residual and ReLU applied in registers), see native.shift_rows_into."""
        plane = g.h_out * g.w_out
        yn = np.empty(n * self.o * plane, np.float32)
        res = yn if residual is None else residual.numpy().reshape(-1)
        threads = numba_threads() if par else 1
        ntg, tg, nrg = native.split(g.run, g.nb, self.indptr.shape[0] - 1, threads)
        native.shift_rows_into(par)(native.isa_code(), self.indptr, native.check_offsets(g.offs), self.vals,
                                    self.bias, packed, g.chunk_in, yn, res, residual is not None, int(relu),
                                    row_width, g.w_out, plane, g.run, g.nb, self.block, ntg, tg, nrg)
        return torch.from_numpy(yn).view(n, self.o, g.h_out, g.w_out)

    def multiply_unpack(self, packed: np.ndarray, g, n: int, row_width: int, par: bool,
                        residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
        """CSR x packed input chunks, then back to NCHW; the step both conv layouts end with.

        ``row_width`` is the width of one output row in the packed result (the padded input width
        for the direct kernel, ``w_out`` for im2col). ``residual`` (NCHW like the output) and
        ``relu`` are applied while unpacking (see `fused_epilogue`).
        """
        # Written straight into y when each vector of the grid lies in one output row (pitch a
        # multiple of 16, or the grid is the plane): then the epilogue is one masked store. With
        # other pitches a vector spans rows and the piecewise stores cost more than the unpack
        # pass (measured 40-80 us vs 11-16 us on a 64x32x32 output).
        if native.available() and g.nchunk == 1 and epilogue_ok((n, self.o, g.h_out, g.w_out), residual) \
                and (row_width % 16 == 0 or row_width == g.w_out):
            return self._multiply_into(packed, g, n, row_width, par, residual, relu)
        out = nc.workspace(1, g.nb * self.o * g.run)
        shift_multiply(self.indptr, g.offs, self.vals, self.bias, packed, g.chunk_in, out, g.run, g.nb,
                       self.block, par)
        yn = np.empty((n, self.o, g.h_out, g.w_out), np.float32)
        if not epilogue_ok(yn.shape, residual):  # a broadcast residual: add it in torch
            return add_relu_(self.multiply_unpack(packed, g, n, row_width, par), residual, relu)
        mode = (1 if residual is not None else 0) | (2 if relu else 0)
        res = yn if residual is None else residual.numpy()
        if g.nchunk == 1:
            nc.unpack1(par)(out, yn.reshape(-1), n * self.o, g.h_out, g.w_out, row_width, g.run,
                            res.reshape(-1), mode)
        else:
            nc.unpack(par)(out, yn, g.nchunk, row_width, g.run, res, mode)
        return torch.from_numpy(yn)


def epilogue_ok(y_shape: tuple[int, ...], residual: torch.Tensor | None) -> bool:
    """Whether a residual can be added inside the unpack loop (same shape, float32, contiguous)."""
    return residual is None or (tuple(residual.shape) == tuple(y_shape) and residual.dtype == torch.float32
                                and residual.is_contiguous())


def block_csr(w2: torch.Tensor, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(indptr, block column per non-zero block, values (nnzb * block) row-major, stored bytes)
    of the (O, K) matrix `w2` in row blocks of `block` rows sharing one zero pattern.

    A block is stored if any of its `block` values is non-zero, so a weight without block
    structure is still computed exactly (only with more stored zeros)."""
    if block == 1:
        csr = to_csr(w2)
        return (csr.indptr.numpy(), csr.indices.numpy().astype(np.int64), csr.values.numpy(), csr.nbytes)
    o, k = w2.shape
    if o % block:
        raise ValueError(f"block {block} does not divide the {o} output channels")
    wb = w2.detach().float().reshape(o // block, block, k).numpy()
    keep = (wb != 0).any(axis=1)  # (O/B, K)
    rb, col = np.nonzero(keep)
    indptr = np.zeros(o // block + 1, np.int32)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    vals = np.ascontiguousarray(wb[rb, :, col], dtype=np.float32).reshape(-1)  # (nnzb, B) row-major
    nbytes = vals.nbytes + 4 * col.size + indptr.nbytes
    return indptr, col.astype(np.int64), vals, nbytes


def shift_multiply(indptr: np.ndarray, offs: np.ndarray, vals: np.ndarray, bias: np.ndarray,
                   packed: np.ndarray, chunk_in: int, out: np.ndarray, run: int, nb: int,
                   block: int, par: bool) -> None:
    """out[b, r*B + j, 0:run] = bias + sum_k vals[k*B + j] * packed[b*chunk_in + offs[k] : +run].

    The compiled loop when it is built (see `native`), else the numba one (block 1 only)."""
    if native.available():
        threads = numba_threads() if par else 1
        ntg, tg, nrg = native.split(run, nb, indptr.shape[0] - 1, threads)
        native.shift_rows(par)(native.isa_code(), indptr, native.check_offsets(offs), vals, bias, packed,
                               chunk_in, out, run, nb, block, ntg, tg, nrg)
        return
    if block != 1:
        raise ValueError("block kernels need the compiled extension; reinstall with `pip install -e .`")
    nc.csr_shift_rows(par)(indptr, offs, vals, bias, packed, chunk_in, out, run, nb)
