"""Detecting block structure in a weight: do B consecutive output channels share their zeros?

Block kernels reuse one input load for B output channels, which is only exact when those B
channels have the same zero pattern. Weights trained with ``swat train --block B`` have it by
construction; weights pruned elsewhere may have it too. This runs on every weight when a model
is loaded, so it works on packed bits and stops at the first level that fails.
"""
from __future__ import annotations

from typing import Any

import numpy as np

BLOCK_CANDIDATES: tuple[int, ...] = (16, 8, 4, 2)

__all__ = ["BLOCK_CANDIDATES", "block_size_of", "block_pattern_violations"]


def _nonzero_rows(weight: Any, axis: int) -> tuple[np.ndarray, int, int]:
    """(rows x packed bytes uint8 nonzero pattern per output channel, nonzeros, entries)."""
    if hasattr(weight, "detach"):  # torch tensor, without importing torch here
        weight = weight.detach().cpu().numpy()
    w = np.asarray(weight)
    if w.ndim == 0:
        raise ValueError("block_size_of needs a weight of rank >= 1, got a scalar")
    w = np.moveaxis(w, axis, 0) if axis else w
    nz = (w != 0).reshape(w.shape[0], -1)
    return np.packbits(nz, axis=1), int(np.count_nonzero(nz)), int(nz.size)


def block_size_of(weight: Any, axis: int = 0) -> int:
    """Largest B in (16, 8, 4, 2) whose groups of B consecutive output channels share one zero
    pattern over the whole tensor (B must divide the channel count); 1 if none.

    ``weight``: a torch tensor or numpy array, output channels along ``axis`` (0 for Conv
    (O, I/g, kh, kw) and Gemm (O, I) weights; 1 for a MatMul weight stored as (I, O)).
    A weight without any zero (or all zeros) has nothing to exploit and reports 1.
    """
    rows, nnz, n = _nonzero_rows(weight, axis)
    o = rows.shape[0]
    if o < 2 or nnz == 0 or nnz == n:
        return 1
    best, b = 1, 2
    # level b holds iff level b/2 holds and channel j*b + r equals channel j*b + r + b/2
    while b <= BLOCK_CANDIDATES[0] and o % b == 0:
        g = rows.reshape(o // b, 2, b // 2, rows.shape[1])
        if not np.array_equal(g[:, 0], g[:, 1]):
            break
        best, b = b, b * 2
    return best


def block_pattern_violations(weight: Any, block: int, axis: int = 0) -> int:
    """How many groups of ``block`` consecutive output channels do not share one zero pattern
    (``block`` must divide the channel count; a ragged tail counts as one violation)."""
    rows = _nonzero_rows(weight, axis)[0]
    o = rows.shape[0]
    if block <= 1:
        return 0
    bad = 1 if o % block else 0
    whole = o - o % block
    g = rows[:whole].reshape(whole // block, block, rows.shape[1])
    bad += int((g != g[:, :1]).any(axis=(1, 2)).sum())
    return bad
