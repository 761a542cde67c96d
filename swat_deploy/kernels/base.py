"""The small interface every kernel implements, and the `Op` the factory hands out.

A kernel is split in two steps on purpose: `supports` / `prepare` run once when a graph is
loaded (format conversion, numba compilation, index pre-computation), so `__call__` on the
prepared object does only the arithmetic. The `Op` wrapper adds what every kernel needs the
same way (thread scoping, input checks, bookkeeping attributes) so a kernel file stays small.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch


@dataclass(frozen=True)
class LayerSpec:
    """Everything a kernel needs to know about a layer to decide whether it applies.

    ``weight_shape`` is (O, I/g, kh, kw) for a conv and (O, I) for a linear layer;
    ``padding`` is always normalised to [top, left, bottom, right].
    """

    kind: str  # "conv2d" | "linear"
    weight_shape: tuple[int, ...]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    has_bias: bool = False
    sparsity: float = 0.0
    input_shape: tuple[int, ...] | None = None
    block: int = 1  # B consecutive output channels share one zero pattern (1: unstructured)

    @property
    def out_channels(self) -> int:
        return int(self.weight_shape[0])

    @property
    def in_channels(self) -> int:
        if self.kind == "linear":
            return int(self.weight_shape[1])
        return int(self.weight_shape[1]) * self.groups


class Prepared(Protocol):
    """What `Kernel.prepare` returns: the weight in the kernel's storage, ready to run."""

    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class Kernel(Protocol):
    """A way to compute one conv2d / linear layer. Registered in `kernels.KERNELS`."""

    name: str

    def supports(self, spec: LayerSpec) -> bool: ...

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec) -> Prepared: ...


_cap = threading.local()
_serial = threading.local()


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
    nb = _numba_threads_module()
    old_numba = nb.get_num_threads() if nb is not None else None
    if torch_threads and old_torch != want_torch:
        torch.set_num_threads(want_torch)
    want_numba = want_torch if cap is not None else threads
    if nb is not None and old_numba != want_numba:
        nb.set_num_threads(min(want_numba, nb.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        if nb is not None and nb.get_num_threads() != old_numba:
            nb.set_num_threads(old_numba)
        # last: with numba's OpenMP layer, resizing numba's pool also resizes torch's
        if torch.get_num_threads() != old_torch:
            torch.set_num_threads(old_torch)


def _numba_threads_module():  # noqa: ANN202 - returns the numba module or None
    try:
        import numba
    except ImportError:  # numba is a dependency, but the dense path must work without it
        return None
    return numba


class Op:
    """A ready-to-run layer: ``op(x) -> y`` with the chosen kernel and thread count.

    Attributes other code reads: ``kernel_name`` (what was chosen), ``weight_sparsity``
    (fraction of zeros in the weight), ``nbytes`` (bytes of the weight as the kernel stores it;
    the bias is not counted), ``spec`` (the `LayerSpec`), ``threads``.
    """

    def __init__(self, kernel_name: str, prepared: Prepared, spec: LayerSpec, threads: int | None) -> None:
        self.kernel_name = kernel_name
        self.prepared = prepared
        self.spec = spec
        self.weight_sparsity = float(spec.sparsity)
        self.nbytes = int(prepared.nbytes)
        self.threads = threads
        self._call: Callable[[torch.Tensor], torch.Tensor] = prepared
        # numba kernels set ``uses_torch_threads = False``: only numba's count is scoped for them.
        self._torch_threads = bool(getattr(prepared, "uses_torch_threads", True))
        self._fuses = bool(getattr(prepared, "fuses_epilogue", False))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)

    def fused(self, x: torch.Tensor, residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
        """relu(op(x) + residual): inside the kernel's output loop when it offers that
        (``fuses_epilogue``; saves a pass over the output and two graph ops per conv), else
        in torch after it. ``residual`` may broadcast; None adds nothing."""
        if self._fuses:
            return self._run(x, residual, relu)
        return add_relu_(self._run(x), residual, relu)

    def _run(self, x: torch.Tensor, *epilogue: object) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise ValueError(f"{self.spec.kind} op expects float32 input, got {x.dtype}; cast with x.float()")
        if not x.is_contiguous():
            x = x.contiguous()
        if self.threads is None:
            return self._call(x, *epilogue)
        if not self._torch_threads:
            cap = getattr(_cap, "value", None)
            if (self.threads if cap is None else min(self.threads, cap)) == 1:
                with serial_scope():
                    return self._call(x, *epilogue)
        with thread_scope(self.threads, self._torch_threads):
            return self._call(x, *epilogue)

    def __repr__(self) -> str:
        return (f"Op({self.spec.kind}, kernel={self.kernel_name!r}, weight={tuple(self.spec.weight_shape)}, "
                f"sparsity={self.weight_sparsity:.3f}, nbytes={self.nbytes})")


def add_relu_(y: torch.Tensor, residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """relu(y + residual) in place on `y` (a fresh op output) where the shapes allow."""
    if residual is not None:
        y = y.add_(residual) if residual.shape == y.shape and residual.dtype == y.dtype else y + residual
    return y.relu_() if relu else y
