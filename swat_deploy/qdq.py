"""QDQ graphs (onnxruntime's int8 format): find their int8 weights, store them compactly, read them back.

A QDQ model keeps float ops and brackets them with QuantizeLinear / DequantizeLinear; each layer
weight is an int8 tensor behind a DequantizeLinear (per-channel scales, zero point 0). Stock
onnxruntime fuses DQ -> Conv -> Q into one int8 QLinearConv (QGemm for Gemm) when the DQ input
is a constant - and it still is one after onnxruntime constant-folds a subgraph of constants at
load, before its QDQ fusion runs. So the int8 weights can be stored compactly, like the float32
ones of :mod:`swat_deploy.onnx_compact`, and still run at int8 speed (measured in
``tests/test_quantize.py`` against the plain QDQ file: the optimised graphs are identical).

One shared stream for every compactly stored weight::

    bits -> Unsqueeze -> BitShift(LEFT, [0..7]) -> BitShift(RIGHT, 7) -> Reshape(-1) -> Slice(0, n)
         -> Cast(int32) = m;   idx = CumSum(m) * m
    Gather([0, values...], idx) -> Split(sizes) -> Reshape(weight shape) = the int8 weight

Gathering from a zero-prefixed value vector needs no ``Where`` (whose int8 kernel older
onnxruntime builds lack), and the shift pair needs no ``BitwiseAnd`` (opset 18), so the stream
runs at any opset >= 13, the one QDQ per-channel weights need anyway. Cost: 1 byte per nonzero + 1 bit per entry (0.43 bytes/entry at 70 %
sparsity, 0.23 at 90 %, vs 1 byte for the plain int8 tensor). The decoded tensor keeps the
int8 initializer's name, so DequantizeLinear nodes are untouched.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from swat_deploy.formats import choose_format
from swat_deploy.onnx_compact import StoredWeight

# onnxruntime quantisation ops, default domain and onnxruntime's contrib domain
QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
                       "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul",
                       "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid",
                       "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere"})
WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
QUANT_SUFFIX = "_quantized"  # onnxruntime's quantizer names the int8 copy of weight W "W_quantized"

BITS, VALUES, TOTAL, SPLIT = "swat.q8.bits", "swat.q8.values", "swat.q8.numel", "swat.q8.split"
SHAPE = ".swat_q8_shape"
_SHIFTS, _SEVEN_U8, _AXIS1, _FLAT, _ZERO64, _ZERO_I = (
    "swat.q8.shifts", "swat.q8.seven_u8", "swat.q8.axis1", "swat.q8.flat", "swat.q8.zero_i64", "swat.q8.zero_i32")
MIN_OPSET = 13
_STREAM = "swat.q8.stream"


def is_quantized(model: Any) -> bool:
    """True for a graph with quantisation ops (QDQ or QOperator form), which float readers must not treat as float."""
    return any(n.op_type in QUANT_OPS for n in model.graph.node)


def int8_weight_names(model: Any) -> list[str]:
    """Names of the int8 / uint8 tensors that a DequantizeLinear turns into a layer weight, in graph order.

    Only tensors that are initializers now or the output of this module's stream are listed;
    an activation's QDQ pair never is (its DequantizeLinear reads a QuantizeLinear output).
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    constant = {t.name for t in model.graph.initializer}
    constant |= {o for n in model.graph.node if n.op_type == "Reshape" and n.input and n.input[0].startswith(_STREAM)
                 for o in n.output}
    out: list[str] = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        src = dq.input[0]
        if src in constant and src not in out:
            out.append(src)
    return out


def float_name(int8_name: str) -> str:
    """The float weight an int8 tensor stands for (``W_quantized`` -> ``W``), for layer names."""
    return int8_name[: -len(QUANT_SUFFIX)] if int8_name.endswith(QUANT_SUFFIX) else int8_name


def encode_int8(model: Any, *, weights: str = "sparse") -> dict[str, str]:
    """Rewrite ``model`` (a QDQ ModelProto) in place: each int8 weight in its smaller form.

    Returns the chosen format per int8 tensor name (``dense`` keeps the plain initializer).
    ``weights="dense"`` changes nothing. Zero points stay where they are (symmetric: zero).
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if weights == "sparse" and opset < MIN_OPSET:
        weights = "dense"  # Split / Unsqueeze with tensor inputs need opset 13; QDQ per-channel does too
    inits = {t.name: t for t in graph.initializer}
    chosen: dict[str, str] = {}
    masks, values, splits, tail = [], [], [], []
    for name in int8_weight_names(model):
        if name not in inits:
            continue
        w = numpy_helper.to_array(inits[name])
        if w.dtype != np.int8:
            continue
        fmt = choose_format(w, ("dense", "bitmask"), itemsize=1, block=1) if weights == "sparse" else "dense"
        chosen[name] = fmt + "-int8"
        if fmt == "dense":
            continue
        graph.initializer.remove(inits[name])
        flat = w.reshape(-1)
        mask = flat != 0
        masks.append(mask)
        values.append(flat[mask])
        splits.append(flat.size)
        graph.initializer.append(numpy_helper.from_array(np.array(w.shape, np.int64), name + SHAPE))
        tail.append(helper.make_node("Reshape", [f"{_STREAM}.{len(tail)}", name + SHAPE], [name]))
    if not splits:
        return chosen
    all_mask = np.concatenate(masks)
    shared = {
        BITS: np.packbits(all_mask), VALUES: np.concatenate([np.zeros(1, np.int8)] + values),
        TOTAL: np.array([all_mask.size], np.int64), SPLIT: np.array(splits, np.int64),
        _SHIFTS: np.arange(8, dtype=np.uint8), _SEVEN_U8: np.array(7, np.uint8),
        _AXIS1: np.array([1], np.int64), _FLAT: np.array([-1], np.int64), _ZERO64: np.array([0], np.int64),
        _ZERO_I: np.array(0, np.int32),
    }
    for k, v in shared.items():
        graph.initializer.append(numpy_helper.from_array(v, k))
    s = _STREAM
    head = [
        helper.make_node("Unsqueeze", [BITS, _AXIS1], [s + ".u"]),
        helper.make_node("BitShift", [s + ".u", _SHIFTS], [s + ".s"], direction="LEFT"),  # bit k to the top
        helper.make_node("BitShift", [s + ".s", _SEVEN_U8], [s + ".a"], direction="RIGHT"),  # ... to bit 0
        helper.make_node("Reshape", [s + ".a", _FLAT], [s + ".r"]),
        helper.make_node("Slice", [s + ".r", _ZERO64, TOTAL], [s + ".b"]),
        helper.make_node("Cast", [s + ".b"], [s + ".m"], to=TensorProto.INT32),
        helper.make_node("CumSum", [s + ".m", _ZERO_I], [s + ".c"]),
        helper.make_node("Mul", [s + ".c", s + ".m"], [s + ".i"]),
        helper.make_node("Gather", [VALUES, s + ".i"], [s], axis=0),
        helper.make_node("Split", [s, SPLIT], [n.input[0] for n in tail], axis=0),
    ] + tail
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(head + old)  # weight producers first: a valid topological order
    return chosen


def decode_int8_weights(model: Any) -> dict[str, StoredWeight]:
    """Every int8 layer weight as stored (int8 values, not dequantized), keyed by its float name.

    Mirrors the stream's arithmetic exactly (``idx = cumsum(mask) * mask`` into the
    zero-prefixed values), so a tampered mask decodes to what onnxruntime computes; a mask
    marking more nonzeros than there are values raises ``ValueError`` (onnxruntime's Gather
    would refuse it too).
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    stream = _decode_stream(model, inits)
    out: dict[str, StoredWeight] = {}
    for name in int8_weight_names(model):
        if name in stream:
            sw = stream[name]
        elif name in inits:
            w = numpy_helper.to_array(inits[name])
            sw = StoredWeight(name, f"dense-{w.dtype}", list(w.shape), int(w.nbytes), w)
        else:
            continue
        out[float_name(name)] = StoredWeight(float_name(name), sw.format, sw.shape, sw.stored_bytes, sw.value)
    return out


def _decode_stream(model: Any, inits: dict[str, Any]) -> dict[str, StoredWeight]:
    from onnx import numpy_helper

    split = next((n for n in model.graph.node if n.op_type == "Split" and n.input and n.input[0] == _STREAM), None)
    if split is None or BITS not in inits or VALUES not in inits or TOTAL not in inits:
        return {}
    bits = numpy_helper.to_array(inits[BITS]).astype(np.uint8).reshape(-1)
    values = numpy_helper.to_array(inits[VALUES]).reshape(-1)
    sizes = [int(v) for v in numpy_helper.to_array(inits[split.input[1]]).reshape(-1)]
    total = int(numpy_helper.to_array(inits[TOTAL]).reshape(-1)[0])
    mask = np.unpackbits(bits)[:total].astype(bool)
    if mask.size < total or sum(sizes) != total:
        raise ValueError(f"int8 bitmask holds {mask.size} bits, split sizes sum to {sum(sizes)}, numel is {total}")
    idx = np.cumsum(mask.astype(np.int64)) * mask
    if idx.size and int(idx.max()) >= values.size:
        raise ValueError("int8 bitmask marks more nonzeros than there are stored values")
    stream = values[idx]
    reshapes = {n.input[0]: n for n in model.graph.node if n.op_type == "Reshape" and n.input}
    out: dict[str, StoredWeight] = {}
    start = 0
    for piece, size in zip(split.output, sizes):
        node = reshapes.get(piece)
        part, nnz = stream[start:start + size], int(mask[start:start + size].sum())
        start += size
        if node is None or node.input[1] not in inits:
            continue
        shape = [int(d) for d in numpy_helper.to_array(inits[node.input[1]]).reshape(-1)]
        name = node.output[0]
        out[name] = StoredWeight(name, f"bitmask-{values.dtype}", shape, nnz * values.itemsize + (size + 7) // 8,
                                 part.reshape(shape))
    return out
