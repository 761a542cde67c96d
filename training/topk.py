"""Top-K magnitude selection: which entries of a weight or activation SWAT keeps.

Groups (the paper's Figure 3).  For a tensor of shape (d0, d1, ...):

* ``nchw``   - one group, the whole tensor (whole mini-batch / whole layer);
* ``chw``    - one group per dim-0 slice (per sample for activations, per output filter or
  output neuron for weights);
* ``hw``     - one group per (d0, d1) slice for tensors of 3+ dims (per sample and channel, per
  filter and input channel); for 2-D tensors (Linear) per row, like ``chw``;
* ``random`` - the null hypothesis (the paper's): k entries of the whole tensor drawn uniformly
  at random among *all* its entries, zeros included, for weights and activations alike.

Every group keeps exactly ``keep_count(group_size, sparsity)`` entries - except ``hw`` on
tensors of 3+ dims, whose groups are small (a 3x3 kernel slice has 9 entries: 70 % would keep
round(2.7) = 3, i.e. 66.7 % sparsity).  ``hw`` therefore keeps the *layer's* count
``K = keep_count(numel, sparsity)``: every group keeps ``b = max(1, K // G)`` entries and the
``K - b * G`` remaining places (if any) go to the groups whose (b+1)-th largest magnitude is
largest (ties: lowest group index).  Where per-group rounding is already within 0.5 % of ``K``
(groups of a few hundred entries, e.g. 28x28 activation maps) the plain per-group count is kept:
the difference is negligible and the balanced rule needs a full sort.  The realised sparsity then matches the requested one
whenever ``K >= G`` (at most one entry per group apart); above that (e.g. 3x3 at 95 %) every
group still keeps one entry and the realised sparsity is lower than requested.

Tie rule (shared by training, pruning and eval): entries strictly above the group's K-th
largest magnitude are kept; entries *equal* to it fill the remaining places in increasing
flat (row-major, contiguous) index order - the lowest index wins.  The selection is therefore
a pure function of the values, whatever the backend.

Weights under ``random``: in training a SWAT / SAW layer draws a fresh random weight mask every
step (same kept count as Top-K) - the paper's control.  A mask that changes every step has no
inference form to prune to, so :func:`topk_weight` (eval, pruning, export) keeps using the
magnitude ``nchw`` selection under ``random``; the random control is meant for SAW (dense
forward, as in the paper's Figure 3), where the inference form is the dense weight anyway.
Activations under ``random`` are drawn among all entries; with ``drop_zeros`` the exact zeros
among the drawn ones are then not stored (a zero contributes nothing to the product), so after
a ReLU fewer than k values are kept - the selection itself is blind to the values.

Threshold caching: :func:`select_bits` accepts a cached threshold instead of computing the
K-th magnitude; it then keeps ``|x| >= t`` and never keeps exact zeros (after a ReLU, ``t`` is
0 whenever more than ``1 - sparsity`` of the entries are zero - keeping them would store
zeros for nothing).  With ``drop_zeros`` the exact path drops zero entries too.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from training.memory import packing
from training.config import TOPK_VARIANTS
from training.errors import SwatError

__all__ = ["SwatValueError", "TOPK_VARIANTS", "keep_count", "hw_counts", "topk_mask", "kth_magnitude", "group_layout",
           "Selection", "select_bits", "check_sparsity", "check_topk"]


class SwatValueError(SwatError, ValueError):
    """A bad SWAT argument: a ValueError to API callers, a one-line error (exit 2) to the CLI,
    whose ``handled`` wrapper turns SwatError - not ValueError - into a message."""


def check_topk(topk: str) -> str:
    if topk not in TOPK_VARIANTS:
        raise SwatValueError(f"unknown topk variant {topk!r}; choose one of: {', '.join(TOPK_VARIANTS)}")
    return topk


def check_sparsity(sparsity: float, *, allow_one: bool = False) -> float:
    ok = isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and math.isfinite(sparsity)
    hi_ok = ok and (sparsity <= 1.0 if allow_one else sparsity < 1.0)
    if not (ok and sparsity >= 0.0 and hi_ok):
        rng = "[0, 1]" if allow_one else "[0, 1)"
        raise SwatValueError(f"sparsity must be a number in {rng} (fraction of zeros), got {sparsity!r}; e.g. 0.7")
    return float(sparsity)


def keep_count(n: int, sparsity: float) -> int:
    """Entries kept out of ``n``: round((1 - s) * n), half up, at least 1 if n > 0 and s < 1.

    At least one survivor keeps every group (a 1x1 kernel slice, a tiny row) trainable.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise SwatValueError(f"n must be a non-negative integer, got {n!r}")
    s = check_sparsity(sparsity, allow_one=True)
    k = int(math.floor((1.0 - s) * n + 0.5))
    if n > 0 and s < 1.0:
        k = max(k, 1)
    return min(k, int(n))


def group_layout(shape: torch.Size | tuple[int, ...], topk: str) -> tuple[int, int, tuple[int, ...]]:
    """(number of groups, group size, threshold shape) of a ``topk`` variant on ``shape``."""
    check_topk(topk)
    numel = int(np.prod(shape)) if len(shape) else 1
    if topk in ("nchw", "random") or len(shape) < 2:
        return 1, numel, ()
    if topk == "chw" or len(shape) == 2:
        return int(shape[0]), (numel // shape[0]) if shape[0] else 0, (int(shape[0]),)
    g = int(shape[0]) * int(shape[1])
    return g, (numel // g) if g else 0, (int(shape[0]), int(shape[1]))


class Selection:
    """A chosen subset of a tensor: packed bitmask (or bool mask), its size, and thresholds.

    Kept lazily in whichever form the backend produced, so the fast path never materialises
    a dense bool mask and the torch path never packs bits it does not need.
    """

    __slots__ = ("_bits", "_mask", "count", "thresholds", "shape")

    def __init__(self, shape: torch.Size, count: int, thresholds: Optional[Tensor],
                 bits: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> None:
        self.shape = shape
        self.count = count
        self.thresholds = thresholds
        self._bits = bits
        self._mask = mask

    @property
    def bits(self) -> Tensor:
        if self._bits is None:
            self._bits = packing.pack_bits(self._mask)
        return self._bits

    @property
    def mask(self) -> Tensor:
        if self._mask is None:
            self._mask = packing.unpack_bits(self._bits, int(np.prod(self.shape))).view(self.shape)
        return self._mask


def _exact_numba(k_mod, x: Tensor, G: int, m: int, k: int, thr_shape: tuple[int, ...],
                 drop_zeros: bool) -> Selection:
    xf = packing.flat_np(x)
    thr_bits = np.empty(G, dtype=np.uint32)
    n_gt = np.empty(G, dtype=np.int64)
    n_eq = np.empty(G, dtype=np.int64)
    k_mod.kth_largest_abs_rows(xf.view(np.uint32), G, k, thr_bits, n_gt, n_eq)
    thr = thr_bits.view(np.float32)
    need = k - n_gt
    bits = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
    zero_thr = thr == 0
    # no excess ties (or ties only at zero, which drop_zeros refuses): a plain compare is exact
    simple = (n_gt + n_eq == k) | (zero_thr & drop_zeros)
    if simple.all():
        # |x| > cut  <=>  |x| >= thr; at thr == 0 either refuse zeros or (k == m) keep everything
        at_zero = np.float32(0) if drop_zeros else np.float32(-1)
        cut = np.where(zero_thr, at_zero, np.nextafter(thr, np.float32(0))).astype(np.float32)
        cnt = k_mod.pack_gt(xf, cut, m, G, bits.numpy())
    else:
        cnt = k_mod.pack_exact(xf, thr.copy(), need.copy(), m, G, drop_zeros, bits.numpy())
    thresholds = torch.from_numpy(thr.copy()).view(thr_shape)
    return Selection(x.shape, int(cnt), thresholds, bits=bits)


def _exact_torch(x: Tensor, G: int, m: int, k: int, thr_shape: tuple[int, ...], drop_zeros: bool) -> Selection:
    a = x.detach().abs().reshape(G, m)
    t = torch.kthvalue(a, m - k + 1, dim=1).values
    gt = a > t[:, None]
    eq = a == t[:, None]
    need = k - gt.sum(1, keepdim=True)
    take = eq & (eq.cumsum(1) <= need)
    mask = gt | take
    if drop_zeros:
        mask &= a != 0
    return Selection(x.shape, int(mask.sum()), t.view(thr_shape), mask=mask.view(x.shape))


def _cached(x: Tensor, threshold: Tensor) -> Selection:
    """Keep ``|x| >= t`` and non-zero, with ``t`` of shape () or x.shape[1:1+t.dim()]."""
    t = threshold.detach().to(device=x.device, dtype=x.dtype)
    tail = int(np.prod(x.shape[1 + t.dim():])) if t.dim() else x.numel()
    period = t.numel() if t.dim() else 1
    if t.dim() and tuple(t.shape) != tuple(x.shape[1:1 + t.dim()]):
        raise SwatValueError(f"cached threshold shape {tuple(t.shape)} does not fit input {tuple(x.shape)}")
    k_mod = packing.kernels_for(x)
    if k_mod is not None:
        tn = t.reshape(-1).numpy()
        cut = np.where(tn > 0, np.nextafter(tn, np.float32(0)), np.float32(0)).astype(np.float32)
        bits = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
        cnt = k_mod.pack_gt(packing.flat_np(x), cut, max(tail, 1), period, bits.numpy())
        return Selection(x.shape, int(cnt), threshold, bits=bits)
    tb = t.view(t.shape + (1,) * (x.dim() - 1 - t.dim())) if t.dim() else t
    a = x.detach().abs()
    mask = (a >= tb) & (a != 0)
    return Selection(x.shape, int(mask.sum()), threshold, mask=mask)


HW_TOLERANCE = 0.005  # per-group rounding within 0.5 % of the layer's count is kept (large groups)


def hw_counts(G: int, m: int, sparsity: float) -> Optional[tuple[int, int]]:
    """(per-group count b, number of groups keeping b + 1) of the balanced ``hw`` rule, or None
    when every group keeping ``keep_count(m, s)`` already gives the layer's count."""
    total = keep_count(G * m, sparsity)
    if abs(G * keep_count(m, sparsity) - total) <= HW_TOLERANCE * total:
        return None
    base = min(m, max(1, total // G)) if total else 0
    extra = max(0, min(G, total - base * G)) if base < m else 0
    return base, extra


def _exact_hw_balanced(x: Tensor, G: int, m: int, s: float, thr_shape: tuple[int, ...],
                       drop_zeros: bool) -> Selection:
    """``hw`` keeping the layer's count (module docstring); stable sorts give the tie rule."""
    base, extra = hw_counts(G, m, s)  # type: ignore[misc]
    a = x.detach().abs().reshape(G, m)
    vals, idx = torch.sort(a, dim=1, descending=True, stable=True)
    counts = torch.full((G,), base, dtype=torch.long, device=x.device)
    if extra:
        nxt = vals[:, base]
        order = torch.sort(nxt, descending=True, stable=True).indices[:extra]
        counts[order] += 1
    keep_sorted = torch.arange(m, device=x.device)[None, :] < counts[:, None]
    mask = torch.zeros_like(a, dtype=torch.bool).scatter_(1, idx, keep_sorted)
    thr = vals.gather(1, (counts - 1).clamp(min=0)[:, None]).squeeze(1)
    if drop_zeros:
        mask &= a != 0
    return Selection(x.shape, int(mask.sum()), thr.view(thr_shape), mask=mask.view(x.shape))


def select_bits(x: Tensor, sparsity: float, topk: str = "nchw", *, threshold: Optional[Tensor] = None,
                drop_zeros: bool = False, generator: Optional[torch.Generator] = None,
                group: Optional[str] = None) -> Selection:
    """The selection engine behind every public function here (and the SWAT layers).

    ``threshold`` switches to the cached path.  ``group`` overrides the group layout used by
    ``random`` (default: whole tensor), e.g. per sample for meProp.
    """
    check_topk(topk)
    s = check_sparsity(sparsity, allow_one=True)
    if threshold is not None:
        return _cached(x, threshold)
    if topk == "random":
        # uniform keys in (0, 1]: the draw is blind to x, and no key is an exact zero
        keys = 1.0 - torch.rand(x.shape, generator=generator, dtype=torch.float32, device="cpu")
        sel = select_bits(keys.to(x.device), s, group or "nchw")
        if drop_zeros:
            mask = sel.mask & (x.detach() != 0)
            return Selection(x.shape, int(mask.sum()), None, mask=mask)
        sel.thresholds = None
        return sel
    G, m, thr_shape = group_layout(x.shape, topk)
    k = keep_count(m, s)
    if topk == "hw" and x.dim() >= 3 and x.numel() and hw_counts(G, m, s) is not None:
        return _exact_hw_balanced(x, G, m, s, thr_shape, drop_zeros)
    if x.numel() == 0 or k == 0:
        inf = torch.full(thr_shape, math.inf, dtype=x.dtype, device=x.device)
        return Selection(x.shape, 0, inf, mask=torch.zeros(x.shape, dtype=torch.bool, device=x.device))
    k_mod = packing.kernels_for(x)
    if k_mod is not None:
        return _exact_numba(k_mod, x, G, m, k, thr_shape, drop_zeros)
    return _exact_torch(x, G, m, k, thr_shape, drop_zeros)


def topk_mask(x: Tensor, sparsity: float, topk: str = "nchw", *,
              generator: Optional[torch.Generator] = None) -> Tensor:
    """Bool mask keeping exactly ``keep_count(group size, sparsity)`` entries per group.

    Ties at the K-th magnitude: lowest flat index wins (see module docstring).
    """
    return select_bits(x, sparsity, topk, generator=generator).mask


def kth_magnitude(x: Tensor, sparsity: float, topk: str = "nchw") -> Tensor:
    """K-th largest magnitude per group: shape () for nchw, (d0,) for chw, (d0, d1) for hw.

    These are the thresholds the layers cache between refreshes and the traces plot.
    """
    if topk == "random":
        raise SwatValueError("topk 'random' selects by chance and has no magnitude threshold; "
                         "use nchw, chw or hw")
    sel = select_bits(x, sparsity, topk)
    return sel.thresholds.to(x.dtype)
