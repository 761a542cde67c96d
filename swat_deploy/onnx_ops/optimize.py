"""Load-time graph rewrites: support check, topological order, constant folding, Conv+BN
fusion, dead-node removal, Conv+Add+Relu epilogue fusion.

Folding is what turns the exporter's compressed weights (values + packed bitmask expanded
with BitShift / CumSum / ScatterND / ...) back into a dense-shaped, mostly-zero constant, so
the Conv sees a constant weight and can go to a sparse kernel. Fusing BatchNormalization
into the preceding Conv scales each output channel, which keeps every zero a zero.
"""
from __future__ import annotations

import heapq
from typing import Mapping

import numpy as np

from training.errors import SwatError

from .base import Node, OpDef
from .graph import Graph

DEFAULT_DOMAINS = ("", "ai.onnx")


def check_supported(graph: Graph, registry: Mapping[str, OpDef]) -> None:
    """One-line error for the first node the Session cannot run."""
    for node in graph.nodes:
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in registry:
            op = node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"
            raise SwatError(f"unsupported ONNX op '{op}' (node '{node.label()}'); "
                            f"supported: {', '.join(sorted(registry))}")


def toposort(graph: Graph) -> list[Node]:
    """Nodes in dependency order (stable: original order where it is already valid)."""
    available = {vi.name for vi in graph.inputs} | set(graph.constants) | {""}
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        for out in node.outputs:
            if out:
                producer[out] = i
    waiting = [0] * len(graph.nodes)
    dependents: dict[int, list[int]] = {}
    for i, node in enumerate(graph.nodes):
        for name in set(node.inputs):
            if name in available:
                continue
            if name not in producer:
                raise SwatError(f"node '{node.label()}' ({node.op_type}) reads '{name}', which no node, "
                                "input or initializer provides; re-export the model")
            waiting[i] += 1
            dependents.setdefault(producer[name], []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(graph.nodes[i])
        for j in dependents.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(graph.nodes):
        stuck = next(n for i, n in enumerate(graph.nodes) if waiting[i] > 0)
        raise SwatError(f"the graph has a cycle through node '{stuck.label()}'; re-export the model")
    return order


def fold_constants(graph: Graph, registry: Mapping[str, OpDef]) -> None:
    """Evaluate (numpy) every node whose inputs are all constants; in place."""
    feeds = {vi.name for vi in graph.inputs}
    kept = []
    for node in graph.nodes:
        op = registry[node.op_type]
        ins = node.inputs
        if not op.foldable or any(n and (n not in graph.constants or n in feeds) for n in ins):
            kept.append(node)
            continue
        try:
            outs = op.run_numpy(node, [graph.constants[n] if n else None for n in ins])
        except SwatError:
            raise
        except Exception as exc:  # a broken model: report the node, on one line
            msg = " ".join(str(exc).split())
            raise node.error(f"constant folding failed ({type(exc).__name__}: {msg})",
                             "check the model with onnx.checker.check_model") from exc
        for name, value in zip(node.outputs, outs):
            if name:
                graph.constants[name] = np.asarray(value)
    graph.nodes = kept


def fuse_conv_bn(graph: Graph) -> None:
    """Conv -> BatchNormalization (inference, constant params) becomes one Conv; in place."""
    producer = {out: node for node in graph.nodes for out in node.outputs if out}
    uses: dict[str, int] = {}
    for node in graph.nodes:
        for name in node.inputs:
            uses[name] = uses.get(name, 0) + 1
    for vi in graph.outputs:
        uses[vi.name] = uses.get(vi.name, 0) + 1
    replaced: dict[int, Node | None] = {}
    c = graph.constants
    for bn in graph.nodes:
        if bn.op_type != "BatchNormalization" or bn.attr("training_mode", 0):
            continue
        if len([o for o in bn.outputs if o]) != 1 or len(bn.inputs) < 5:
            continue
        conv = producer.get(bn.inputs[0])
        if conv is None or conv.op_type != "Conv" or id(conv) in replaced or uses.get(bn.inputs[0]) != 1:
            continue
        w = c.get(conv.inputs[1]) if len(conv.inputs) > 1 else None
        has_b = len(conv.inputs) > 2 and bool(conv.inputs[2])
        b = c.get(conv.inputs[2]) if has_b else None
        params = [c.get(n) for n in bn.inputs[1:5]]
        if w is None or (has_b and b is None) or any(p is None for p in params):
            continue
        if not np.issubdtype(w.dtype, np.floating):
            continue
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        scale = gamma / np.sqrt(var + float(bn.attr("epsilon", 1e-5)))
        if scale.shape[0] != w.shape[0]:
            continue  # malformed; let BatchNormalization itself report it at run time
        new_w = (w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
        old_b = b.astype(np.float64).reshape(-1) if b is not None else 0.0
        new_b = ((old_b - mean) * scale + beta).astype(w.dtype)
        w_name = _fresh(graph, f"{conv.label()}.weight_bnfold")
        c[w_name] = new_w
        b_name = _fresh(graph, f"{conv.label()}.bias_bnfold")
        c[b_name] = new_b
        fused = Node("Conv", [conv.inputs[0], w_name, b_name], [bn.outputs[0]], dict(conv.attrs),
                     conv.name, conv.domain, conv.opset)
        replaced[id(conv)] = fused
        replaced[id(bn)] = None
    if replaced:
        graph.nodes = [replaced.get(id(n), n) for n in graph.nodes if replaced.get(id(n), n) is not None]


# Attribute keys of a fused Conv (a Conv node carrying its epilogue): they start with "swat." so
# they can never clash with ONNX's own Conv attributes. Input 3 is the residual when present.
FUSED_RESIDUAL = "swat.residual"
FUSED_RELU = "swat.relu"


def fuse_conv_epilogue(graph: Graph) -> None:
    """Conv [-> Add(other)] [-> Relu] becomes one Conv step with an in-place epilogue; in place.

    Why: at batch 1 a ResNet's Add and Relu steps are half the graph's steps, each a Python
    dispatch plus a pass over memory (and a thread-pool wake-up when torch splits it). Folded
    into the conv they cost one in-place pass on the freshly written, cache-hot output. Only a
    conv output used by nothing else is fused; the fused node takes the place of the last node
    it absorbs, where every input it reads (the residual too) is already computed.
    """
    uses: dict[str, int] = {}
    for node in graph.nodes:
        for name in node.inputs:
            if name:
                uses[name] = uses.get(name, 0) + 1
    for vi in graph.outputs:
        uses[vi.name] = uses.get(vi.name, 0) + 1
    consumer: dict[str, Node] = {}
    for node in graph.nodes:
        for name in node.inputs:
            if name:
                consumer[name] = node
    out_names = {vi.name for vi in graph.outputs}

    def single_consumer(name: str, op_type: str) -> Node | None:
        node = consumer.get(name)
        if node is None or uses.get(name) != 1 or name in out_names or node.op_type != op_type:
            return None
        return node if node.domain in DEFAULT_DOMAINS else None

    replaced: dict[int, Node | None] = {}
    for conv in graph.nodes:
        if conv.op_type != "Conv" or FUSED_RELU in conv.attrs or len(conv.outputs) != 1:
            continue
        ins = list(conv.inputs) + [""] * (3 - len(conv.inputs))
        absorbed: list[Node] = []
        out = conv.outputs[0]
        residual = ""
        add = single_consumer(out, "Add")
        if add is not None and len(add.inputs) == 2 and id(add) not in replaced:
            other = add.inputs[1] if add.inputs[0] == out else add.inputs[0]
            # A constant addend broadcasts (e.g. a bias of another shape): leave it to the Add.
            if other and other != out and other not in graph.constants:
                residual, out = other, add.outputs[0]
                absorbed.append(add)
        relu = single_consumer(out, "Relu")
        if relu is not None and id(relu) not in replaced:
            out = relu.outputs[0]
            absorbed.append(relu)
        if not absorbed:
            continue
        attrs = dict(conv.attrs)
        attrs[FUSED_RELU] = int(relu is not None and relu in absorbed)
        attrs[FUSED_RESIDUAL] = int(bool(residual))
        fused = Node("Conv", ins[:3] + ([residual] if residual else []), [out], attrs,
                     conv.name, conv.domain, conv.opset)
        replaced[id(conv)] = None
        for node in absorbed[:-1]:
            replaced[id(node)] = None
        replaced[id(absorbed[-1])] = fused
    if replaced:
        graph.nodes = [replaced.get(id(n), n) for n in graph.nodes if replaced.get(id(n), n) is not None]


def _fresh(graph: Graph, base: str) -> str:
    taken = set(graph.constants) | {o for n in graph.nodes for o in n.outputs}
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}{k}"
    return name


def remove_dead(graph: Graph) -> None:
    """Drop nodes and constants no graph output depends on; in place."""
    needed = {vi.name for vi in graph.outputs}
    kept = []
    for node in reversed(graph.nodes):
        if any(o in needed for o in node.outputs if o):
            kept.append(node)
            needed.update(n for n in node.inputs if n)
    graph.nodes = kept[::-1]
    graph.constants = {k: v for k, v in graph.constants.items() if k in needed}


def optimize(graph: Graph, registry: Mapping[str, OpDef], fuse_epilogues: bool = True) -> Graph:
    """The load-time pipeline; returns a new Graph (the argument is not modified)."""
    check_supported(graph, registry)
    g = graph.copy()
    g.nodes = toposort(g)
    fold_constants(g, registry)
    fuse_conv_bn(g)
    remove_dead(g)
    if fuse_epilogues:
        fuse_conv_epilogue(g)
    return g
