"""Binding of ``csrc/pool_f32.c``: 2-D max pooling on the extension's thread pool (the
Session's MaxPool; see there for why torch's own pool is not used)."""
from __future__ import annotations

import ctypes
import functools
from typing import Any, Optional, Sequence

import torch

from . import _lib

__all__ = ["maxpool2d"]


@functools.lru_cache(maxsize=1)
def _fn() -> Any:
    lib = _lib()
    fn = None if lib is None else getattr(lib.cdll, "swat_maxpool2d_f32", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_uint64] * 2 + [ctypes.c_int64] * 14
        fn.restype = ctypes.c_int
    return fn


def maxpool2d(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
              pads: Sequence[int], out_hw: Sequence[int], threads: int) -> Optional[torch.Tensor]:
    """Max pool of the float32 (N, C, H, W) ``x``, taps outside the input skipped (``pads``:
    top, left), output ``out_hw``; None when the extension cannot (the caller falls back)."""
    fn = _fn()  # None: an older build without the pool
    if fn is None or x.dtype != torch.float32 or x.dim() != 4:
        return None
    x = x.contiguous()
    n, c, h, w = x.shape
    oh, ow = out_hw
    y = x.new_empty((n, c, oh, ow))
    rc = fn(x.data_ptr(), y.data_ptr(), n * c, h, w, kernel[0], kernel[1], stride[0], stride[1], dilation[0],
            dilation[1], pads[0], pads[1], oh, ow, max(1, threads))
    return None if rc else y
