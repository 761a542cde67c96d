"""QDQ graphs on swat's int8 kernels: recognise onnxruntime's quantised layers, fuse, run.

onnxruntime's ``quantize_static`` (QDQ format) writes every layer as float ops bracketed by
QuantizeLinear / DequantizeLinear, and fuses them back into int8 ops when it loads the model.
This module does the same fusion for the Session, with the sparse int8 conv of
`int8_direct` in place of onnxruntime's dense QLinearConv:

- ``DQ(x_u8) -> Conv(., DQ(w_i8), DQ(b_i32)) [-> Relu] -> Q(y_u8)``  =>  one ``SwatQLinearConv``
  (uint8 in, uint8 out: the activation never exists as float between two convs);
- ``DQ(a_u8) + DQ(b_u8) [-> Relu] -> Q``  =>  ``SwatQLinearAdd`` (the residual, in float32
  then requantised, as onnxruntime's QLinearAdd), and then, when one operand is a fused conv's
  output used nowhere else, into that conv's output loop (`_fuse_residual`);
- the classifier head on uint8 (`_fuse_tail`): ``DQ -> GlobalAveragePool -> Q``, ``DQ -> Flatten
  -> Q`` (a move: the op on the uint8s), ``DQ -> Gemm(DQ(w_i8)) -> Q`` (int sums, requantised);
- consecutive fused convs (a ResNet backbone, once its adds are fused) => one
  ``SwatQLinearConvChain``, run as one C call on buffers planned once per input shape
  (`_chain_convs`; ``SWAT_INT8_CHAIN=0`` runs them one step each);
- every other QuantizeLinear / DequantizeLinear runs as a numpy / torch op, and the weight DQs
  of layers not fused are folded to float constants, so those layers take the float32 kernels.

Why so much fusion: at batch 1 a ResNet-18 int8 layer's arithmetic is 10-50 us, and each op
the Session dispatches from Python costs 5-50 us here (the later when the multiply has just
evicted the interpreter's working set from the caches), so glue, not arithmetic, decided
whether we beat onnxruntime's own fused int8 graph.

Results equal onnxruntime's on the same file up to int8 rounding: the fused conv's int32 sums and
requantisation are onnxruntime's own (bit-exact for equal inputs), the fused residual add is
QLinearAdd's float32 formula in the same order; ops in float between Q/DQ (pooling, the input
quantisation) may round a value to the neighbouring step. Tested: logits within 2 output steps
(tests/test_int8_kernels.py); measured on the ResNet-18 of scripts/bench_int8.py: within 1.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Mapping

import numpy as np
import torch

from ..formats import sparsity_of
from ..onnx_ops.base import BuildContext, Node, OpDef
from ..onnx_ops.graph import Graph
from ..onnx_ops.optimize import DEFAULT_DOMAINS, FUSED_RELU, FUSED_RESIDUAL, optimize, remove_dead, toposort
from .base import numba_threads, serial_call, thread_cap
from .int8_direct import Int8DirectKernel, QConvSpec, requant_multipliers

QCONV, QADD = "SwatQLinearConv", "SwatQLinearAdd"
QGAP, QGEMM = "SwatQLinearGlobalAveragePool", "SwatQLinearGemm"
QCHAIN = "SwatQLinearConvChain"
# ops that only move values: DQ -> op -> Q with equal (scale, zero point) is the op on the uint8s
_MOVES = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose")


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
    if scale.numel() == 1 and zp.numel() == 1 and x.dtype == torch.float32:
        # per tensor (every activation): numpy's ufuncs cost ~1 us a call here, torch's 3-7 us, and
        # at batch 1 this op's glue was larger than its arithmetic; same float32 division,
        # round half to even and saturation as below
        lo, hi = (0, 255) if zp.dtype == torch.uint8 else (-128, 127)
        v = np.divide(x.numpy(), np.float32(scale.item()), dtype=np.float32)
        np.rint(v, out=v)
        v += np.float32(zp.item())
        np.clip(v, lo, hi, out=v)
        return [torch.from_numpy(v.astype(np.uint8 if zp.dtype == torch.uint8 else np.int8))]
    axis = int(node.attr("axis", 1))
    lo, hi = (0, 255) if zp.dtype == torch.uint8 else (-128, 127)
    q = torch.round(x.float() / _axis_shape(scale, x, axis)) + _axis_shape(zp.to(torch.float32), x, axis)
    return [q.clamp_(lo, hi).to(zp.dtype)]


def _dequantize(node: Node, inputs: list) -> list[torch.Tensor]:
    x, scale = inputs[0], inputs[1].float()
    has_zp = len(inputs) > 2 and inputs[2] is not None
    if scale.numel() == 1 and (not has_zp or inputs[2].numel() == 1) and x.dtype in (torch.uint8, torch.int8):
        v = x.numpy().astype(np.float32)  # per tensor: numpy, see _quantize
        if has_zp:
            v -= np.float32(inputs[2].item())
        v *= np.float32(scale.item())
        return [torch.from_numpy(v)]
    axis = int(node.attr("axis", 1))
    v = x.to(torch.float32)
    if has_zp:
        v = v - _axis_shape(inputs[2].to(torch.float32), x, axis)
    return [v * _axis_shape(scale, x, axis)]


def _qadd(node: Node, inputs: list) -> list[torch.Tensor]:
    """onnxruntime's QLinearAdd: a * (sa / sy) + b * (sb / sy) + (zy - za sa/sy - zb sb/sy), rounded,
    on the compiled loop (torch's chain of casts and passes took 7 ms a residual at batch 64)."""
    from swat_native import int8 as native

    a, b = inputs[0], inputs[1]
    at = node.attrs
    if a.shape != b.shape or a.dtype != torch.uint8 or b.dtype != torch.uint8:
        ra, rb, c = float(at["ra"]), float(at["rb"]), float(at["c"])
        y = torch.add(a.to(torch.float32) * ra, b.to(torch.float32), alpha=rb).add_(c)
        return [y.round_().clamp_(float(at["lo"]), 255.0).to(torch.uint8)]
    a, b = a.contiguous(), b.contiguous()
    threads = _threads(None)
    if native.layer_call_available():  # one C call on the int8 pool (a numba prange start costs ~30 us)
        y = torch.empty(a.shape, dtype=torch.uint8)
        native.add_mt_ptr(native.isa_code(), a.data_ptr(), b.data_ptr(), y.data_ptr(), at["ra"], at["rb"], at["c"],
                          at["lo"], y.numel(), threads)
        return [y]
    an, bn = a.numpy().reshape(-1), b.numpy().reshape(-1)
    y = np.empty(a.shape, np.uint8)
    par = threads > 1 and y.size >= 1 << 15
    native.add_loop(par)(native.isa_code(), an, bn, y.reshape(-1), at["ra"], at["rb"], at["c"], int(at["lo"]),
                         threads if par else 1)
    return [torch.from_numpy(y)]


def _threads(ctx: BuildContext | None) -> int:
    """Work items for a step: the run's thread cap, else the session's threads, else numba's."""
    if serial_call():
        return 1
    cap = _thread_cap()
    if cap is not None:
        return max(1, cap)
    if ctx is not None and ctx.threads:
        return ctx.threads
    return numba_threads()


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
        if "res_ra" in a:
            self.kernel.fuse_residual(a["res_ra"], a["res_rb"], a["res_c"], a["res_lo"])
        self.name = node.name or node.outputs[0]
        self.ctx = ctx
        self.sparsity = sparsity_of(w)
        self.weight_shape = tuple(int(d) for d in w.shape)
        ctx.layers.append(self)

    def __call__(self, inputs: list) -> list[torch.Tensor]:
        return [self.kernel(inputs[0], _threads(self.ctx), inputs[4] if len(inputs) > 4 else None)]

    def info(self) -> dict:
        return {"name": self.name, "op": self.op_type, "weight_shape": self.weight_shape,
                "sparsity": self.sparsity, "kernel": Int8DirectKernel.name, "bytes": int(self.kernel.nbytes)}


def _thread_cap() -> int | None:
    """The Session's per-run thread cap (`torch_thread_cap`), None when there is none."""
    return thread_cap()


def _qgap(node: Node, inputs: list) -> list[torch.Tensor]:
    """Q(GlobalAveragePool(DQ(x))) on uint8: the mean of the integers (exact, float64), then
    dequantised and requantised once (onnxruntime's float path may land on the neighbouring step)."""
    a = node.attrs
    x = inputs[0].numpy()
    flat = x.reshape(x.shape[0] * x.shape[1], -1)
    # integer sums as a float32 matrix-vector product: exact below 2^24 (65793 pixels of 255),
    # ~5x faster here than numpy's mean with a dtype (its casting reduce loop)
    dt = np.float32 if flat.shape[1] * 255 < 2**24 else np.float64
    m = (flat.astype(dt) @ np.ones(flat.shape[1], dt)).astype(np.float64).reshape(x.shape[:2]) / flat.shape[1]
    v = np.float32((m - a["x_zero"]) * np.float32(a["x_scale"])) / np.float32(a["y_scale"])
    q = np.clip(np.rint(v) + a["y_zero"], 0, 255).astype(np.uint8)
    return [torch.from_numpy(q.reshape(x.shape[0], x.shape[1], *([1] * (x.ndim - 2))))]


def _prepare_qgemm(node: Node, consts: Mapping[str, np.ndarray], ctx: BuildContext) -> Any:
    a = node.attrs
    w = consts[node.inputs[1]].astype(np.float64)  # (N, K) int8 values; float64 sums are exact
    ws = consts[node.inputs[2]].astype(np.float32).reshape(-1)
    bias = consts[node.inputs[3]].astype(np.float64).reshape(-1) if len(node.inputs) > 3 and node.inputs[3] else None
    corr = -float(a["x_zero"]) * w.sum(axis=1) + (0.0 if bias is None else bias)
    mult = requant_multipliers(a["x_scale"], np.broadcast_to(ws, (w.shape[0],)), a["y_scale"])
    wt = np.ascontiguousarray(w.T)
    lo = np.float32(-a["y_zero"])
    hi = np.float32(255 - a["y_zero"])
    zy = int(a["y_zero"])

    def run(inputs: list) -> list[torch.Tensor]:
        x = inputs[0].numpy().reshape(inputs[0].shape[0], -1)
        acc = x.astype(np.float64) @ wt + corr  # the int32 sums of onnxruntime's QGemm, exactly
        f = np.clip(acc.astype(np.float32) * mult, lo, hi)
        return [torch.from_numpy((np.rint(f) + zy).astype(np.uint8))]

    return run


def _chain_convs(g: Graph) -> None:
    """Runs of >= 2 consecutive SwatQLinearConv nodes => one SwatQLinearConvChain (attrs
    ``members``: the conv nodes; inputs: the activations the run reads from outside; outputs:
    its values read after it or graph outputs). With the residual adds fused, a ResNet
    backbone is one run."""
    nodes = g.nodes
    last_use: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for v in n.inputs:
            if v:
                last_use[v] = i
    outputs = {v.name for v in g.outputs}
    out: list[Node] = []
    i = 0
    while i < len(nodes):
        j = i
        while j < len(nodes) and nodes[j].op_type == QCONV:
            j += 1
        if j - i < 2:
            out.append(nodes[i])
            i += 1
            continue
        run = nodes[i:j]
        made = {n.outputs[0] for n in run}
        ext: list[str] = []
        for n in run:
            for v in (n.inputs[0], n.inputs[4] if len(n.inputs) > 4 else ""):
                if v and v not in made and v not in ext:
                    ext.append(v)
        outs = [n.outputs[0] for n in run if n.outputs[0] in outputs or last_use.get(n.outputs[0], -1) >= j]
        out.append(Node(QCHAIN, ext, outs, {"members": list(run)}, (run[0].name or run[0].outputs[0]) + ".chain", "",
                        run[0].opset))
        i = j
    g.nodes = out


class QConvChain:
    """A SwatQLinearConvChain: its convs (`QConvLayer`, each reported in ``Session.layers()``)
    run by one C call (`swat_native.int8.QChainCall`) on buffers set up once per input shape
    and calling thread; or, without that build, one layer call at a time."""

    def __init__(self, node: Node, consts: Mapping[str, np.ndarray], ctx: BuildContext) -> None:
        self.nodes = list(node.attrs["members"])
        self.layers = [QConvLayer(m, consts, ctx) for m in self.nodes]
        self.ext, self.outs, self.ctx = list(node.inputs), list(node.outputs), ctx
        self._plans: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, inputs: list) -> list[torch.Tensor]:
        from swat_native import int8 as native

        threads = _threads(self.ctx)
        if not (native.chain_available() and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                                 and t.is_contiguous() for t in inputs)):
            return self._layer_by_layer(inputs, threads)
        key = (threading.get_ident(), threads) + tuple(tuple(t.shape) for t in inputs)
        plan = self._plans.get(key)
        if plan is None:
            with self._lock:
                plan = self._plans[key] = _ChainPlan(self, [tuple(t.shape) for t in inputs], threads)
        return plan.run(inputs)

    def _layer_by_layer(self, inputs: list, threads: int) -> list[torch.Tensor]:
        vals = dict(zip(self.ext, inputs))
        for node, layer in zip(self.nodes, self.layers):
            res = vals[node.inputs[4]] if len(node.inputs) > 4 else None
            vals[node.outputs[0]] = layer.kernel(vals[node.inputs[0]], threads, res)
        return [vals[o] for o in self.outs]


class _ChainPlan:
    """One input shape on one calling thread: every layer's struct with fixed pointers into an
    arena of this plan (a value's bytes are reused once no later layer reads it) and one shared
    packed-input scratch; a run sets only the pointers of the chain's inputs."""

    def __init__(self, chain: QConvChain, shapes: list[tuple], threads: int) -> None:
        from swat_native import int8 as native

        shape = dict(zip(chain.ext, shapes))
        last: dict[str, int] = {}
        for i, node in enumerate(chain.nodes):
            for v in (node.inputs[0], node.inputs[4] if len(node.inputs) > 4 else ""):
                if v:
                    last[v] = i
        keep = set(chain.outs)
        free: list[tuple[int, int]] = []  # (offset, size) blocks of the arena
        top = 0
        where: dict[str, int] = {}

        def alloc(size: int) -> int:
            nonlocal top
            size = -(-size // 64) * 64
            for k, (off, sz) in enumerate(free):
                if sz >= size:
                    free[k:k + 1] = [(off + size, sz - size)] if sz > size else []
                    return off
            off, top = top, top + size
            return off

        calls, scratch, sizes = [], 0, {}
        for i, (node, layer) in enumerate(zip(chain.nodes, chain.layers)):
            n, c, h, w = shape[node.inputs[0]]
            call, out_shape, need = layer.kernel.layer_call(n, h, w, threads)
            res = node.inputs[4] if len(node.inputs) > 4 else ""
            if res and shape[res] != out_shape:
                raise ValueError(f"residual {shape[res]} does not match the conv output {out_shape}")
            out = node.outputs[0]
            shape[out] = out_shape
            sizes[out] = int(np.prod(out_shape))
            where[out] = alloc(sizes[out])
            for v in {node.inputs[0], res} - {""}:
                if last.get(v) == i and v in where and v not in keep:
                    free.append((where[v], -(-sizes[v] // 64) * 64))
            calls.append((call, node.inputs[0], res, out))
            scratch = max(scratch, need)
        self.arena = np.empty(top + 64, np.uint8)
        base = self.arena.ctypes.data + (-self.arena.ctypes.data) % 64
        raw = np.empty(scratch + 64, np.uint8)
        self.scratch = raw  # kept alive: the structs point into it
        xp = raw.ctypes.data + (-raw.ctypes.data) % 64
        self.setters: list[tuple[Any, str, int]] = []  # (struct, field, chain input index)
        for call, x, res, out in calls:
            a = call.args
            a.xp, a.y, a.isa = xp, base + where[out], native.isa_code(None)
            for field, v in (("x", x), ("res", res)):
                if not v:
                    continue
                if v in where:
                    setattr(a, field, base + where[v])
                else:
                    self.setters.append((a, field, chain.ext.index(v)))
        start = base - self.arena.ctypes.data
        self.outputs = [torch.from_numpy(self.arena[start + where[o]:start + where[o] + sizes[o]]).view(shape[o])
                        for o in chain.outs]
        self.call = native.QChainCall([c for c, _, _, _ in calls])

    def run(self, inputs: list) -> list[torch.Tensor]:
        for a, field, k in self.setters:
            setattr(a, field, inputs[k].data_ptr())
        self.call.run()
        # the arena is this plan's: the next run on this thread overwrites it, by when the
        # Session has consumed (or copied out) this run's values
        return list(self.outputs)


OPS: dict[str, OpDef] = {
    "QuantizeLinear": OpDef("QuantizeLinear", run=_quantize),
    # kept out of folding: the int8 weight behind a DQ is what the fusion below looks for
    "DequantizeLinear": OpDef("DequantizeLinear", run=_dequantize, foldable=False),
    QCONV: OpDef(QCONV, prepare=_prepare_qconv, foldable=False),
    QADD: OpDef(QADD, run=_qadd, foldable=False),
    QGAP: OpDef(QGAP, run=_qgap, foldable=False),
    QGEMM: OpDef(QGEMM, prepare=_prepare_qgemm, foldable=False),
    QCHAIN: OpDef(QCHAIN, prepare=lambda node, consts, ctx: QConvChain(node, consts, ctx), foldable=False),
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
    remove_dead(g)  # the activation DQs the fusion bypassed: they would count as uses below
    _fuse_residual(g)
    _fuse_tail(g)
    remove_dead(g)
    _fold_weight_dq(g)
    g.nodes = toposort(g)
    remove_dead(g)
    if os.environ.get("SWAT_INT8_CHAIN", "1").strip().lower() not in ("0", "off", "false"):
        _chain_convs(g)  # last: the chain node lists its members' weights in attrs, not inputs
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


def _fuse_residual(g: Graph) -> None:
    """``SwatQLinearConv -> SwatQLinearAdd`` (the conv's output used only by the add) => one
    SwatQLinearConv whose output loop adds the residual (input 4) and requantises, as the add
    would have: one step, one pass over the block's output and one uint8 tensor fewer. Of two
    fusable convs (the block's conv2 and its downsample shortcut) the later in graph order takes
    the add; the other's output is the residual."""
    producer = {o: n for n in g.nodes for o in n.outputs if o}
    uses: dict[str, int] = {}
    for n in g.nodes:
        for name in n.inputs:
            if name:
                uses[name] = uses.get(name, 0) + 1
    outputs = {v.name for v in g.outputs}
    order = {id(n): i for i, n in enumerate(g.nodes)}
    drop: set[int] = set()
    for add in g.nodes:
        if add.op_type != QADD or len(add.inputs) != 2:
            continue
        cands = []
        for k in (0, 1):
            p = producer.get(add.inputs[k])
            if (p is not None and p.op_type == QCONV and "res_ra" not in p.attrs and uses.get(add.inputs[k]) == 1
                    and add.inputs[k] not in outputs):
                cands.append((order[id(p)], k, p))
        if not cands:
            continue
        _, k, conv = max(cands, key=lambda t: t[0])
        ra, rb = (add.attrs["ra"], add.attrs["rb"]) if k == 0 else (add.attrs["rb"], add.attrs["ra"])
        conv.attrs = {**conv.attrs, "res_ra": ra, "res_rb": rb, "res_c": add.attrs["c"], "res_lo": add.attrs["lo"]}
        conv.inputs = (list(conv.inputs) + [""] * 4)[:4] + [add.inputs[1 - k]]
        conv.outputs = list(add.outputs)
        drop.add(id(add))
    g.nodes = [n for n in g.nodes if id(n) not in drop]


def _fuse_tail(g: Graph) -> None:
    """The classifier head on uint8, as onnxruntime runs it: ``DQ -> GlobalAveragePool -> Q`` =>
    SwatQLinearGlobalAveragePool; ``DQ -> Flatten (any op in _MOVES) -> Q`` with equal
    quantisation => the op on the uint8s (exact); ``DQ -> Gemm(., DQ(w_i8), b) -> Q`` =>
    SwatQLinearGemm (int sums, requantised as a conv). At batch 1 these ten small float ops,
    a few us of arithmetic each, cost ~0.4 ms of glue - a quarter of the run."""
    consts = g.constants
    producer = {o: n for n in g.nodes for o in n.outputs if o}
    uses: dict[str, int] = {}
    for n in g.nodes:
        for name in n.inputs:
            if name:
                uses[name] = uses.get(name, 0) + 1
    outputs = {v.name for v in g.outputs}
    consumer = {name: n for n in g.nodes for name in n.inputs if name}

    def act(dq: Node | None) -> tuple[float, int] | None:  # per-tensor uint8 (scale, zero point)
        if dq is None or dq.op_type not in ("DequantizeLinear", "QuantizeLinear") or dq.inputs[0] in consts:
            return None
        sc = _scalar(consts, dq.inputs[1])
        z = _scalar(consts, dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] else None
        if sc is None or z is None or z.dtype != np.uint8:
            return None
        return float(sc), int(z)

    def sole(name: str) -> Node | None:
        n = consumer.get(name)
        return None if n is None or uses.get(name) != 1 or name in outputs else n

    replace: dict[int, Node | None] = {}
    for node in g.nodes:
        if node.op_type not in ("GlobalAveragePool", "Gemm") + _MOVES or not node.inputs:
            continue
        dq = producer.get(node.inputs[0])
        q = sole(node.outputs[0])
        pin, pout = act(dq), act(q) if q is not None and q.op_type == "QuantizeLinear" else None
        if pin is None or pout is None or dq.op_type != "DequantizeLinear" or any(id(n) in replace for n in (dq, q)):
            continue
        src = dq.inputs[0]
        if node.op_type == "GlobalAveragePool":
            new = Node(QGAP, [src], [q.outputs[0]], {"x_scale": pin[0], "x_zero": pin[1], "y_scale": pout[0],
                                                     "y_zero": pout[1]}, node.name, "", node.opset)
        elif node.op_type in _MOVES:
            if pin != pout:
                continue
            new = Node(node.op_type, [src] + list(node.inputs[1:]), [q.outputs[0]], dict(node.attrs), node.name,
                       node.domain, node.opset)
        else:
            new = _qgemm_node(g, node, src, pin, pout, q, producer)
            if new is None:
                continue
        replace[id(node)] = new
        replace[id(q)] = None
    if replace:
        g.nodes = [replace.get(id(n), n) for n in g.nodes if replace.get(id(n), n) is not None]


def _qgemm_node(g: Graph, gemm: Node, src: str, pin: tuple, pout: tuple, q: Node, producer: dict) -> Node | None:
    """SwatQLinearGemm for ``Gemm(DQ(x), DQ(w_i8 (N, K), per output channel), b)`` with transB=1,
    transA=0, alpha = beta = 1; None otherwise (it then stays a float Gemm)."""
    consts = g.constants
    a = gemm.attrs
    if int(a.get("transA", 0)) != 0 or int(a.get("transB", 0)) != 1 or float(a.get("alpha", 1.0)) != 1.0 \
            or float(a.get("beta", 1.0)) != 1.0 or len(gemm.inputs) < 2:
        return None
    wdq = producer.get(gemm.inputs[1])
    if wdq is None or wdq.op_type != "DequantizeLinear" or wdq.inputs[0] not in consts:
        return None
    w, ws = consts[wdq.inputs[0]], consts.get(wdq.inputs[1])
    wz = consts.get(wdq.inputs[2]) if len(wdq.inputs) > 2 and wdq.inputs[2] else None
    if w.dtype != np.int8 or w.ndim != 2 or ws is None or (wz is not None and np.any(wz != 0)):
        return None
    if ws.size not in (1, w.shape[0]) or (ws.size > 1 and int(wdq.attr("axis", 1)) not in (0, -2)):
        return None
    ws = np.broadcast_to(ws.astype(np.float32).reshape(-1), (w.shape[0],)).copy()
    bias = None
    if len(gemm.inputs) > 2 and gemm.inputs[2]:
        bdq = producer.get(gemm.inputs[2])
        bdq = bdq if bdq is not None and bdq.op_type == "DequantizeLinear" and bdq.inputs[0] in consts else None
        bias = _int_bias(consts, gemm.inputs[2], bdq, pin[0], ws)
        if bias is None or bias.size != w.shape[0]:
            return None
    base = (gemm.name or gemm.outputs[0]) + ".swat_int8"
    names = [f"{base}.w", f"{base}.w_scale"] + ([f"{base}.b"] if bias is not None else [])
    consts[names[0]], consts[names[1]] = w, ws
    if bias is not None:
        consts[names[2]] = bias
    attrs = {"x_scale": pin[0], "x_zero": pin[1], "y_scale": pout[0], "y_zero": pout[1]}
    return Node(QGEMM, [src] + names, [q.outputs[0]], attrs, gemm.name, "", gemm.opset)


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
