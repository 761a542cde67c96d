"""The small interface every kernel implements, and the `Op` the factory hands out.

A kernel is split in two steps on purpose: `supports` / `prepare` run once when a graph is
loaded (format conversion, numba compilation, index pre-computation), so `__call__` on the
prepared object does only the arithmetic. The `Op` wrapper adds what every kernel needs the
same way (thread scoping, input checks, bookkeeping attributes) so a kernel file stays small.
"""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def thread_scope(threads: int | None) -> Iterator[None]:
    """Run a block with `threads` intra-op threads in torch and numba, then restore both.

    The settings are process-global (torch) or thread-local (numba); restoring them keeps one
    op's choice from leaking into the caller or into the next op.
    """
    if threads is None:
        yield
        return
    old_torch = torch.get_num_threads()
    nb = _numba_threads_module()
    old_numba = nb.get_num_threads() if nb is not None else None
    if old_torch != threads:
        torch.set_num_threads(threads)
    if nb is not None and old_numba != threads:
        nb.set_num_threads(min(threads, nb.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        if torch.get_num_threads() != old_torch:
            torch.set_num_threads(old_torch)
        if nb is not None and nb.get_num_threads() != old_numba:
            nb.set_num_threads(old_numba)


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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise ValueError(f"{self.spec.kind} op expects float32 input, got {x.dtype}; cast with x.float()")
        if not x.is_contiguous():
            x = x.contiguous()
        if self.threads is None:
            return self._call(x)
        with thread_scope(self.threads):
            return self._call(x)

    def __repr__(self) -> str:
        return (f"Op({self.spec.kind}, kernel={self.kernel_name!r}, weight={tuple(self.spec.weight_shape)}, "
                f"sparsity={self.weight_sparsity:.3f}, nbytes={self.nbytes})")
