"""Element-wise ops: arithmetic, comparisons, logic, bit ops, activations, Clip, Where.

Binary ops carry both a numpy and a torch version because they show up in both places: the
exporter's bitmask expansion (uint8 shifts and masks, folded at load) and residual adds /
scales in the network itself (inference). ONNX broadcasting is numpy broadcasting, so both
libraries' native broadcasting is used as is.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .base import Node, OpDef, scalar

# ----------------------------------------------------------------------------- helpers


def _np_int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ONNX integer Div truncates toward zero (C semantics); numpy's // floors."""
    q = np.floor_divide(a, b)
    if np.issubdtype(a.dtype, np.signedinteger):
        fix = (q < 0) & (q * b != a)
        q = q + fix.astype(q.dtype)
    return q.astype(a.dtype, copy=False)


def _np_div(node: Node, xs: list) -> list:
    a, b = xs
    if np.issubdtype(a.dtype, np.integer):
        return [_np_int_div(a, b)]
    return [np.divide(a, b).astype(a.dtype, copy=False)]


def _t_div(node: Node, xs: list) -> list:
    a, b = xs
    if a.dtype.is_floating_point:
        return [a / b]
    return [torch.div(a, b, rounding_mode="trunc")]


def _np_mod(node: Node, xs: list) -> list:
    a, b = xs
    fn = np.fmod if node.attr("fmod", 0) else np.mod
    return [fn(a, b).astype(a.dtype, copy=False)]


def _t_mod(node: Node, xs: list) -> list:
    a, b = xs
    return [torch.fmod(a, b) if node.attr("fmod", 0) else torch.remainder(a, b)]


def _np_pow(node: Node, xs: list) -> list:
    a, b = xs
    return [np.power(a, b).astype(a.dtype, copy=False)]  # ONNX: the result has the base's type


def _t_pow(node: Node, xs: list) -> list:
    a, b = xs
    return [torch.pow(a, b).to(a.dtype)]


def _np_bitshift(node: Node, xs: list) -> list:
    a, b = xs
    direction = node.attr("direction", "")
    if direction not in ("LEFT", "RIGHT"):
        raise node.error(f"direction must be LEFT or RIGHT, got {direction!r}", "fix the attribute")
    b = b.astype(a.dtype, copy=False)
    out = np.left_shift(a, b) if direction == "LEFT" else np.right_shift(a, b)
    return [out.astype(a.dtype, copy=False)]


def _binary(np_fn: Callable, t_fn: Callable, keep_dtype: bool = True) -> tuple[Callable, Callable]:
    """numpy + torch versions of a same-type binary op (keep_dtype: numpy may upcast)."""

    def fold(node: Node, xs: list) -> list:
        out = np_fn(xs[0], xs[1])
        return [out.astype(xs[0].dtype, copy=False) if keep_dtype else out]

    def run(node: Node, xs: list) -> list:
        return [t_fn(xs[0], xs[1])]

    return run, fold


def _variadic(np_fn: Callable, t_fn: Callable, mean: bool = False) -> tuple[Callable, Callable]:
    """Sum / Max / Min / Mean: fold the pairwise op over any number of inputs."""

    def fold(node: Node, xs: list) -> list:
        acc = xs[0]
        for x in xs[1:]:
            acc = np_fn(acc, x)
        if mean:
            acc = acc / len(xs)
        return [np.asarray(acc).astype(xs[0].dtype, copy=False)]

    def run(node: Node, xs: list) -> list:
        acc = xs[0]
        for x in xs[1:]:
            acc = t_fn(acc, x)
        if mean:
            acc = acc / len(xs)
        return [acc]

    return run, fold


def _unary(np_fn: Callable | None, t_fn: Callable | None) -> tuple[Callable | None, Callable | None]:
    fold = None if np_fn is None else (
        lambda node, xs: [np.asarray(np_fn(node, xs[0])).astype(xs[0].dtype, copy=False)])
    run = None if t_fn is None else (lambda node, xs: [t_fn(node, xs[0])])
    return run, fold


# --------------------------------------------------------------------------- activations

def _t_hardsigmoid(node: Node, x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(node.attr("alpha", 0.2) * x + node.attr("beta", 0.5), 0.0, 1.0)


def _t_gelu(node: Node, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate=node.attr("approximate", "none"))


def _np_sigmoid(node: Node, x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------- Clip, Where

def _clip_bounds(node: Node, xs: list) -> tuple:
    """Clip's bounds: attributes before opset 11, optional inputs from 11 on."""
    if node.opset < 11 or "min" in node.attrs or "max" in node.attrs:
        return node.attr("min"), node.attr("max")
    lo = xs[1] if len(xs) > 1 and xs[1] is not None else None
    hi = xs[2] if len(xs) > 2 and xs[2] is not None else None
    return (None if lo is None else scalar(lo)), (None if hi is None else scalar(hi))


def _t_clip(node: Node, xs: list) -> list:
    lo, hi = _clip_bounds(node, xs)
    x = xs[0]
    if lo is None and hi is None:
        return [x]
    # ONNX: min > max gives max everywhere; clamp(min=lo).clamp(max=hi) does the same.
    if lo is not None:
        x = torch.clamp(x, min=lo)
    if hi is not None:
        x = torch.clamp(x, max=hi)
    return [x]


def _np_clip(node: Node, xs: list) -> list:
    lo, hi = _clip_bounds(node, xs)
    x = xs[0]
    if lo is not None:
        x = np.maximum(x, np.asarray(lo, dtype=x.dtype))
    if hi is not None:
        x = np.minimum(x, np.asarray(hi, dtype=x.dtype))
    return [x]


def _t_where(node: Node, xs: list) -> list:
    return [torch.where(xs[0], xs[1], xs[2])]


def _np_where(node: Node, xs: list) -> list:
    return [np.where(xs[0], xs[1], xs[2]).astype(xs[1].dtype, copy=False)]


def _t_dropout(node: Node, xs: list) -> list:
    # Inference: identity; the optional mask output is all true (nothing dropped).
    return [xs[0], torch.ones(xs[0].shape, dtype=torch.bool)]


def _np_dropout(node: Node, xs: list) -> list:
    return [xs[0], np.ones(xs[0].shape, dtype=bool)]


# ----------------------------------------------------------------------------- registry

def _def(op: str, pair: tuple[Callable | None, Callable | None]) -> OpDef:
    return OpDef(op, run=pair[0], fold=pair[1])


OPS: list[OpDef] = [
    _def("Add", _binary(np.add, torch.add)),
    _def("Sub", _binary(np.subtract, torch.sub)),
    _def("Mul", _binary(np.multiply, torch.mul)),
    OpDef("Div", run=_t_div, fold=_np_div),
    OpDef("Mod", run=_t_mod, fold=_np_mod),
    OpDef("Pow", run=_t_pow, fold=_np_pow),
    OpDef("BitShift", fold=_np_bitshift),
    _def("BitwiseAnd", _binary(np.bitwise_and, torch.bitwise_and)),
    _def("BitwiseOr", _binary(np.bitwise_or, torch.bitwise_or)),
    _def("BitwiseXor", _binary(np.bitwise_xor, torch.bitwise_xor)),
    _def("BitwiseNot", _unary(lambda n, x: np.bitwise_not(x), lambda n, x: torch.bitwise_not(x))),
    _def("And", _binary(np.logical_and, torch.logical_and)),
    _def("Or", _binary(np.logical_or, torch.logical_or)),
    _def("Xor", _binary(np.logical_xor, torch.logical_xor)),
    _def("Not", _unary(lambda n, x: np.logical_not(x), lambda n, x: torch.logical_not(x))),
    _def("Equal", _binary(np.equal, torch.eq, keep_dtype=False)),
    _def("Less", _binary(np.less, torch.lt, keep_dtype=False)),
    _def("LessOrEqual", _binary(np.less_equal, torch.le, keep_dtype=False)),
    _def("Greater", _binary(np.greater, torch.gt, keep_dtype=False)),
    _def("GreaterOrEqual", _binary(np.greater_equal, torch.ge, keep_dtype=False)),
    _def("Sum", _variadic(np.add, torch.add)),
    _def("Mean", _variadic(np.add, torch.add, mean=True)),
    _def("Max", _variadic(np.maximum, torch.maximum)),
    _def("Min", _variadic(np.minimum, torch.minimum)),
    _def("Neg", _unary(lambda n, x: np.negative(x), lambda n, x: torch.neg(x))),
    _def("Abs", _unary(lambda n, x: np.abs(x), lambda n, x: torch.abs(x))),
    _def("Sign", _unary(lambda n, x: np.sign(x), lambda n, x: torch.sign(x))),
    _def("Sqrt", _unary(lambda n, x: np.sqrt(x), lambda n, x: torch.sqrt(x))),
    _def("Exp", _unary(lambda n, x: np.exp(x), lambda n, x: torch.exp(x))),
    _def("Log", _unary(lambda n, x: np.log(x), lambda n, x: torch.log(x))),
    _def("Reciprocal", _unary(lambda n, x: np.reciprocal(x), lambda n, x: torch.reciprocal(x))),
    _def("Floor", _unary(lambda n, x: np.floor(x), lambda n, x: torch.floor(x))),
    _def("Ceil", _unary(lambda n, x: np.ceil(x), lambda n, x: torch.ceil(x))),
    _def("Round", _unary(lambda n, x: np.round(x), lambda n, x: torch.round(x))),  # both: half to even
    _def("Erf", _unary(None, lambda n, x: torch.erf(x))),
    _def("Relu", _unary(lambda n, x: np.maximum(x, 0), lambda n, x: torch.relu(x))),
    _def("LeakyRelu", _unary(None, lambda n, x: F.leaky_relu(x, n.attr("alpha", 0.01)))),
    _def("Elu", _unary(None, lambda n, x: F.elu(x, n.attr("alpha", 1.0)))),
    _def("Sigmoid", _unary(_np_sigmoid, lambda n, x: torch.sigmoid(x))),
    _def("Tanh", _unary(lambda n, x: np.tanh(x), lambda n, x: torch.tanh(x))),
    _def("Softplus", _unary(None, lambda n, x: F.softplus(x))),
    _def("HardSigmoid", _unary(None, _t_hardsigmoid)),
    _def("HardSwish", _unary(None, lambda n, x: F.hardswish(x))),
    _def("Gelu", _unary(None, _t_gelu)),
    OpDef("Clip", run=_t_clip, fold=_np_clip),
    OpDef("Where", run=_t_where, fold=_np_where),
    OpDef("Dropout", run=_t_dropout, fold=_np_dropout),
]
