"""Bindings of ``csrc/bn_f32.c``: BatchNorm's training forward and backward passes over a
contiguous NCHW float32 batch (torch's own ran at 1/10-1/25 of copy speed on one thread; the C
file says why and how).

``parts`` > 1 splits the channels over that many threads (numba ``prange``). Each channel is
computed by one thread start to end, so results do not depend on ``parts``.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np

from . import _lib

__all__ = ["forward", "backward"]


@functools.lru_cache(maxsize=1)
def _fns() -> tuple[Any, Any]:
    cdll = _lib().cdll
    u64, i64, f64 = ctypes.c_uint64, ctypes.c_int64, ctypes.c_double
    fwd = cdll.swat_bn_forward_f32
    fwd.argtypes = [i64, u64, u64, i64, i64, i64, u64, u64, f64, u64, u64, u64, i64, i64]
    fwd.restype = ctypes.c_int
    bwd = cdll.swat_bn_backward_f32
    bwd.argtypes = [i64, u64, u64, u64, i64, i64, i64, u64, u64, u64, u64, u64, i64, i64]
    bwd.restype = ctypes.c_int
    return fwd, bwd


@functools.lru_cache(maxsize=1)
def _par() -> tuple[Any, Any]:
    """numba loops running a pass on `parts` channel ranges (compiled on first use)."""
    from numba import njit, prange

    fwd, bwd = _fns()

    @njit(cache=False, parallel=True)
    def fwd_par(code, x, y, n, c, plane, g, b, eps, mean, var, invstd, parts):  # noqa: ANN001, ANN202
        rc = np.zeros(parts, np.int32)
        for p in prange(parts):
            rc[p] = fwd(code, x, y, n, c, plane, g, b, eps, mean, var, invstd, c * p // parts, c * (p + 1) // parts)
        return rc.min()

    @njit(cache=False, parallel=True)
    def bwd_par(code, x, dy, dx, n, c, plane, g, mean, invstd, dg, db, parts):  # noqa: ANN001, ANN202
        rc = np.zeros(parts, np.int32)
        for p in prange(parts):
            rc[p] = bwd(code, x, dy, dx, n, c, plane, g, mean, invstd, dg, db, c * p // parts, c * (p + 1) // parts)
        return rc.min()

    return fwd_par, bwd_par


def _ptr(a: np.ndarray | None) -> int:
    return 0 if a is None else a.ctypes.data


def forward(code: int, x: np.ndarray, y: np.ndarray, gamma: np.ndarray | None, beta: np.ndarray | None,
            eps: float, mean: np.ndarray, var: np.ndarray, invstd: np.ndarray, parts: int = 1) -> None:
    """y = (x - mean) * invstd * gamma + beta over the batch statistics of ``x`` (n, c, h, w);
    fills ``mean``, ``var`` (biased) and ``invstd`` (float32, length c)."""
    n, c = x.shape[:2]
    plane = x.size // max(1, n * c)
    args = (code, x.ctypes.data, y.ctypes.data, n, c, plane, _ptr(gamma), _ptr(beta), float(eps),
            mean.ctypes.data, var.ctypes.data, invstd.ctypes.data)
    parts = max(1, min(parts, c))
    rc = _par()[0](*args, parts) if parts > 1 else _fns()[0](*args, 0, c)
    if rc != 0:
        raise ValueError(f"batchnorm forward: unknown ISA code {code}")


def backward(code: int, x: np.ndarray, dy: np.ndarray, dx: np.ndarray | None, gamma: np.ndarray | None,
             mean: np.ndarray, invstd: np.ndarray, dgamma: np.ndarray, dbeta: np.ndarray, parts: int = 1) -> None:
    """dgamma, dbeta and (unless ``dx`` is None) dx of the forward above, from its saved
    ``mean`` / ``invstd``."""
    n, c = x.shape[:2]
    plane = x.size // max(1, n * c)
    args = (code, x.ctypes.data, dy.ctypes.data, _ptr(dx), n, c, plane, _ptr(gamma), mean.ctypes.data,
            invstd.ctypes.data, dgamma.ctypes.data, dbeta.ctypes.data)
    parts = max(1, min(parts, c))
    rc = _par()[1](*args, parts) if parts > 1 else _fns()[1](*args, 0, c)
    if rc != 0:
        raise ValueError(f"batchnorm backward: unknown ISA code {code}")
