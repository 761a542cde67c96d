"""ReLU and max-pool layers whose saved-for-backward state is small.

A plain ``nn.ReLU`` saves its dense output (the very tensor the next conv reads), so
:class:`SwatReLU` saves only the bitmask of ``output > 0``; :class:`SwatMaxPool2d` saves the
argmax as a window offset (1 byte) instead of the dense input plus int64 indices. swatify
installs both in swat / saw mode.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.memory.packing import kernels_for, masked_grad, positive_bits


class _MaskReLUFn(torch.autograd.Function):
    """ReLU that keeps 1 bit per element for backward instead of its dense output."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, inplace: bool) -> Tensor:  # type: ignore[override]
        k = kernels_for(x) if x.is_contiguous() else None
        if k is not None:  # one pass: relu and its bitmask together
            y = x if inplace else torch.empty_like(x)
            bits = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
            k.relu_pack(x.detach().view(-1).numpy(), y.detach().view(-1).numpy(), bits.numpy())
            if inplace:
                ctx.mark_dirty(x)
        else:
            if inplace:
                y = x.relu_()
                ctx.mark_dirty(x)
            else:
                y = torch.relu(x)
            bits, _ = positive_bits(y)
        ctx.save_for_backward(bits)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (bits,) = ctx.saved_tensors
        return masked_grad(grad, bits), None


def _training_step(module: nn.Module, x: Tensor) -> bool:
    return module.training and torch.is_grad_enabled() and x.requires_grad


class SwatReLU(nn.ReLU):
    """``nn.ReLU`` whose backward state is a bitmask (installed by swatify in swat/saw mode)."""

    def forward(self, x: Tensor) -> Tensor:
        if not _training_step(self, x):
            return super().forward(x)
        return _MaskReLUFn.apply(x, self.inplace)


# ------------------------------------------------------------------------------- MaxPool
def _pool_geometry(x_hw: tuple[int, int], out_hw: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
    h0 = (torch.arange(out_hw[0], device=device) * stride[0] - padding[0]).view(-1, 1)
    w0 = (torch.arange(out_hw[1], device=device) * stride[1] - padding[1]).view(1, -1)
    return h0, w0


class _CompactMaxPoolFn(torch.autograd.Function):
    """2-D max pool that saves the argmax as an offset inside its window (1 byte per output)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, kernel: tuple[int, int], stride: tuple[int, int],  # type: ignore[override]
                padding: tuple[int, int], dilation: tuple[int, int], ceil_mode: bool) -> Tensor:
        out, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        H, W = x.shape[-2:]
        h0, w0 = _pool_geometry((H, W), out.shape[-2:], stride, padding, x.device)
        kh = torch.div(idx // W - h0, dilation[0], rounding_mode="floor")
        kw = torch.div(idx % W - w0, dilation[1], rounding_mode="floor")
        window = kernel[0] * kernel[1]
        dtype = torch.uint8 if window <= 256 else (torch.int16 if window <= 32767 else torch.int32)
        offsets = (kh * kernel[1] + kw).to(dtype)
        ctx.save_for_backward(offsets)
        ctx.geom = (x.shape, kernel, stride, padding, dilation)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (offsets,) = ctx.saved_tensors
        shape, kernel, stride, padding, dilation = ctx.geom
        H, W = shape[-2:]
        h0, w0 = _pool_geometry((H, W), grad.shape[-2:], stride, padding, grad.device)
        off = offsets.to(torch.int64)
        h = h0 + torch.div(off, kernel[1], rounding_mode="floor") * dilation[0]
        w = w0 + (off % kernel[1]) * dilation[1]
        idx = (h * W + w).reshape(shape[0], shape[1], -1)
        gi = torch.zeros(shape[0], shape[1], H * W, dtype=grad.dtype, device=grad.device)
        gi.scatter_add_(2, idx, grad.reshape(shape[0], shape[1], -1))
        return gi.view(shape), None, None, None, None, None


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class SwatMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose backward state is a 1-byte window offset per output element."""

    def forward(self, x: Tensor) -> Tensor:
        if self.return_indices or not _training_step(self, x) or x.dim() not in (3, 4):
            return super().forward(x)
        unbatched = x.dim() == 3
        xb = x.unsqueeze(0) if unbatched else x
        stride = self.stride if self.stride is not None and self.stride != [] else self.kernel_size
        out = _CompactMaxPoolFn.apply(xb, _pair(self.kernel_size), _pair(stride), _pair(self.padding),
                                      _pair(self.dilation), bool(self.ceil_mode))
        return out.squeeze(0) if unbatched else out
