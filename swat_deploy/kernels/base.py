"""The small interface every kernel implements, and the `Op` the factory hands out.

A kernel is split in two steps on purpose: `supports` / `prepare` run once when a graph is
loaded (format conversion, numba compilation, index pre-computation), so `__call__` on the
prepared object does only the arithmetic. The `Op` wrapper adds what every kernel needs the
same way (thread scoping, input checks, bookkeeping attributes) so a kernel file stays small.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

# the thread scopes live in swat_deploy.threads (shared with the autotuner); re-exported here
from swat_deploy.threads import (allowed_threads, numba_threads, own_pool_threads, serial_call,  # noqa: F401
                                 serial_scope, thread_cap, thread_scope, torch_thread_cap)


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
    """A way to compute one conv2d / linear layer. Registered in `kernels.KERNELS`.

    Optional attributes the autotuner reads: ``rule_min_sparsity`` (see `autotune.rule_choice`)
    and ``thread_pool`` ("native", "numba" or "torch", the default; see `autotune.pick`)."""

    name: str

    def supports(self, spec: LayerSpec) -> bool: ...

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec) -> Prepared: ...


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
        # kernels on the extension's own pool (``own_pool``) only need a count: no scopes
        self._own_pool = bool(getattr(prepared, "own_pool", False))

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
        if self._own_pool:
            prev = own_pool_threads(allowed_threads(self.threads))
            try:
                return self._call(x, *epilogue)
            finally:
                own_pool_threads(prev)
        if not self._torch_threads:
            cap = thread_cap()
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
