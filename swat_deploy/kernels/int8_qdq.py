"""QDQ graphs on swat's int8 kernels: recognise onnxruntime's quantised layers, fuse, run.

onnxruntime's ``quantize_static`` (QDQ format) writes every layer as float ops bracketed by
QuantizeLinear / DequantizeLinear, and fuses them back into int8 ops when it loads the model.
This module does the same fusion for the Session, with the sparse int8 conv of
`int8_direct` in place of onnxruntime's dense QLinearConv:

- ``DQ(x_u8) -> Conv(., DQ(w_i8), DQ(b_i32)) [-> Relu] -> Q(y_u8)``  =>  one ``SwatQLinearConv``
  (uint8 in, uint8 out: the activation never exists as float between two convs);
- ``DQ(a_u8) + DQ(b_u8) [-> Relu] -> Q``  =>  ``SwatQLinearAdd`` (the residual, in float32
  then requantised, as onnxruntime's QLinearAdd);
- every other QuantizeLinear / DequantizeLinear runs as a torch op, and the weight DQs of
  layers not fused (the classifier's Gemm) are folded to float constants, so those layers take
  the float32 kernels.

Results equal onnxruntime's on the same file up to int8 rounding: the fused conv's int32 sums and
requantisation are onnxruntime's own (bit-exact for equal inputs); ops in float between Q/DQ
(residual add, pooling, the input quantisation) may round a value to the neighbouring step.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..onnx_ops.base import BuildContext, Node, OpDef
from ..onnx_ops.graph import Graph
from ..onnx_ops.optimize import DEFAULT_DOMAINS, FUSED_RELU, FUSED_RESIDUAL, optimize, remove_dead, toposort
from .int8_direct import Int8DirectKernel, QConvSpec

QCONV, QADD = "SwatQLinearConv", "SwatQLinearAdd"


# ------------------------------------------------------------------ Q / DQ as torch ops
def _axis_shape(scale: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    if scale.numel() == 1:
        return scale.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return scale.reshape(shape)


def _quantize(node: Node, inputs: list) -> list[torch.Tensor]:
    x, scale = inputs[0], inputs[1].float()
    zp = inputs[2] if len(inputs) > 2 and inputs[2] is not None else torch.zeros((), dtype=torch.uint8)
    axis = int(node.attr("axis", 1))
    lo, hi = (0, 255) if zp.dtype == torch.uint8 else (-128, 127)
    q = torch.round(x.float() / _axis_shape(scale, x, axis)) + _axis_shape(zp.to(torch.float32), x, axis)
    return [q.clamp_(lo, hi).to(zp.dtype)]


def _dequantize(node: Node, inputs: list) -> list[torch.Tensor]:
    x, scale = inputs[0], inputs[1].float()
    axis = int(node.attr("axis", 1))
    v = x.to(torch.float32)
    if len(inputs) > 2 and inputs[2] is not None:
        v = v - _axis_shape(inputs[2].to(torch.float32), x, axis)
    return [v * _axis_shape(scale, x, axis)]


def _qadd(node: Node, inputs: list) -> list[torch.Tensor]:
    """onnxruntime's QLinearAdd: a * (sa / sy) + b * (sb / sy) + (zy - za sa/sy - zb sb/sy), rounded,
    on the compiled loop (torch's chain of casts and passes took 7 ms a residual at batch 64)."""
    from swat_native import int8 as native

    a, b = inputs[0], inputs[1]
    if a.shape != b.shape or a.dtype != torch.uint8 or b.dtype != torch.uint8:
        ra, rb, c = float(node.attrs["ra"]), float(node.attrs["rb"]), float(node.attrs["c"])
        y = torch.add(a.to(torch.float32) * ra, b.to(torch.float32), alpha=rb).add_(c)
        return [y.round_().clamp_(float(node.attrs["lo"]), 255.0).to(torch.uint8)]
    an, bn = np.ascontiguousarray(a.numpy()).reshape(-1), np.ascontiguousarray(b.numpy()).reshape(-1)
    y = np.empty(a.shape, np.uint8)
    threads = _threads(None)
    par = threads > 1 and y.size >= 1 << 15
    native.add_loop(par)(native.isa_code(), an, bn, y.reshape(-1), node.attrs["ra"], node.attrs["rb"],
                         node.attrs["c"], int(node.attrs["lo"]), threads if par else 1)
    return [torch.from_numpy(y)]


def _threads(ctx: BuildContext | None) -> int:
    """Work items for a step: the run's thread cap, else the session's threads, else numba's."""
    from .base import serial_call

    if serial_call():
        return 1
    cap = _thread_cap()
    if cap is not None:
        return max(1, cap)
    if ctx is not None and ctx.threads:
        return ctx.threads
    import numba

    return int(numba.get_num_threads())


def _prepare_qconv(node: Node, consts: Mapping[str, np.ndarray], ctx: BuildContext) -> Any:
    return QConvLayer(node, consts, ctx)


class QConvLayer:
    """One fused QDQ conv: the prepared int8 kernel, reported in ``Session.layers()``."""

    op_type = "QLinearConv"

    def __init__(self, node: Node, consts: Mapping[str, np.ndarray], ctx: BuildContext) -> None:
        a = node.attrs
        w = consts[node.inputs[1]]
        spec = QConvSpec(tuple(int(d) for d in w.shape), tuple(a["strides"]), tuple(a["pads"]), (1, 1), 1,
                         float(a["x_scale"]), int(a["x_zero"]), float(a["y_scale"]), int(a["y_zero"]),
                         bool(a["relu"]))
        bias = consts[node.inputs[3]] if len(node.inputs) > 3 and node.inputs[3] else None
        self.kernel = Int8DirectKernel().prepare(w, consts[node.inputs[2]], bias, spec)
        self.name = node.name or node.outputs[0]
        self.ctx = ctx
        self.sparsity = float(1.0 - np.count_nonzero(w) / max(1, w.size))
        self.weight_shape = tuple(int(d) for d in w.shape)
        ctx.layers.append(self)

    def __call__(self, inputs: list) -> list[torch.Tensor]:
        return [self.kernel(inputs[0], _threads(self.ctx))]

    def info(self) -> dict:
        return {"name": self.name, "op": self.op_type, "weight_shape": self.weight_shape,
                "sparsity": self.sparsity, "kernel": Int8DirectKernel.name, "bytes": int(self.kernel.nbytes)}


def _thread_cap() -> int | None:
    """The Session's per-run thread cap (`torch_thread_cap`), None when there is none."""
    try:
        from swat_deploy.threads import _cap
    except ImportError:  # older layout: the cap lived in kernels.base
        from .base import _cap  # type: ignore[attr-defined,no-redef]
    return getattr(_cap, "value", None)


OPS: dict[str, OpDef] = {
    "QuantizeLinear": OpDef("QuantizeLinear", run=_quantize),
    # kept out of folding: the int8 weight behind a DQ is what the fusion below looks for
    "DequantizeLinear": OpDef("DequantizeLinear", run=_dequantize, foldable=False),
    QCONV: OpDef(QCONV, prepare=_prepare_qconv, foldable=False),
    QADD: OpDef(QADD, run=_qadd, foldable=False),
}


# --------------------------------------------------------------------------- the fusion
def _scalar(consts: Mapping[str, np.ndarray], name: str) -> np.ndarray | None:
    v = consts.get(name)
    return None if v is None or v.size != 1 else v.reshape(())


def build_graph(source: Graph, registry: Mapping[str, OpDef]) -> tuple[Graph, int] | None:
    """The QDQ graph ready for the Session (registry + `OPS`), and how many convs went to the
    int8 kernel; None when the graph has ops neither runs or no conv fuses (then onnxruntime
    runs the whole graph, as before)."""
    if not Int8DirectKernel().supports(QConvSpec((1, 4, 1, 1))):
        return None
    ops = {**registry, **OPS}
    if any(n.domain not in DEFAULT_DOMAINS or n.op_type not in ops for n in source.nodes):
        return None
    g = optimize(source, ops)
    fused = _fuse(g)
    if not fused:
        return None
    _fold_weight_dq(g)
    g.nodes = toposort(g)
    remove_dead(g)
    return g, fused


def _fuse(g: Graph) -> int:
    consts = g.constants
    producer = {o: n for n in g.nodes for o in n.outputs if o}
    uses: dict[str, int] = {}
    for n in g.nodes:
        for name in n.inputs:
            if name:
                uses[name] = uses.get(name, 0) + 1
    outputs = {v.name for v in g.outputs}
    consumer = {name: n for n in g.nodes for name in n.inputs if name}

    def dq_of(name: str, const: bool) -> Node | None:
        n = producer.get(name)
        if n is None or n.op_type != "DequantizeLinear" or (n.inputs[0] in consts) != const:
            return None
        return n

    def only_consumer(name: str, op_type: str) -> Node | None:
        n = consumer.get(name)
        if n is None or uses.get(name) != 1 or name in outputs or n.op_type != op_type:
            return None
        return n

    def act_params(dq: Node) -> tuple[float, int] | None:  # per-tensor uint8 (scale, zero point)
        s = _scalar(consts, dq.inputs[1])
        z = _scalar(consts, dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] else np.uint8(0)
        if s is None or z is None or z.dtype != np.uint8:
            return None
        return float(s), int(z)

    def tail(out: str) -> tuple[Node, Node | None] | None:  # [Relu ->] QuantizeLinear(uint8, per tensor)
        relu = only_consumer(out, "Relu")
        q = only_consumer(relu.outputs[0] if relu else out, "QuantizeLinear")
        if q is None or act_params(q) is None:
            return None
        return q, relu

    replace: dict[int, Node | None] = {}
    fused = 0
    for node in list(g.nodes):
        if node.op_type == "Conv" and not node.attrs.get(FUSED_RESIDUAL):
            new = _fuse_conv(g, node, dq_of, act_params, tail)
        elif node.op_type == "Add" and len(node.inputs) == 2:
            new = _fuse_add(node, dq_of, act_params, tail)
        else:
            continue
        if new is None:
            continue
        q, fnode, absorbed = new
        for n in absorbed:
            replace[id(n)] = None
        replace[id(q)] = fnode
        fused += node.op_type == "Conv"
    g.nodes = [replace.get(id(n), n) for n in g.nodes if replace.get(id(n), n) is not None]
    return fused


def _fuse_conv(g: Graph, conv: Node, dq_of: Any, act_params: Any, tail: Any) -> tuple | None:
    consts = g.constants
    xdq = dq_of(conv.inputs[0], False)
    wdq = dq_of(conv.inputs[1], True) if len(conv.inputs) > 1 else None
    if xdq is None or wdq is None or act_params(xdq) is None:
        return None
    w = consts[wdq.inputs[0]]
    wz = consts.get(wdq.inputs[2]) if len(wdq.inputs) > 2 and wdq.inputs[2] else None
    ws = consts.get(wdq.inputs[1])
    if w.dtype != np.int8 or w.ndim != 4 or ws is None or (wz is not None and np.any(wz != 0)):
        return None
    if ws.size not in (1, w.shape[0]) or (ws.size > 1 and int(wdq.attr("axis", 1)) not in (0, -4)):
        return None
    if int(conv.attr("group", 1)) != 1 or list(conv.ints("dilations", [1, 1])) != [1, 1]:
        return None
    if conv.attr("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return None
    strides = list(conv.ints("strides", [1, 1]))
    pads = list(conv.ints("pads", [0, 0, 0, 0]))  # ONNX: top, left, bottom, right
    if strides[0] != strides[1] or len(pads) != 4:
        return None
    t = tail(conv.outputs[0])
    if t is None:
        return None
    q, relu = t
    sx, zx = act_params(xdq)
    sy, zy = act_params(q)
    ws = np.broadcast_to(ws.astype(np.float32).reshape(-1), (w.shape[0],)).copy()
    bias = None
    if len(conv.inputs) > 2 and conv.inputs[2]:
        bias = _int_bias(consts, conv.inputs[2], dq_of(conv.inputs[2], True), sx, ws)
        if bias is None:
            return None
    base = (conv.name or conv.outputs[0]) + ".swat_int8"
    names = [f"{base}.w", f"{base}.w_scale"] + ([f"{base}.b"] if bias is not None else [])
    consts[names[0]], consts[names[1]] = w, ws
    if bias is not None:
        consts[names[2]] = bias
    attrs = {"strides": strides, "pads": [pads[0], pads[1], pads[2], pads[3]], "x_scale": sx, "x_zero": zx,
             "y_scale": sy, "y_zero": zy, "relu": int(relu is not None or bool(conv.attrs.get(FUSED_RELU)))}
    fnode = Node(QCONV, [xdq.inputs[0]] + names, [q.outputs[0]], attrs, conv.name, "", conv.opset)
    return q, fnode, [conv] + ([relu] if relu is not None else [])


def _int_bias(consts: Mapping[str, np.ndarray], name: str, dq: Node | None, sx: float,
              ws: np.ndarray) -> np.ndarray | None:
    """The int32 bias in units of sx * ws[o] (onnxruntime's quantised bias), from its DQ or a float."""
    if dq is not None:
        b = consts[dq.inputs[0]]
        if b.dtype != np.int32:
            return None
        bs = consts.get(dq.inputs[1])
        want = np.float32(sx) * ws
        if bs is None or bs.size not in (1, ws.size) or not np.allclose(bs.reshape(-1), want, rtol=1e-5):
            return None
        return b.reshape(-1).astype(np.int32)
    b = consts.get(name)
    if b is None or b.dtype != np.float32:
        return None
    return np.rint(b.reshape(-1).astype(np.float64) / (np.float64(np.float32(sx)) * ws)).astype(np.int32)


def _fuse_add(add: Node, dq_of: Any, act_params: Any, tail: Any) -> tuple | None:
    da, db = dq_of(add.inputs[0], False), dq_of(add.inputs[1], False)
    if da is None or db is None:
        return None
    pa, pb = act_params(da), act_params(db)
    t = tail(add.outputs[0])
    if pa is None or pb is None or t is None:
        return None
    q, relu = t
    sy, zy = act_params(q)
    (sa, za), (sb, zb) = pa, pb
    ra, rb = np.float32(sa) / np.float32(sy), np.float32(sb) / np.float32(sy)
    attrs = {"ra": float(ra), "rb": float(rb), "c": float(np.float32(zy) - np.float32(za) * ra - np.float32(zb) * rb),
             "lo": zy if relu is not None else 0}
    fnode = Node(QADD, [da.inputs[0], db.inputs[0]], [q.outputs[0]], attrs, add.name, "", add.opset)
    return q, fnode, [add] + ([relu] if relu is not None else [])


def _fold_weight_dq(g: Graph) -> None:
    """DequantizeLinear of a constant (a weight of a layer not fused): a float constant, so that
    layer runs on the float32 kernels like any other."""
    keep = []
    for n in g.nodes:
        if n.op_type == "DequantizeLinear" and all(not i or i in g.constants for i in n.inputs):
            ins = [torch.from_numpy(np.array(g.constants[i])) if i else None for i in n.inputs]
            g.constants[n.outputs[0]] = _dequantize(n, ins)[0].numpy()
        else:
            keep.append(n)
    g.nodes = keep
