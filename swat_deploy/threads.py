"""Thread-count scopes for the sparse backend: the one place torch's and numba's intra-op
thread counts are set and restored.

Why its own module: kernels run inside these scopes, and the autotuner times kernels inside
them; with the scopes here neither the kernel package nor the autotuner imports the other at
load time.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

__all__ = ["allowed_threads", "native_threads", "numba_threads", "own_pool_threads", "serial_call", "serial_scope",
           "thread_cap", "torch_thread_cap", "thread_scope"]

_cap = threading.local()
_serial = threading.local()
_numba_now = threading.local()  # numba's count on this thread as thread_scope set it (None: unknown)
_own_pool = threading.local()  # the thread count an Op hands a kernel on the extension's own pool


def numba_threads() -> int:
    """numba's intra-op thread count on this thread.

    Inside a :func:`thread_scope` it is the count the scope set, without asking numba:
    ``numba.get_num_threads()`` takes a process-wide lock on every call, and the kernels asked
    74 times per batch-1 ResNet-18 run (0.26 ms of a ~5 ms run). Outside, numba is asked."""
    n = getattr(_numba_now, "n", None)
    if n is None:
        import numba as nb

        n = nb.get_num_threads()
    return n


def native_threads() -> int:
    """Threads for a kernel on the extension's own pool (``own_pool`` kernels): what the running
    `Op` handed it, else 1 inside :func:`serial_scope`, else numba's count."""
    n = getattr(_own_pool, "n", None)
    if n is not None:
        return n
    return 1 if serial_call() else numba_threads()


def own_pool_threads(n: int | None) -> int | None:
    """Set the count :func:`native_threads` returns on this thread (None: unset); returns the
    previous value for the caller to restore. Not a context manager on purpose: an `Op` call
    on the extension's pool is ~5 us of work at batch 1 on small maps, and ``thread_scope``
    (numba's lock, two context managers) cost ~8 us of it."""
    prev = getattr(_own_pool, "n", None)
    _own_pool.n = n
    return prev


def allowed_threads(n: int) -> int:
    """`n` threads as the running plan allows them on this thread: 1 inside
    :func:`serial_scope`, else at most :func:`thread_cap`."""
    if serial_call():
        return 1
    cap = thread_cap()
    return n if cap is None else min(n, cap)


def thread_cap() -> int | None:
    """The cap :func:`torch_thread_cap` set on this thread (None: no cap)."""
    return getattr(_cap, "value", None)


def serial_call() -> bool:
    """True inside an op that must run on one thread (kernels then take their serial loops)."""
    return getattr(_serial, "on", False)


@contextlib.contextmanager
def _local(store: threading.local, name: str, value: object, default: object) -> Iterator[None]:
    """store.name = value within the block (this thread), then what it was."""
    prev = getattr(store, name, default)
    setattr(store, name, value)
    try:
        yield
    finally:
        setattr(store, name, prev)


def serial_scope() -> contextlib.AbstractContextManager[None]:
    """numba / compiled kernels in the block take their serial loops; numba's pool is left
    alone (resizing it down and back up cost 10-16 us a call)."""
    return _local(_serial, "on", True, False)


def torch_thread_cap(cap: int | None) -> contextlib.AbstractContextManager[None]:
    """Within the block, ops never use more than `cap` threads, torch or numba (this thread only).

    The Session uses it to run a whole graph on one thread when that is measured faster (a
    loaded machine), without each dense op resizing torch's OpenMP team back up.
    """
    return _local(_cap, "value", cap, None)


@contextlib.contextmanager
def thread_scope(threads: int | None, torch_threads: bool = True) -> Iterator[None]:
    """Run a block with `threads` intra-op threads in numba (and torch unless `torch_threads`
    is False), then restore them.

    The settings are process-global (torch) or thread-local (numba); restoring them keeps one
    op's choice from leaking into the caller or into the next op. numba-only kernels leave
    torch alone: changing torch's OpenMP team size between ops makes the next parallel region
    wake (or re-create) a worker, which on a loaded 2-core machine was measured to stall each
    op for 30-60 ms.
    """
    if threads is None:
        yield
        return
    cap = getattr(_cap, "value", None)
    want_torch = threads if cap is None else min(threads, cap)
    old_torch = torch.get_num_threads()
    import numba as nb  # a dependency; imported here so importing this module stays cheap

    known = getattr(_numba_now, "n", None)
    old_numba = known if known is not None else nb.get_num_threads()
    if torch_threads and old_torch != want_torch:
        torch.set_num_threads(want_torch)
    want_numba = min(want_torch if cap is not None else threads, nb.config.NUMBA_NUM_THREADS)
    if old_numba != want_numba:
        nb.set_num_threads(want_numba)
    _numba_now.n = want_numba
    try:
        yield
    finally:
        # inside the block only scopes (which restore) change numba's count: it is want_numba
        if want_numba != old_numba:
            nb.set_num_threads(old_numba)
        _numba_now.n = known
        # last: with numba's OpenMP layer, resizing numba's pool also resizes torch's
        if torch.get_num_threads() != old_torch:
            torch.set_num_threads(old_torch)
