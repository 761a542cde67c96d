"""CSR linear layer: a row loop over output features, parallel over rows.

Batch 1 is a sparse matrix-vector product (a gather-dot per output row, bound by streaming
the values and indices, so int32 indices matter). For batch N > 1 the input is transposed to
(in_features, N padded to 16) so that every non-zero w[o, i] becomes one contiguous axpy
``y[o, :] += w * x[:, i]`` of length N, done in vector registers (see `_numba_common`). A conv
layer is handled by `csr_direct`, which uses the same row loop over shifted input views.
"""
from __future__ import annotations

import numpy as np
import torch

from ..formats import to_csr
from . import _numba_common as nc
from ._csr_conv import shift_multiply
from .base import LayerSpec

_LANES = 16


class _CsrLinear:
    uses_torch_threads = False  # numba loops; see base.thread_scope

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec) -> None:
        self.csr = to_csr(weight)
        self.nbytes = self.csr.nbytes
        self.o, self.i = spec.weight_shape
        self.indptr = self.csr.indptr.numpy()
        self.cols = self.csr.indices.numpy()
        self.vals = self.csr.values.numpy()
        self.bias = np.zeros(self.o, np.float32) if bias is None else bias.detach().float().contiguous().numpy()
        self._offs: dict[int, np.ndarray] = {}
        if spec.input_shape is not None:
            nc.warm_up(self, spec.input_shape)

    def _offsets(self, pitch: int) -> np.ndarray:
        offs = self._offs.get(pitch)
        if offs is None:
            big = self.i * pitch + pitch >= 2**31
            offs = self.cols.astype(np.int64 if big else np.int32) * pitch
            self._offs = {pitch: offs}  # one batch size at a time is the common case
        return offs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.i:
            raise ValueError(f"linear layer expects {self.i} input features, got input of shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.i)
        n = x2.shape[0]
        par = nc.parallel(self.vals.size * n)
        if n == 1:
            y = np.empty(self.o, np.float32)
            nc.csr_dot(par)(self.indptr, self.cols, self.vals, self.bias, x2.numpy()[0], y)
            return torch.from_numpy(y).reshape(*lead, self.o)
        pitch = -(-n // _LANES) * _LANES
        xt = nc.workspace(0, self.i * pitch)
        nc.transpose_pad(par)(x2.numpy(), xt, pitch)
        out = nc.workspace(1, self.o * pitch)
        shift_multiply(self.indptr, self._offsets(pitch), self.vals, self.bias, xt, 0, out, pitch, 1, 1, par)
        y = torch.from_numpy(out).view(self.o, pitch)[:, :n].t().contiguous()
        return y.reshape(*lead, self.o)


class CsrRowsKernel:
    """numba CSR row loop for linear layers (gather-dot at batch 1, register axpy above)."""

    name = "csr_rows"
    thread_pool = "numba"
    rule_min_sparsity = 0.7

    def supports(self, spec: LayerSpec) -> bool:
        return spec.kind == "linear"

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec) -> _CsrLinear:
        return _CsrLinear(weight, bias, spec)
