"""Numba kernels behind the CPU float32 fast path of Top-K selection and compact storage.

Why they exist: on CPU, ``torch.kthvalue`` / ``torch.topk`` cost 13-30 ms per million
elements and ``masked_select`` / ``masked_scatter`` 3-6 ms, more than the convolution they
accompany; SWAT would then be slower than dense training.  These loops do the same work in
one or two streaming passes (about 0.3-1 ms per million elements):

* ``kth_largest_abs_rows``: exact K-th largest magnitude per row - a radix select on the IEEE
  bit pattern of ``|x|`` (monotone for non-negative floats) for long rows, quickselect on a
  scratch copy for short ones.  It also returns how many entries are strictly larger, which
  is what the tie rule needs.
* ``pack_gt`` / ``pack_exact``: threshold -> packed little-endian bitmask + count in one pass
  (``pack_exact`` also keeps the first ``need[g]`` entries equal to the threshold: ties go to
  the lowest flat index, the rule documented in :mod:`training.topk`).
* ``gather`` / ``expand`` / ``mask_select``: bitmask + values <-> dense tensor.
* ``relu_pack``: ReLU and the bitmask of its positives in one pass.

Where the compiled library is built, the bitmask passes (``pack_gt``, ``gather``, ``expand``,
``mask_select``, ``relu_pack``) run in its vectorised C instead (``swat_native/bits.py``,
3-5x faster on one thread); these stay the fallback and the reference the tests compare with.

Every function takes flat contiguous numpy views of torch tensors (zero copy); the Python
wrappers in :mod:`training.topk` and :mod:`training.memory` choose between these and the
plain-torch path (used for other dtypes and devices, and as the reference in the tests).
"""
from __future__ import annotations

import numpy as np
from numba import njit

# rows at least this long use the radix select; shorter ones use quickselect
RADIX_MIN = 4096

_POPC = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
_PREFIX = np.zeros((256, 8), dtype=np.int64)
for _b in range(256):
    _c = 0
    for _i in range(8):
        _PREFIX[_b, _i] = _c
        _c += (_b >> _i) & 1
_PREFIX_U = _PREFIX.astype(np.uint64)
_POPC_U = _POPC.astype(np.uint64)


@njit(cache=True, nogil=True)
def _radix_row(keys, k, scratch, hist):
    """k-th largest of the uint32 ``keys`` (k >= 1), the counts of keys above it and equal to it."""
    m = keys.size
    # pass 1: bits 30..20 (bit 31 is the sign, cleared by abs)
    hist[:] = 0
    for i in range(m):
        hist[keys[i] >> 20] += 1
    above = 0
    b1 = 2047
    while above + hist[b1] < k:
        above += hist[b1]
        b1 -= 1
    rank = k - above
    # collect the bucket's keys into scratch so later passes read only them
    nc = 0
    for i in range(m):
        key = keys[i]
        scratch[nc] = key
        nc += (key >> 20) == b1
    # pass 2: bits 19..9
    hist[:] = 0
    for i in range(nc):
        hist[(scratch[i] >> 9) & 2047] += 1
    above2 = 0
    b2 = 2047
    while above2 + hist[b2] < rank:
        above2 += hist[b2]
        b2 -= 1
    rank -= above2
    # pass 3: bits 8..0
    hist[:512] = 0
    for i in range(nc):
        key = scratch[i]
        if ((key >> 9) & 2047) == b2:
            hist[key & 511] += 1
    above3 = 0
    b3 = 511
    while above3 + hist[b3] < rank:
        above3 += hist[b3]
        b3 -= 1
    kth = np.uint32((b1 << 20) | (b2 << 9) | b3)
    return kth, above + above2 + above3, hist[b3]


@njit(cache=True, nogil=True)
def _quickselect_row(keys, k, scratch):
    """Same contract as ``_radix_row``, for short rows (Hoare partition, median of three)."""
    m = keys.size
    for i in range(m):
        scratch[i] = keys[i]
    target = m - k  # ascending position of the k-th largest
    lo = 0
    hi = m - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        a = scratch[lo]
        b = scratch[mid]
        c = scratch[hi]
        if a > b:
            a, b = b, a
        if b > c:
            b = c
            if a > b:
                b = a
        pivot = b
        i = lo
        j = hi
        while i <= j:
            while scratch[i] < pivot:
                i += 1
            while scratch[j] > pivot:
                j -= 1
            if i <= j:
                tmp = scratch[i]
                scratch[i] = scratch[j]
                scratch[j] = tmp
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break
    kth = scratch[target]
    n_gt = 0
    n_eq = 0
    for i in range(m):
        key = keys[i]
        n_gt += key > kth
        n_eq += key == kth
    return kth, n_gt, n_eq


@njit(cache=True, nogil=True)
def kth_largest_abs_rows(bits32, rows, k, thr_bits, n_gt, n_eq):
    """Per row of the (rows, m) float32 data given as its uint32 bit pattern ``bits32``.

    Writes the K-th largest magnitude (as uint32 bits) into ``thr_bits``, the count of
    strictly larger magnitudes into ``n_gt`` and of equal ones into ``n_eq``.
    """
    m = bits32.size // rows
    scratch = np.empty(m, dtype=np.uint32)
    keys = np.empty(m, dtype=np.uint32)
    hist = np.empty(2048, dtype=np.int64)
    for r in range(rows):
        base = r * m
        for i in range(m):
            keys[i] = bits32[base + i] & np.uint32(0x7FFFFFFF)
        if m >= RADIX_MIN:
            kth, cnt, eq = _radix_row(keys, k, scratch, hist)
        else:
            kth, cnt, eq = _quickselect_row(keys, k, scratch)
        thr_bits[r] = kth
        n_gt[r] = cnt
        n_eq[r] = eq


# The byte loops below run whole bytes with a literal count of 8 (LLVM unrolls them) and the
# last, partial byte with the remainder; each body lives once, in an inlined helper.
@njit(cache=True, nogil=True, inline="always")
def _gt_byte(x, t, base, count):
    byte = np.uint8(0)
    for s in range(count):
        byte |= np.uint8(abs(x[base + s]) > t) << s
    return byte


@njit(cache=True, nogil=True)
def _pack_gt_scalar(x, t, bits):
    n = x.size
    cnt = 0
    nbytes = n >> 3
    for b in range(nbytes):
        byte = _gt_byte(x, t, b << 3, 8)
        bits[b] = byte
        cnt += _POPC[byte]
    if n & 7:
        byte = _gt_byte(x, t, nbytes << 3, n & 7)
        bits[nbytes] = byte
        cnt += _POPC[byte]
    return cnt


@njit(cache=True, nogil=True, inline="always")
def _gt_byte_grouped(x, thr, inner, period, base, count, pos, g, t):
    byte = np.uint8(0)
    for s in range(count):
        byte |= np.uint8(abs(x[base + s]) > t) << s
        pos += 1
        if pos == inner:
            pos = 0
            g += 1
            if g == period:
                g = 0
            t = thr[g]
    return byte, pos, g, t


@njit(cache=True, nogil=True)
def pack_gt(x, thr, inner, period, bits):
    """bit i = |x[i]| > thr[g(i)], g(i) = (i // inner) % period; returns the number of set bits."""
    n = x.size
    if period == 1:
        return _pack_gt_scalar(x, thr[0], bits)
    cnt = 0
    g = 0
    pos = 0
    t = thr[0]
    nbytes = n >> 3
    for b in range(nbytes):
        byte, pos, g, t = _gt_byte_grouped(x, thr, inner, period, b << 3, 8, pos, g, t)
        bits[b] = byte
        cnt += _POPC[byte]
    if n & 7:
        byte, pos, g, t = _gt_byte_grouped(x, thr, inner, period, nbytes << 3, n & 7, pos, g, t)
        bits[nbytes] = byte
        cnt += _POPC[byte]
    return cnt


@njit(cache=True, nogil=True)
def pack_exact(x, thr, need, inner, period, drop_zeros, bits):
    """Like ``pack_gt`` but also keeps entries equal to thr[g] while ``need[g]`` > 0.

    Scanning in flat order makes the lowest indices win the ties.  ``need`` is consumed.
    ``drop_zeros`` refuses ties at magnitude 0 (the threshold-0 pitfall after a ReLU).
    """
    n = x.size
    cnt = 0
    g = 0
    pos = 0
    t = thr[0]
    byte = 0
    for i in range(n):
        v = abs(x[i])
        c = v > t
        if v == t:
            if need[g] > 0 and not (drop_zeros and v == 0):
                c = True
                need[g] -= 1
        byte |= np.uint8(c) << (i & 7)
        cnt += c
        if (i & 7) == 7:
            bits[i >> 3] = byte
            byte = 0
        pos += 1
        if pos == inner:
            pos = 0
            g += 1
            if g == period:
                g = 0
            t = thr[g]
    if n & 7:
        bits[n >> 3] = byte
    return cnt


@njit(cache=True, nogil=True)
def gather(x, bits, vals):
    """vals[:count] = x where the bit is set; ``vals`` needs count + 1 slots (branch-free store)."""
    j = 0
    for i in range(x.size):
        vals[j] = x[i]
        j += (bits[i >> 3] >> (i & 7)) & 1
    return j


@njit(cache=True, nogil=True)
def expand(bits, vals, out):
    """out = dense tensor with ``vals`` at the set bits, zeros elsewhere.

    ``vals`` must have one slot past its last value (``gather`` leaves it): with unsigned
    indices and no clamping the eight lanes of a byte are independent selects, twice as fast.
    """
    n = out.size
    nbytes = n >> 3
    j = np.uint64(0)
    zero = out.dtype.type(0)
    for b in range(nbytes):
        byte = bits[b]
        base = b << 3
        for s in range(8):
            v = vals[j + _PREFIX_U[byte, s]]
            out[base + s] = v if (byte >> s) & 1 else zero
        j += _POPC_U[byte]
    base = nbytes << 3
    for i in range(base, n):
        c = (bits[i >> 3] >> (i & 7)) & 1
        v = vals[j]
        out[i] = v if c else zero
        j += np.uint64(c)


@njit(cache=True, nogil=True)
def mask_select(x_u32, bits, out_u32):
    """out = x where the bit is set, 0 elsewhere (ReLU backward, meProp gradient masking).

    Works on the uint32 view of float32 data: AND with 0 / 0xFFFFFFFF vectorises and keeps
    NaN / inf in the kept entries exactly.
    """
    n = x_u32.size
    nbytes = n >> 3
    for b in range(nbytes):
        byte = np.uint32(bits[b])
        base = b << 3
        for s in range(8):
            out_u32[base + s] = x_u32[base + s] & (np.uint32(0) - ((byte >> s) & np.uint32(1)))
    for i in range(nbytes << 3, n):
        c = np.uint32((bits[i >> 3] >> (i & 7)) & 1)
        out_u32[i] = x_u32[i] & (np.uint32(0) - c)


# ------------------------------------------------------------------------------ ReLU
@njit(cache=True, nogil=True, inline="always")
def _relu_byte(x, y, base, count):
    zero = x.dtype.type(0)
    byte = np.uint8(0)
    for s in range(count):
        v = x[base + s]
        pos = not (v <= zero)
        y[base + s] = zero if v <= zero else v
        byte |= np.uint8(pos) << s
    return byte


@njit(cache=True, nogil=True)
def relu_pack(x, y, bits):
    """y = relu(x) (``y`` may be ``x``) and bit i = y[i] > 0, in one pass; returns the count.

    The bit is ``not (x <= 0)``, as in torch's ReLU backward: a NaN stays NaN and passes its
    gradient.
    """
    n = x.size
    cnt = 0
    nbytes = n >> 3
    for b in range(nbytes):
        byte = _relu_byte(x, y, b << 3, 8)
        bits[b] = byte
        cnt += _POPC[byte]
    if n & 7:
        byte = _relu_byte(x, y, nbytes << 3, n & 7)
        bits[nbytes] = byte
        cnt += _POPC[byte]
    return cnt

