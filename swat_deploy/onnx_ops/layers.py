"""Conv, Gemm and MatMul: the ops whose constant weights run through the sparse kernels.

This is the point of the whole Session. When the weight (after constant folding, which
expands the exporter's compressed values + bitmask) is a constant, ``prepare`` turns the node
into a layer object that asks ``swat_deploy.kernels`` for an op per input-shape class, so
kernel selection / autotuning sees real shapes. A weight that is only known at run time (rare
in a CNN) falls back to plain torch, which is also what constant folding uses.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from swat_deploy.kernels.base import add_relu_

from .base import BuildContext, Node, OpDef, resolve_pads, spatial_attrs, to_torch
from .optimize import FUSED_RELU, FUSED_RESIDUAL

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAX_CACHED_SHAPES = 8  # per layer; more shape classes than this evicts the oldest


def _conv_geometry(node: Node, weight_shape: tuple[int, ...], spatial: tuple[int, ...]):
    kernel = node.ints("kernel_shape") or list(weight_shape[2:])
    if list(kernel) != list(weight_shape[2:]):
        raise node.error(f"kernel_shape {kernel} disagrees with the weight {tuple(weight_shape)}",
                         "fix kernel_shape")
    if len(spatial) != len(kernel):
        raise node.error(f"a {len(kernel)}-D kernel got a {len(spatial)}-D input",
                         f"feed an (N, C, {', '.join('*' * len(kernel))}) tensor")
    strides, dilations = spatial_attrs(node, kernel)
    begins, ends = resolve_pads(node, spatial, kernel, strides, dilations)
    return strides, dilations, begins, ends


def _epilogue(node: Node, y: torch.Tensor, xs: list) -> torch.Tensor:
    """The Add / Relu a fused Conv absorbed (see `optimize.fuse_conv_epilogue`), in place on
    the conv's fresh output where the shapes allow."""
    return add_relu_(y, xs[3] if node.attrs.get(FUSED_RESIDUAL) else None, bool(node.attrs.get(FUSED_RELU)))


def _t_conv(node: Node, xs: list) -> list:
    """Plain torch convolution: non-constant weights, non-float32 data, constant folding."""
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    nd = w.dim() - 2
    if nd not in _CONV:
        raise node.error(f"{nd}-D convolution is not supported", "use 1-D, 2-D or 3-D convolution")
    strides, dilations, begins, ends = _conv_geometry(node, tuple(w.shape), tuple(x.shape[2:]))
    if any(begins) or any(ends):
        flat = []
        for bb, ee in zip(reversed(begins), reversed(ends)):
            flat += [bb, ee]
        x = F.pad(x, flat)
    return [_epilogue(node, _CONV[nd](x, w, b, strides, 0, dilations, int(node.attr("group", 1))), xs)]


def _t_gemm(node: Node, xs: list) -> list:
    a, b = xs[0], xs[1]
    c = xs[2] if len(xs) > 2 else None
    a = a.t() if node.attr("transA", 0) else a
    b = b.t() if node.attr("transB", 0) else b
    y = torch.matmul(a, b)
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return [y]


def _t_matmul(node: Node, xs: list) -> list:
    return [torch.matmul(xs[0], xs[1])]


def _batch_bucket(n: int) -> int:
    """Shape classes: batch sizes share a built op within a power-of-two bucket."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


class _Layer:
    """A constant-weight layer: builds and caches kernel ops, reports itself to Session.layers()."""

    op_type = ""

    def __init__(self, node: Node, weight: np.ndarray, bias: np.ndarray | None, ctx: BuildContext) -> None:
        self.node = node
        self.name = node.label()
        self.weight = to_torch(np.asarray(weight, dtype=np.float32))
        self.bias = None if bias is None else to_torch(np.asarray(bias, dtype=np.float32).reshape(-1))
        self.ctx = ctx
        self._ops: OrderedDict[Any, Any] = OrderedDict()
        self._last: Any = None
        self._lock = threading.Lock()
        ctx.layers.append(self)

    def _get(self, key: Any, build: Callable[[], Any]) -> Any:
        with self._lock:
            op = self._ops.get(key)
            if op is None:
                op = build()
                self._ops[key] = op
                while len(self._ops) > _MAX_CACHED_SHAPES:
                    self._ops.popitem(last=False)
            else:
                self._ops.move_to_end(key)
            self._last = op
            return op

    def _build_unshaped(self) -> Any:
        raise NotImplementedError

    def _forced_or_auto(self, make: Callable[[str | None], Any]) -> Any:
        """Build with the session's forced kernel; where that kernel cannot run this layer
        (e.g. a conv-only kernel on a Gemm), let the factory choose instead, so one forced
        kernel can be benchmarked on a whole model. ``layers()`` shows what each layer got."""
        if self.ctx.kernel is None:
            return make(None)
        try:
            return make(self.ctx.kernel)
        except ValueError as forced_error:
            try:
                return make(None)
            except ValueError:
                raise forced_error from None

    def info(self) -> dict:
        """What Session.layers() shows; builds an op without a shape hint if none ran yet."""
        op = self._last if self._last is not None else self._get(None, self._build_unshaped)
        return {
            "name": self.name,
            "op": self.op_type,
            "weight_shape": tuple(int(d) for d in self.weight.shape),
            "sparsity": float(op.weight_sparsity),
            "kernel": op.kernel_name,
            "bytes": int(op.nbytes),
        }


class ConvLayer(_Layer):
    op_type = "Conv"

    def __init__(self, node: Node, weight: np.ndarray, bias: np.ndarray | None, ctx: BuildContext) -> None:
        super().__init__(node, weight, bias, ctx)
        self.nd = weight.ndim - 2
        self.groups = int(node.attr("group", 1))
        self.weight4 = self.weight if self.nd == 2 else self.weight.unsqueeze(2)  # 1-D runs as 2-D
        self.residual = bool(node.attrs.get(FUSED_RESIDUAL))
        self.relu = bool(node.attrs.get(FUSED_RELU))
        # input shape -> built op: the per-run path is one dict lookup, not a pads resolution.
        self._by_shape: dict[tuple[int, ...], Any] = {}

    def _make(self, input_shape: tuple[int, ...] | None, pads4, strides, dilations) -> Any:
        from swat_deploy.kernels import make_conv2d

        return self._forced_or_auto(lambda kernel: make_conv2d(
            self.weight4, self.bias, tuple(strides), tuple(pads4), tuple(dilations), self.groups,
            input_shape=input_shape, kernel=kernel, threads=self.ctx.threads))

    def _to2d(self, strides, dilations, begins, ends):
        if self.nd == 2:
            return strides, dilations, (begins[0], begins[1], ends[0], ends[1])
        return (1, strides[0]), (1, dilations[0]), (0, begins[0], 0, ends[0])

    def _build_unshaped(self) -> Any:
        spatial = tuple(int(d) for d in self.weight.shape[2:])  # any size shows the kernel choice
        geometry = _conv_geometry(self.node, tuple(self.weight.shape), spatial)
        strides, dilations, pads4 = self._to2d(*geometry)
        return self._make(None, pads4, strides, dilations)

    def __call__(self, xs: list) -> list:
        x = xs[0]
        op = self._by_shape.get(x.shape) if self.nd == 2 and x.dtype == torch.float32 else None
        if op is None:
            return self._slow_call(xs)
        self._last = op
        return [op.fused(x, xs[3] if self.residual else None, self.relu)]

    def _slow_call(self, xs: list) -> list:
        x = xs[0]
        if x.dtype != torch.float32:
            return _t_conv(self.node, [x, self.weight.to(x.dtype),
                                       None if self.bias is None else self.bias.to(x.dtype)] + list(xs[3:]))
        if x.dim() != self.nd + 2:
            raise self.node.error(f"input of rank {x.dim()} given to a {self.nd}-D conv",
                                  f"feed a rank-{self.nd + 2} tensor")
        strides, dilations, begins, ends = _conv_geometry(self.node, tuple(self.weight.shape), tuple(x.shape[2:]))
        strides, dilations, pads4 = self._to2d(strides, dilations, begins, ends)
        x4 = x if self.nd == 2 else x.unsqueeze(2)
        shape = tuple(int(d) for d in x4.shape)
        key = (_batch_bucket(shape[0]),) + shape[1:] + tuple(pads4)
        op = self._get(key, lambda: self._make(shape, pads4, strides, dilations))
        if self.nd == 2:
            with self._lock:
                if len(self._by_shape) >= 4 * _MAX_CACHED_SHAPES:
                    self._by_shape.clear()
                self._by_shape[x.shape] = op
        y = op(x4)
        return [_epilogue(self.node, y if self.nd == 2 else y.squeeze(2), xs)]


class LinearLayer(_Layer):
    """Gemm / MatMul with a constant (O, I) weight; extra terms the kernel's bias cannot hold are
    applied after the kernel (``post_add``)."""

    def __init__(self, node: Node, weight: np.ndarray, bias: np.ndarray | None, ctx: BuildContext,
                 trans_a: bool = False, post_add: np.ndarray | None = None, c_index: int | None = None,
                 c_scale: float = 1.0) -> None:
        super().__init__(node, weight, bias, ctx)
        self.op_type = node.op_type
        self.trans_a = trans_a
        self.post_add = None if post_add is None else to_torch(post_add)
        self.c_index, self.c_scale = c_index, c_scale

    def _make(self, input_shape: tuple[int, ...] | None) -> Any:
        from swat_deploy.kernels import make_linear

        return self._forced_or_auto(lambda kernel: make_linear(
            self.weight, self.bias, input_shape=input_shape, kernel=kernel, threads=self.ctx.threads))

    def _build_unshaped(self) -> Any:
        return self._make(None)

    def __call__(self, xs: list) -> list:
        a = xs[0]
        if a.dtype != torch.float32:
            return self._fallback(xs)
        if self.trans_a:
            a = a.t()
        lead = tuple(a.shape[:-1])
        k = int(self.weight.shape[1])
        if a.shape[-1] != k:
            raise self.node.error(f"input's last dim {a.shape[-1]} does not match the weight's {k}",
                                  "feed a tensor with the model's feature size")
        a2 = a.reshape(-1, k)
        shape = (int(a2.shape[0]), k)
        op = self._get((_batch_bucket(shape[0]), k), lambda: self._make(shape))
        y = op(a2).reshape(lead + (int(self.weight.shape[0]),))
        if self.post_add is not None:
            y = y + self.post_add
        if self.c_index is not None:
            c = xs[self.c_index]
            y = y + (c * self.c_scale if self.c_scale != 1.0 else c)
        return [y]

    def _fallback(self, xs: list) -> list:
        a = xs[0]
        a = a.t() if self.trans_a else a
        y = torch.matmul(a, self.weight.to(a.dtype).t())
        if self.bias is not None:
            y = y + self.bias.to(a.dtype)
        if self.post_add is not None:
            y = y + self.post_add.to(a.dtype)
        if self.c_index is not None:
            y = y + xs[self.c_index] * self.c_scale
        return [y]


# ------------------------------------------------------------------------------ prepare


def _const(node: Node, consts: Mapping[str, np.ndarray], index: int) -> np.ndarray | None:
    if len(node.inputs) <= index or not node.inputs[index]:
        return None
    return consts.get(node.inputs[index])


def _is_float(a: np.ndarray | None) -> bool:
    """Only float32 weights go to the kernels; other types keep their precision in torch."""
    return a is not None and a.dtype == np.float32


def _prepare_conv(node: Node, consts: Mapping[str, np.ndarray], ctx: BuildContext):
    w = _const(node, consts, 1)
    has_b = len(node.inputs) > 2 and bool(node.inputs[2])
    b = _const(node, consts, 2)
    if not _is_float(w) or w.ndim not in (3, 4) or (has_b and b is None):
        return None  # dynamic weight/bias or 3-D conv: plain torch
    groups = int(node.attr("group", 1))
    if groups < 1 or w.shape[0] % groups:
        raise node.error(f"group={groups} does not divide the {w.shape[0]} output channels",
                         "fix the group attribute")
    return ConvLayer(node, w, b, ctx)


def _prepare_gemm(node: Node, consts: Mapping[str, np.ndarray], ctx: BuildContext):
    b = _const(node, consts, 1)
    if not _is_float(b) or b.ndim != 2:
        return None
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    weight = b if node.attr("transB", 0) else b.T  # -> (O, I)
    if alpha != 1.0:
        weight = weight * np.float32(alpha)  # scaling keeps every zero a zero
    out_features = weight.shape[0]
    bias = post_add = None
    c_index = None
    has_c = len(node.inputs) > 2 and bool(node.inputs[2])
    if has_c:
        c = _const(node, consts, 2)
        if c is None:
            c_index = 2
        else:
            c = (c * np.float32(beta)).astype(np.float32) if beta != 1.0 else c.astype(np.float32)
            if c.size == 1:
                bias = np.full(out_features, c.reshape(-1)[0], dtype=np.float32)
            elif c.size == out_features and c.ndim >= 1 and c.shape[-1] == out_features:
                bias = c.reshape(out_features)
            else:
                post_add = c
    return LinearLayer(node, weight, bias, ctx, trans_a=bool(node.attr("transA", 0)), post_add=post_add,
                       c_index=c_index, c_scale=beta)


def _prepare_matmul(node: Node, consts: Mapping[str, np.ndarray], ctx: BuildContext):
    b = _const(node, consts, 1)
    if not _is_float(b) or b.ndim != 2 or node.inputs[0] in consts:
        return None
    return LinearLayer(node, b.T, None, ctx)


OPS: list[OpDef] = [
    OpDef("Conv", run=_t_conv, prepare=_prepare_conv),
    OpDef("Gemm", run=_t_gemm, prepare=_prepare_gemm),
    OpDef("MatMul", run=_t_matmul, prepare=_prepare_matmul),
]
