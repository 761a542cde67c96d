"""Kernel factory: turn one conv2d / linear weight into a ready-to-run `Op`.

Callers (the ONNX session, benchmarks, tests) never pick a kernel class themselves: they call
`make_conv2d` / `make_linear` and get the fastest kernel for the layer (timed once per machine
and shape by `swat_deploy.autotune`, see there), or the one they force by name.

Adding a kernel: write ``kernels/<name>.py`` with a class that has ``name``, ``supports(spec)``,
``prepare(weight, bias, spec)`` and ``rule_min_sparsity`` (see `base.Kernel`), then add one
instance to `KERNELS` below.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import autotune
from ..formats import sparsity_of
from .base import Kernel, LayerSpec, Op, thread_scope
from .csr_direct import CsrDirectKernel
from .csr_im2col import CsrIm2colKernel
from .csr_rows import CsrRowsKernel
from .dense import DenseKernel
from .masked_direct import MaskedDirectKernel
from .torch_csr import TorchCsrKernel

# The registry. Order matters only to break ties; "dense" must stay first (the fallback).
KERNELS: list[Kernel] = [
    DenseKernel(),
    CsrDirectKernel(),
    MaskedDirectKernel(),
    CsrIm2colKernel(),
    CsrRowsKernel(),
    TorchCsrKernel(),
]

__all__ = ["KERNELS", "LayerSpec", "Op", "detect_block", "kernel_names", "make_conv2d", "make_linear", "get_kernel"]


def kernel_names() -> list[str]:
    """Names accepted by ``kernel=`` (every registered kernel, dense first)."""
    return [k.name for k in KERNELS]


def get_kernel(name: str) -> Kernel:
    """The registered kernel called `name`; ValueError listing the choices otherwise."""
    for k in KERNELS:
        if k.name == name:
            return k
    raise ValueError(f"unknown kernel {name!r}; choose one of: {', '.join(kernel_names())}")


def _pair(v: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(a) for a in v)
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise ValueError(f"{what} must be an int or a pair, got {v!r}")
    return (t[0], t[1])


def _padding4(padding: int | Sequence[int]) -> tuple[int, int, int, int]:
    if isinstance(padding, int):
        return (padding,) * 4  # type: ignore[return-value]
    p = tuple(int(a) for a in padding)
    if len(p) == 2:
        return (p[0], p[1], p[0], p[1])
    if len(p) == 4:
        return p  # type: ignore[return-value]
    raise ValueError(f"padding must be an int, (ph, pw) or (top, left, bottom, right), got {padding!r}")


def detect_block(weight: torch.Tensor, groups: int = 1, min_fill: float = 0.98) -> int:
    """The largest B in (16, 8, 4, 2) such that storing every B consecutive output channels
    (within a group) as one row of B-wide blocks stores at most 2 % zeros, or 1.

    Any model's weights qualify, also ones pruned elsewhere and stored densely: block kernels
    compute the same result (a block is kept if any of its values is non-zero), reusing each
    input load for B outputs. Tolerant on purpose: a kept block whose value happens to be
    exactly 0.0 must not cost the whole layer its blocks (`formats.block_size_of` is the
    strict check verify uses). A dense weight gives 1: the dense kernels apply."""
    o = int(weight.shape[0])
    nz = (weight.reshape(o, -1) != 0)
    nnz = int(nz.sum())
    if nnz == nz.numel() or nnz == 0:
        return 1
    per_group = o // max(1, groups)
    for b in (16, 8, 4, 2):
        if per_group % b == 0:
            stored = int(nz.reshape(o // b, b, -1).any(dim=1).sum()) * b
            if nnz >= min_fill * stored:
                return b
    return 1


def _build(spec: LayerSpec, weight: torch.Tensor, bias: torch.Tensor | None,
           kernel: str | None, threads: int | None) -> Op:
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    if kernel is not None:
        k = get_kernel(kernel)
        if not k.supports(spec):
            ok = [c.name for c in KERNELS if c.supports(spec)]
            raise ValueError(f"kernel {kernel!r} does not support this {spec.kind} layer "
                             f"(weight {tuple(spec.weight_shape)}, groups {spec.groups}); use one of: {', '.join(ok)}")
        with thread_scope(threads):
            prepared = k.prepare(weight, bias, spec)
        return Op(k.name, prepared, spec, threads)
    candidates = [k for k in KERNELS if k.supports(spec)]
    name, prepared, run_threads = autotune.choose(spec, candidates, weight, bias, threads)
    return Op(name, prepared, spec, run_threads)


def make_conv2d(weight: torch.Tensor, bias: torch.Tensor | None = None,
                stride: int | Sequence[int] = (1, 1),
                padding: int | Sequence[int] = (0, 0, 0, 0),
                dilation: int | Sequence[int] = (1, 1), groups: int = 1, *,
                input_shape: tuple[int, ...] | None = None,
                kernel: str | None = None,
                threads: int | None = None,
                block: int | None = None) -> Op:
    """A conv2d op for `weight` (O, I/groups, kh, kw); padding is [top, left, bottom, right] or (ph, pw).

    With `input_shape` (N, C, H, W) the kernel is autotuned on that shape (see
    `swat_deploy.autotune`); without it, or with SWAT_AUTOTUNE=0, a sparsity rule decides.
    `block`: B output channels sharing one zero pattern (None: detected, see `detect_block`).
    """
    if weight.dim() != 4:
        raise ValueError(f"conv2d weight must be 4-D (O, I/groups, kh, kw), got shape {tuple(weight.shape)}")
    groups = int(groups)
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups={groups} must be >= 1 and divide the {weight.shape[0]} output channels")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    stride_, dilation_, pad = _pair(stride, "stride"), _pair(dilation, "dilation"), _padding4(padding)
    if min(stride_) < 1 or min(dilation_) < 1 or min(pad) < 0:
        raise ValueError(f"stride/dilation must be >= 1 and padding >= 0, got {stride_}, {dilation_}, {pad}")
    if input_shape is not None:
        input_shape = tuple(int(d) for d in input_shape)
        if len(input_shape) != 4 or input_shape[1] != weight.shape[1] * groups:
            raise ValueError(f"input_shape {input_shape} does not fit a conv with {weight.shape[1] * groups} "
                             "input channels; pass (N, C, H, W)")
    w = weight.detach().to(torch.float32).contiguous()
    if block is None:
        block = detect_block(w, groups)
    elif block not in (1, 2, 4, 8, 16) or (w.shape[0] // groups) % block:
        raise ValueError(f"block={block} must be 1, 2, 4, 8 or 16 and divide the output channels per group")
    spec = LayerSpec("conv2d", tuple(int(d) for d in w.shape), stride_, pad, dilation_, groups,
                     bias is not None, sparsity_of(w), input_shape, int(block))
    return _build(spec, w, None if bias is None else bias.detach().float(), kernel, threads)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                input_shape: tuple[int, ...] | None = None,
                kernel: str | None = None,
                threads: int | None = None) -> Op:
    """A linear op ``y = x @ weight.T + bias`` for `weight` (O, I) and input (N, I)."""
    if weight.dim() != 2:
        raise ValueError(f"linear weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if input_shape is not None:
        input_shape = tuple(int(d) for d in input_shape)
        if len(input_shape) != 2 or input_shape[1] != weight.shape[1]:
            raise ValueError(f"input_shape {input_shape} does not fit a linear layer with {weight.shape[1]} "
                             "inputs; pass (N, in_features)")
    w = weight.detach().to(torch.float32).contiguous()
    spec = LayerSpec("linear", tuple(int(d) for d in w.shape), has_bias=bias is not None,
                     sparsity=sparsity_of(w), input_shape=input_shape)
    return _build(spec, w, None if bias is None else bias.detach().float(), kernel, threads)
