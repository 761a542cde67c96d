"""The autograd Functions of SWAT, SAW and meProp for Conv2d and Linear.

SWAT / SAW (paper, Algorithm 1): the layer saves only TopK(a_in) and TopK(W), both compact
(values + packed bitmask); backward computes ``grad_input`` from TopK(W) and ``grad_weight``
from TopK(a_in).  The weight gradient lands on the *dense* weight (every entry, including
the ones TopK dropped this step) - that is what lets a dropped weight come back.  SWAT's
forward uses TopK(W); SAW's forward uses the dense W.

meProp (baseline): dense forward, saves the dense a_in and W, and in backward keeps only the
Top-K of the output gradient per sample before the two backward products.

The selections themselves (which entries, cached thresholds, statistics) are made by the
layer (:mod:`training.swatify`) and handed in, so these Functions stay pure arithmetic.

``aten.convolution_backward`` with sparse input and sparse weight yields exactly SWAT's pair
in one call: its grad_input depends only on the weight and its grad_weight only on the input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from training import memory, sparse_products
from training.topk import select_bits

__all__ = ["ConvGeometry", "swat_conv2d", "swat_linear", "meprop_conv2d", "meprop_linear"]


@dataclass(frozen=True)
class ConvGeometry:
    """Numeric conv arguments (string padding and non-zero padding modes resolved by the layer)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


def _empty_like_shape(ref: Tensor, shape: torch.Size) -> Tensor:
    # convolution_backward reads only the shape of an operand whose gradient is not requested
    return ref.new_empty(1).expand(shape)


def _conv_grads(g: Tensor, x: Optional[Tensor], w: Optional[Tensor], x_shape: torch.Size, w_shape: torch.Size,
                geo: ConvGeometry, need: tuple[bool, bool, bool]) -> tuple[Optional[Tensor], ...]:
    xin = x if x is not None else _empty_like_shape(g, x_shape)
    win = w if w is not None else _empty_like_shape(g, w_shape)
    bias_sizes = [w_shape[0]] if need[2] else None
    gi, gw, gb = torch.ops.aten.convolution_backward(
        g, xin, win, bias_sizes, list(geo.stride), list(geo.padding), list(geo.dilation), False, [0, 0],
        geo.groups, list(need))
    return (gi if need[0] else None, gw if need[1] else None, gb if need[2] else None)


def _expand_activation(vals: Tensor, bits: Tensor, outer: Tensor, shape: torch.Size) -> Tensor:
    """Dense TopK(a); ``outer`` is always empty (activation bitmasks are no longer nested)."""
    return memory.expand(vals, bits, shape)


class _SwatConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], w_fwd: Tensor,  # type: ignore[override]
                a_vals: Tensor, a_bits: Tensor, a_outer: Tensor, w_vals: Tensor, w_bits: Tensor,
                geo: ConvGeometry, block: int) -> Tensor:
        density = w_vals.numel() / max(1, weight.numel())
        if w_fwd.data_ptr() == weight.data_ptr():  # SAW: the forward weight is the dense W
            out = F.conv2d(x, w_fwd, bias, geo.stride, geo.padding, geo.dilation, geo.groups)
        else:  # SWAT: TopK(W), through the sparse kernel where that wins (training.sparse_products)
            out = sparse_products.conv_forward(x, w_fwd, bias, geo.stride, geo.padding, geo.dilation, geo.groups,
                                               density, block)
        ctx.save_for_backward(a_vals, a_bits, a_outer, w_vals, w_bits)
        ctx.x_shape, ctx.w_shape, ctx.geo, ctx.density = x.shape, weight.shape, geo, density
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        a_vals, a_bits, a_outer, w_vals, w_bits = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        g = g.contiguous()
        w_s = memory.expand(w_vals, w_bits, ctx.w_shape) if need[0] else None
        geo = ctx.geo
        gi = None
        if need[0]:  # grad_input = TopK(W)^T x grad: a sparse conv for stride 1
            gi = sparse_products.conv_input_grad(
                g, w_s, ctx.x_shape, geo.stride, geo.padding, geo.dilation, geo.groups, ctx.density,
                lambda: _conv_grads(g, None, w_s, ctx.x_shape, ctx.w_shape, geo, (True, False, False))[0])
        gw = gb = None
        if need[1]:  # grad_W = grad x TopK(a)^T, straight from the compact TopK(a) where that wins
            def dense_gw() -> Tensor:
                x_s = _expand_activation(a_vals, a_bits, a_outer, ctx.x_shape)
                return _conv_grads(g, x_s, None, ctx.x_shape, ctx.w_shape, geo, (False, True, False))[1]

            gw = dense_gw() if a_outer.numel() else sparse_products.conv_weight_grad(
                g, a_vals, a_bits, ctx.x_shape, ctx.w_shape, geo.stride, geo.padding, geo.dilation, geo.groups,
                dense_gw)
        if need[2]:
            gb = _conv_grads(g, None, None, ctx.x_shape, ctx.w_shape, geo, (False, False, True))[2]
        return gi, gw, gb, None, None, None, None, None, None, None, None


class _SwatLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], w_fwd: Tensor,  # type: ignore[override]
                a_vals: Tensor, a_bits: Tensor, a_outer: Tensor, w_vals: Tensor, w_bits: Tensor) -> Tensor:
        out = F.linear(x, w_fwd, bias)
        ctx.save_for_backward(a_vals, a_bits, a_outer, w_vals, w_bits)
        ctx.x_shape, ctx.w_shape = x.shape, weight.shape
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        a_vals, a_bits, a_outer, w_vals, w_bits = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g2 = g.reshape(-1, g.shape[-1])
        gi = gw = gb = None
        if need_x:
            gi = (g2 @ memory.expand(w_vals, w_bits, ctx.w_shape)).view(ctx.x_shape)
        if need_w:
            x_s = _expand_activation(a_vals, a_bits, a_outer, ctx.x_shape).view(-1, ctx.x_shape[-1])
            gw = g2.t() @ x_s
        if need_b:
            gb = g2.sum(0)
        return gi, gw, gb, None, None, None, None, None, None


def swat_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], w_fwd: Tensor, a_vals: Tensor, a_bits: Tensor,
                a_outer: Tensor, w_vals: Tensor, w_bits: Tensor, geo: ConvGeometry, block: int = 1) -> Tensor:
    """SWAT/SAW conv: forward with ``w_fwd``; backward from the compact TopK(a_in) and TopK(W).

    On CPU float32 the forward and input-gradient products may run on the sparse kernels
    (:mod:`training.sparse_products`); ``block`` is the layer's weight block height.

    ``a_outer``: always empty (kept for the call signature).
    """
    return _SwatConv2dFn.apply(x, weight, bias, w_fwd, a_vals, a_bits, a_outer, w_vals, w_bits, geo, block)


def swat_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], w_fwd: Tensor, a_vals: Tensor, a_bits: Tensor,
                a_outer: Tensor, w_vals: Tensor, w_bits: Tensor) -> Tensor:
    """SWAT/SAW linear layer; ``x`` may have any number of leading dims."""
    return _SwatLinearFn.apply(x, weight, bias, w_fwd, a_vals, a_bits, a_outer, w_vals, w_bits)


# --------------------------------------------------------------------------------- meProp
@dataclass(frozen=True)
class MePropSpec:
    """How meProp sparsifies the output gradient; ``report`` receives the kept fraction."""

    sparsity: float
    group: str  # "chw" (per sample) or "hw" (per sample and channel)
    random: bool
    generator: Optional[Callable[[], torch.Generator]] = None  # random only: fresh from the layer's state
    commit: Optional[Callable[[torch.Generator], None]] = None  # store the advanced state back
    report: Optional[Callable[[float], None]] = None


def _meprop_grad(g: Tensor, spec: MePropSpec) -> Tensor:
    gen = spec.generator() if spec.generator is not None else None
    sel = select_bits(g, spec.sparsity, "random" if spec.random else spec.group, generator=gen,
                      group=spec.group)
    if gen is not None and spec.commit is not None:
        spec.commit(gen)
    if spec.report is not None and g.numel():
        spec.report(sel.count / g.numel())
    return memory.masked_grad(g, sel.bits).view(g.shape)


class _MePropConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], geo: ConvGeometry,  # type: ignore[override]
                spec: MePropSpec) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.geo, ctx.spec = geo, spec
        return F.conv2d(x, weight, bias, geo.stride, geo.padding, geo.dilation, geo.groups)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        g_s = _meprop_grad(g.contiguous(), ctx.spec)
        gi, gw, gb = _conv_grads(g_s, x, weight, x.shape, weight.shape, ctx.geo, need)
        return gi, gw, gb, None, None


class _MePropLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor],  # type: ignore[override]
                spec: MePropSpec) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.spec = spec
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g2 = _meprop_grad(g.contiguous(), ctx.spec).reshape(-1, g.shape[-1])
        gi = (g2 @ weight).view(x.shape) if need_x else None
        gw = g2.t() @ x.reshape(-1, x.shape[-1]) if need_w else None
        gb = g2.sum(0) if need_b else None
        return gi, gw, gb, None


def meprop_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], geo: ConvGeometry, spec: MePropSpec) -> Tensor:
    """Dense conv whose backward keeps only the Top-K of the output gradient per sample."""
    return _MePropConv2dFn.apply(x, weight, bias, geo, spec)


def meprop_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], spec: MePropSpec) -> Tensor:
    """Dense linear layer whose backward keeps only the Top-K of the output gradient per sample."""
    return _MePropLinearFn.apply(x, weight, bias, spec)
