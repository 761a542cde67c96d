"""Reductions along axes: Softmax / LogSoftmax, Reduce*, ArgMax / ArgMin.

Two opset traps live here: Softmax before opset 13 normalises over the input *flattened*
from ``axis`` on (default axis 1), not over one axis (default -1 from 13); and the Reduce
ops take ``axes`` as an attribute until opset 18 (ReduceSum: until 13), as an input after.
"""
from __future__ import annotations

import math

import torch

from .base import Node, OpDef, input_or_attr, norm_axis


def _softmax(node: Node, x: torch.Tensor, log: bool) -> torch.Tensor:
    fn = torch.log_softmax if log else torch.softmax
    if node.opset < 13:
        axis = norm_axis(int(node.attr("axis", 1)), x.dim(), node)
        rows = math.prod(x.shape[:axis])
        return fn(x.reshape(rows, -1), dim=1).reshape(x.shape)
    axis = norm_axis(int(node.attr("axis", -1)), x.dim(), node)
    return fn(x, dim=axis)


def _t_softmax(node: Node, xs: list) -> list:
    return [_softmax(node, xs[0], log=False)]


def _t_log_softmax(node: Node, xs: list) -> list:
    return [_softmax(node, xs[0], log=True)]


def _reduce(kind: str, axes_input_since: int):
    def run(node: Node, xs: list) -> list:
        x = xs[0]
        axes = input_or_attr(node, xs, 1, "axes", since_opset=axes_input_since)
        keep = bool(node.attr("keepdims", 1))
        if not axes:
            if node.attr("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        dims = tuple(sorted(norm_axis(a, x.dim(), node) for a in axes))
        if kind == "mean":
            return [torch.mean(x, dim=dims, keepdim=keep)]
        if kind == "sum":
            return [torch.sum(x, dim=dims, keepdim=keep)]
        if kind == "max":
            return [torch.amax(x, dim=dims, keepdim=keep)]
        if kind == "min":
            return [torch.amin(x, dim=dims, keepdim=keep)]
        if kind == "sumsquare":
            return [torch.sum(x * x, dim=dims, keepdim=keep)]
        if kind == "l2":
            return [torch.sqrt(torch.sum(x * x, dim=dims, keepdim=keep))]
        y = x  # prod: torch reduces one dim at a time
        for d in reversed(dims):
            y = torch.prod(y, dim=d, keepdim=keep)
        return [y]

    return run


def _arg(largest: bool):
    def run(node: Node, xs: list) -> list:
        x = xs[0]
        axis = norm_axis(int(node.attr("axis", 0)), x.dim(), node)
        keep = bool(node.attr("keepdims", 1))
        fn = torch.argmax if largest else torch.argmin
        if node.attr("select_last_index", 0):
            idx = fn(torch.flip(x, [axis]), dim=axis, keepdim=keep)
            return [x.shape[axis] - 1 - idx]
        return [fn(x, dim=axis, keepdim=keep)]

    return run


OPS: list[OpDef] = [
    OpDef("Softmax", run=_t_softmax),
    OpDef("LogSoftmax", run=_t_log_softmax),
    OpDef("ReduceMean", run=_reduce("mean", 18)),
    OpDef("ReduceSum", run=_reduce("sum", 13)),
    OpDef("ReduceMax", run=_reduce("max", 18)),
    OpDef("ReduceMin", run=_reduce("min", 18)),
    OpDef("ReduceProd", run=_reduce("prod", 18)),
    OpDef("ReduceSumSquare", run=_reduce("sumsquare", 18)),
    OpDef("ReduceL2", run=_reduce("l2", 18)),
    OpDef("ArgMax", run=_arg(True)),
    OpDef("ArgMin", run=_arg(False)),
]
