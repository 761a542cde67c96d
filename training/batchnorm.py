"""A BatchNorm2d whose CPU float32 training passes run in compiled C.

Once SWAT's sparse products had shrunk, torch's CPU batch norm was the largest single cost of a
ResNet-20 SWAT step: on NCHW float32 it ran a 64 x 16 x 32 x 32 batch in ~2.4-2.8 ms forward and
~4.5 ms backward at one thread (AMD EPYC Zen 3), ~74 of a ~240 ms step, against ~0.6 and ~0.9 ms
for the channel-at-a-time passes of ``swat_native/csrc/bn_f32.c``. :class:`SwatBatchNorm2d` is an
``nn.BatchNorm2d`` (same parameters, buffers and state dict) that takes that path in training
mode for contiguous CPU float32 input and defers to torch everywhere else (eval, other devices
and dtypes, channels-last input, a build without the library). swatify installs it;
unswatify puts the plain class back, so exporters and pruning see ``nn.BatchNorm2d``.

Semantics are torch's: batch statistics normalise (biased variance), the running variance is
updated with the unbiased one, ``momentum=None`` is the cumulative average, and
``num_batches_tracked`` counts steps. Results match torch's to float rounding (the sums are
ordered differently), and are deterministic whatever the thread count.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from swat_native.bits import PARALLEL_MIN
from training.memory.packing import native_available

__all__ = ["SwatBatchNorm2d"]


def _np(t: Optional[Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.detach().numpy()


def _parts(c: int, numel: int) -> int:
    """Threads for a pass: torch's count, one below PARALLEL_MIN elements (as the bitmask passes)."""
    return 1 if numel < PARALLEL_MIN else max(1, min(torch.get_num_threads(), c))


class _BatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],  # type: ignore[override]
                running_mean: Optional[Tensor], running_var: Optional[Tensor], factor: float, eps: float) -> Tensor:
        import swat_native
        from swat_native import batchnorm

        n, c = x.shape[:2]
        y = torch.empty_like(x)
        mean, var, invstd = (np.empty(c, np.float32) for _ in range(3))
        code, parts = swat_native.isa_code(), _parts(c, x.numel())
        batchnorm.forward(code, x.detach().numpy(), y.numpy(), _np(weight), _np(bias), eps, mean, var, invstd, parts)
        if running_mean is not None and running_var is not None:
            m = x.numel() // c
            with torch.no_grad():
                running_mean.mul_(1.0 - factor).add_(torch.from_numpy(mean), alpha=factor)
                running_var.mul_(1.0 - factor).add_(torch.from_numpy(var), alpha=factor * m / max(1, m - 1))
        mean_t, invstd_t = torch.from_numpy(mean), torch.from_numpy(invstd)
        ctx.save_for_backward(x, weight, mean_t, invstd_t)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        import swat_native
        from swat_native import batchnorm

        x, weight, mean, invstd = ctx.saved_tensors
        dy = dy.contiguous()
        c = x.shape[1]
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dgamma, dbeta = np.empty(c, np.float32), np.empty(c, np.float32)
        batchnorm.backward(swat_native.isa_code(), x.numpy(), dy.numpy(), _np(dx), _np(weight), mean.numpy(),
                           invstd.numpy(), dgamma, dbeta, _parts(c, x.numel()))
        gw = torch.from_numpy(dgamma) if weight is not None and ctx.needs_input_grad[1] else None
        gb = torch.from_numpy(dbeta) if ctx.needs_input_grad[2] else None
        return dx, gw, gb, None, None, None, None


class SwatBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with compiled CPU float32 training passes (module docstring)."""

    def _fast(self, x: Tensor) -> bool:
        return (self.training and x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu"
                and x.is_contiguous() and x.shape[0] * x.shape[2] * x.shape[3] > 1
                and (self.weight is None or self.weight.dtype == torch.float32) and native_available())

    def forward(self, x: Tensor) -> Tensor:
        if not self._fast(x):
            return super().forward(x)
        # torch's BatchNorm bookkeeping, unchanged: the factor for the running averages
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        rm = self.running_mean if self.track_running_stats else None
        rv = self.running_var if self.track_running_stats else None
        return _BatchNormFn.apply(x, self.weight, self.bias, rm, rv, float(factor), float(self.eps))
