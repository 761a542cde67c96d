"""Per-shape choice between two ways of running one product that give bit-identical results:
the direct conv's input read in place, or first copied at a padded channel stride
(:func:`swat_native.train.tconv_cstride`).

Why timed and not a rule: the padded stride keeps a tile's channels out of one L1 set, which
saved up to half of a 32 x 32 layer at 70 % (Zen 3, batch 64), but the copy costs a pass over
the input, and at 95 % (a few multiply-adds per input value) the copy cost more than it saved
(1.07-1.18x the time). Where the line falls depends on the CPU, the density and the map, so
each (layer, shape) times both once per process, interleaved, and keeps the faster. The two
ways sum the same products in the same order, so the choice never changes a result (unlike
the sparse-vs-dense choices, it needs no cache file or checkpoint entry).

``SWAT_AUTOTUNE=0`` (the tests): nothing is timed; the padded way is taken.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable, Hashable

__all__ = ["padded_wins", "forget"]

MARGIN = 0.97  # the copy must win by 3 %: a near-tie keeps the input in place
ROUNDS = 3

_lock = threading.Lock()
_choices: dict[Hashable, bool] = {}


def _timing_enabled() -> bool:
    return os.environ.get("SWAT_AUTOTUNE", "1").strip().lower() not in ("0", "off", "false", "no")


def padded_wins(key: Hashable, in_place: Callable[[], object], padded: Callable[[], object]) -> bool:
    """Whether ``padded()`` is the faster way for ``key``: timed on the first call for the key
    (each way once untimed, then ``ROUNDS`` interleaved; the best of each), remembered after."""
    with _lock:
        hit = _choices.get(key)
    if hit is not None:
        return hit
    if not _timing_enabled():
        pick = True
    else:
        in_place()
        padded()
        ta, tb = [], []
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            in_place()
            t1 = time.perf_counter()
            padded()
            t2 = time.perf_counter()
            ta.append(t1 - t0)
            tb.append(t2 - t1)
        pick = min(tb) < MARGIN * min(ta)
    with _lock:
        if len(_choices) > 4096:
            _choices.clear()
        return _choices.setdefault(key, pick)


def forget() -> None:
    """Drop every choice (tests; a kernel rebuild in a long-lived process)."""
    with _lock:
        _choices.clear()
