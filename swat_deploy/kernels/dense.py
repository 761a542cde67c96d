"""Dense reference kernel: torch's own conv2d / linear (oneDNN / MKL underneath).

It is the baseline every sparse kernel is timed against and the fallback the autotuner
keeps whenever sparsity does not pay, so it must handle every layer the API accepts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LayerSpec


class _DenseConv:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec) -> None:
        self.weight = weight.detach().float().contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        top, left, bottom, right = spec.padding
        self.symmetric = top == bottom and left == right
        # F.pad takes (left, right, top, bottom) for the last two dims.
        self.pad = (left, right, top, bottom)
        self.padding = (top, left)
        self.stride = spec.stride
        self.dilation = spec.dilation
        self.groups = spec.groups
        self.nbytes = self.weight.numel() * 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.symmetric:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        x = F.pad(x, self.pad)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _DenseLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight.detach().float().contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.nbytes = self.weight.numel() * 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class DenseKernel:
    """torch F.conv2d / F.linear on the dense weight."""

    name = "dense"
    rule_min_sparsity = 0.0  # the fallback: always applicable

    def supports(self, spec: LayerSpec) -> bool:
        return spec.kind in ("conv2d", "linear")

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec):  # noqa: ANN201
        if spec.kind == "linear":
            return _DenseLinear(weight, bias)
        return _DenseConv(weight, bias, spec)
