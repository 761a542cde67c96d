"""Baseline: torch's own sparse CSR matmul (MKL sparse BLAS underneath).

Kept as the reference point for the numba kernels and as a candidate the autotuner may
pick on CPUs where MKL's SpMM happens to win. Measured here: breaks even with dense at
77-83 % sparsity for a Linear layer; a conv needs im2col (`F.unfold`) first, which alone
costs 1.5-4x a whole oneDNN conv on batched small images, so for convs it rarely wins.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..formats import to_csr
from .base import LayerSpec


def _csr_tensor(weight2d: torch.Tensor) -> tuple[torch.Tensor, int]:
    c = to_csr(weight2d)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        t = torch.sparse_csr_tensor(c.indptr, c.indices, c.values, size=c.matrix_shape, dtype=torch.float32,
                                    check_invariants=False)  # built by to_csr, valid by construction
    return t, c.nbytes


class _TorchCsrLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.w, self.nbytes = _csr_tensor(weight)
        self.bias = None if bias is None else bias.detach().float().reshape(-1, 1).contiguous()
        self.i = weight.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xt = x.reshape(-1, self.i).t()
        y = self.w @ xt if self.bias is None else torch.addmm(self.bias, self.w, xt)
        return y.t().reshape(*lead, -1)


class _TorchCsrConv:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec) -> None:
        o, cg, kh, kw = spec.weight_shape
        self.groups = spec.groups
        self.og = o // spec.groups
        # One CSR matrix per group: (O/g, C/g*kh*kw), applied to that group's im2col rows.
        mats = [_csr_tensor(weight[g * self.og:(g + 1) * self.og].reshape(self.og, -1)) for g in range(self.groups)]
        self.w = [m for m, _ in mats]
        self.nbytes = sum(b for _, b in mats)
        self.bias = None if bias is None else bias.detach().float().reshape(-1, 1).contiguous()
        top, left, bottom, right = spec.padding
        self.pad = (left, right, top, bottom)
        self.kernel = (kh, kw)
        self.stride, self.dilation = spec.stride, spec.dilation
        self.rows = cg * kh * kw

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        xp = F.pad(x, self.pad)
        h_out = (xp.shape[2] - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        w_out = (xp.shape[3] - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(xp, self.kernel, dilation=self.dilation, stride=self.stride)  # (N, C*kh*kw, L)
        # (C*kh*kw, N*L): one SpMM for the whole batch
        cols = cols.permute(1, 0, 2).reshape(cols.shape[1], -1)
        outs = [self.w[g] @ cols[g * self.rows:(g + 1) * self.rows] for g in range(self.groups)]
        y = outs[0] if self.groups == 1 else torch.cat(outs, 0)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(-1, n, h_out * w_out).permute(1, 0, 2).reshape(n, -1, h_out, w_out).contiguous()


class TorchCsrKernel:
    """torch.sparse CSR @ dense (im2col for convs); a baseline, never chosen by rule."""

    name = "torch_csr"
    rule_min_sparsity = None

    def supports(self, spec: LayerSpec) -> bool:
        return spec.kind in ("conv2d", "linear")

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec):  # noqa: ANN201
        if spec.kind == "linear":
            return _TorchCsrLinear(weight, bias)
        return _TorchCsrConv(weight, bias, spec)
