"""Compact storage of sparse weights inside a standard ONNX graph.

Stock onnxruntime densifies every weight at session start, so the only thing sparsity can buy a
portable ``.onnx`` file is its size on disk. Each weight is stored in the smallest of three forms:

- ``dense``: the plain float initializer (dense layers, tiny layers);
- ``bitmask``: the nonzero values in row-major order (float32, or float16 with ``--fp16``) plus a
  packed uint8 bitmask (numpy ``packbits`` order: most significant bit first), expanded in-graph
  with standard ops only::

      bits -> Unsqueeze -> BitShift(RIGHT, [7..0]) -> BitwiseAnd(1) -> Reshape(-1) -> Slice(0, n)
           -> Cast(bool) = mask;   CumSum(Cast(int32)) - 1 -> Max(0) = idx
      Where(mask, Gather(values, idx), 0) -> Reshape(weight shape) = the dense weight

  onnxruntime constant-folds this subgraph once at load, so inference speed is unchanged.
  Cost: 4 bytes per nonzero + 1 bit per entry (1.33 bytes/entry at 70 %, 0.53 at 90 %).
- ``coo``: int32 flat indices + values, expanded by ``ScatterElements`` into
  ``ConstantOfShape(0)`` (8 bytes per nonzero); wins above ~97 % sparsity. An ONNX
  ``sparse_initializer`` would cost 12 bytes per nonzero (int64 indices) and, fed straight into a
  Conv, fails ``onnx.checker`` full_check (sparse_tensor is not a Conv input type), so it is
  only *read* here (:func:`decode_weights`), never written.

The decoded tensor keeps the original initializer name (``net.<layer>.weight``), so the Conv /
Gemm nodes are untouched and every reader maps weights to run.json layer names the same way.
:func:`decode_weights` reverses the encoding directly from the stored tensors (with the graph's
exact semantics, including a tampered mask whose bit count disagrees with the values).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# one shared stream for all bitmask-stored layers: a handful of nodes for the whole model
BITS, VALUES, TOTAL, SPLIT = "swat.bits", "swat.values", "swat.numel", "swat.split"
FLAT, SHAPE, HALF = ".swat_flat", ".swat_shape", ".swat_fp16"
COO_IDX, COO_VAL, COO_N = ".swat_idx", ".swat_val", ".swat_numel"
_SHIFTS, _ONE_U8, _AXIS1 = "swat.shifts", "swat.one_u8", "swat.axis1"
_RESHAPE_FLAT, _ZERO64, _ZERO_I, _ONE_I, _ZERO_F = "swat.flat", "swat.zero_i64", "swat.zero_i32", "swat.one_i32", "swat.zero_f32"
_STREAM = "swat.dense_stream"
# serialized bytes a bitmask layer adds beyond its bits and values (Reshape node, shape, split entry)
LAYER_OVERHEAD = 160
FORMATS = ("dense", "bitmask", "coo")


@dataclass
class StoredWeight:
    """How one weight is stored: what ``swat info`` shows and what verify counts zeros in."""

    name: str
    format: str          # dense | bitmask | coo | sparse | folded (+ "-fp16" when values are float16)
    shape: list[int]
    stored_bytes: int
    value: np.ndarray    # the dense float32 weight the graph computes


def _sizes(n: int, nnz: int, itemsize: int) -> dict[str, int]:
    return {"dense": n * itemsize,
            "bitmask": nnz * itemsize + (n + 7) // 8 + LAYER_OVERHEAD,
            "coo": nnz * (itemsize + 4) + LAYER_OVERHEAD + 100}


def choose_format(w: np.ndarray, fp16: bool = False) -> str:
    """The smallest storage for ``w`` (ties go to the simplest form)."""
    sizes = _sizes(w.size, int(np.count_nonzero(w)), 2 if fp16 else 4)
    return min(sizes, key=lambda f: (sizes[f], FORMATS.index(f)))


def _stream_nodes(n_layers_total: int, fp16: bool) -> list[Any]:
    """bits + values -> one flat dense float32 vector holding every bitmask layer, in order."""
    from onnx import TensorProto, helper

    values = VALUES
    nodes = []
    if fp16:
        nodes.append(helper.make_node("Cast", [VALUES], ["swat.v32"], to=TensorProto.FLOAT))
        values = "swat.v32"
    nodes += [
        helper.make_node("Unsqueeze", [BITS, _AXIS1], ["swat.u"]),
        helper.make_node("BitShift", ["swat.u", _SHIFTS], ["swat.s"], direction="RIGHT"),
        helper.make_node("BitwiseAnd", ["swat.s", _ONE_U8], ["swat.a"]),
        helper.make_node("Reshape", ["swat.a", _RESHAPE_FLAT], ["swat.r"]),
        helper.make_node("Slice", ["swat.r", _ZERO64, TOTAL], ["swat.b"]),
        helper.make_node("Cast", ["swat.b"], ["swat.m"], to=TensorProto.BOOL),
        helper.make_node("Cast", ["swat.b"], ["swat.i"], to=TensorProto.INT32),
        helper.make_node("CumSum", ["swat.i", _ZERO_I], ["swat.c"]),
        helper.make_node("Sub", ["swat.c", _ONE_I], ["swat.d"]),
        helper.make_node("Max", ["swat.d", _ZERO_I], ["swat.x"]),
        helper.make_node("Gather", [values, "swat.x"], ["swat.g"], axis=0),
        helper.make_node("Where", ["swat.m", "swat.g", _ZERO_F], [_STREAM]),
    ]
    return nodes


def encode(model: Any, names: list[str] | None = None, *, weights: str = "sparse", fp16: bool = False) -> dict[str, str]:
    """Rewrite ``model`` in place so its Conv / Gemm / MatMul weights use compact storage.

    ``names``: initializers to consider (default: every constant weight input of Conv / Gemm /
    MatMul). ``weights="dense"`` keeps plain storage (still float16 with ``fp16``). Returns the
    chosen format per weight name. Raises ``ValueError`` if ``fp16`` would overflow a weight.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if names is None:
        names = weight_initializer_names(model)
    inits = {t.name: t for t in graph.initializer}
    vdtype = np.float16 if fp16 else np.float32
    head: list[Any] = []       # nodes producing weights; placed before the original graph
    tail: list[Any] = []       # per-layer Reshape nodes of the stream
    masks, values, splits, chosen = [], [], [], {}
    for name in names:
        if name not in inits:
            continue
        w = numpy_helper.to_array(inits[name])
        if w.dtype != np.float32:
            continue
        if fp16 and np.abs(w).max(initial=0.0) > np.finfo(np.float16).max:
            raise ValueError(f"weight {name} has values beyond the float16 range; export without --fp16")
        fmt = "dense" if weights == "dense" else choose_format(w, fp16)
        chosen[name] = fmt + ("-fp16" if fp16 else "")
        if fmt == "dense" and not fp16:
            continue
        graph.initializer.remove(inits[name])
        flat = w.reshape(-1)
        if fmt == "dense":
            graph.initializer.append(numpy_helper.from_array(w.astype(vdtype), name + HALF))
            head.append(helper.make_node("Cast", [name + HALF], [name], to=TensorProto.FLOAT))
        elif fmt == "coo":
            idx = np.flatnonzero(flat)
            vals = name + COO_VAL
            graph.initializer.append(numpy_helper.from_array(idx.astype(np.int32), name + COO_IDX))
            graph.initializer.append(numpy_helper.from_array(flat[idx].astype(vdtype), vals))
            graph.initializer.append(numpy_helper.from_array(np.array([flat.size], np.int64), name + COO_N))
            graph.initializer.append(numpy_helper.from_array(np.array(w.shape, np.int64), name + SHAPE))
            tag = name + ".swat"
            if fp16:
                head.append(helper.make_node("Cast", [vals], [tag + "_v"], to=TensorProto.FLOAT))
                vals = tag + "_v"
            head += [
                helper.make_node("ConstantOfShape", [name + COO_N], [tag + "_z"],
                                 value=numpy_helper.from_array(np.zeros(1, np.float32))),
                helper.make_node("ScatterElements", [tag + "_z", name + COO_IDX, vals], [tag + "_s"], axis=0),
                helper.make_node("Reshape", [tag + "_s", name + SHAPE], [name]),
            ]
        else:
            mask = flat != 0
            masks.append(mask)
            values.append(flat[mask].astype(vdtype))
            splits.append(flat.size)
            graph.initializer.append(numpy_helper.from_array(np.array(w.shape, np.int64), name + SHAPE))
            tail.append(helper.make_node("Reshape", [name + FLAT, name + SHAPE], [name]))
    if splits:
        stream_names = [n.input[0] for n in tail]
        all_mask = np.concatenate(masks)
        shared = {
            BITS: np.packbits(all_mask), VALUES: np.concatenate(values).astype(vdtype),
            TOTAL: np.array([all_mask.size], np.int64), SPLIT: np.array(splits, np.int64),
            _SHIFTS: np.arange(7, -1, -1, dtype=np.uint8), _ONE_U8: np.array(1, np.uint8),
            _AXIS1: np.array([1], np.int64), _RESHAPE_FLAT: np.array([-1], np.int64),
            _ZERO64: np.array([0], np.int64), _ZERO_I: np.array(0, np.int32), _ONE_I: np.array(1, np.int32),
            _ZERO_F: np.array(0.0, np.float32),
        }
        for k, v in shared.items():
            graph.initializer.append(numpy_helper.from_array(v, k))
        head += _stream_nodes(len(splits), fp16)
        head.append(helper.make_node("Split", [_STREAM, SPLIT], stream_names, axis=0))
        head += tail
    if head:
        # weight-producing nodes first: a valid topological order whatever the original graph was
        old = list(graph.node)
        del graph.node[:]
        graph.node.extend(head + old)
    return chosen


def weight_initializer_names(model: Any) -> list[str]:
    """Initializers that are the weight input (index 1) of a Conv / Gemm / MatMul, in graph order."""
    inits = {t.name for t in model.graph.initializer}
    out: list[str] = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") and len(node.input) > 1:
            if node.input[1] in inits and node.input[1] not in out:
                out.append(node.input[1])
    return out


def decode_weights(model: Any) -> dict[str, StoredWeight]:
    """Every stored layer weight, decoded from the stored tensors (no graph evaluation).

    Mirrors the graph's arithmetic exactly (``idx = max(cumsum(mask) - 1, 0)``), so a mask bit
    flipped without a matching value decodes to what onnxruntime would compute, and one whose
    index runs past the values raises ``ValueError`` (onnxruntime would refuse it too). The
    layers of the shared stream are found by following its Split node, not by trusting names.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    sparse = {st.values.name: st for st in model.graph.sparse_initializer}
    out: dict[str, StoredWeight] = {}
    out.update(_decode_stream(model, inits))
    for name in _weight_inputs(model):
        if name in out:
            continue
        if name + COO_IDX in inits and name + COO_VAL in inits and name + SHAPE in inits:
            idx = numpy_helper.to_array(inits[name + COO_IDX]).astype(np.int64).reshape(-1)
            vals = numpy_helper.to_array(inits[name + COO_VAL]).reshape(-1)
            shape = [int(d) for d in numpy_helper.to_array(inits[name + SHAPE]).reshape(-1)]
            n = int(np.prod(shape)) if shape else 1
            if idx.size != vals.size or (idx.size and (idx.min() < -n or idx.max() >= n)):
                raise ValueError(f"{name}: {idx.size} indices for {vals.size} values, or an index out of range")
            flat = np.zeros(n, np.float32)
            flat[idx] = vals.astype(np.float32)  # ScatterElements: the last write of a duplicate wins
            fmt = "coo" + ("-fp16" if vals.dtype == np.float16 else "")
            out[name] = StoredWeight(name, fmt, shape, idx.nbytes + vals.nbytes, flat.reshape(shape))
        elif name + HALF in inits:
            w = numpy_helper.to_array(inits[name + HALF])
            out[name] = StoredWeight(name, "dense-fp16", list(w.shape), w.nbytes, w.astype(np.float32))
        elif name in sparse:
            st = sparse[name]
            vals = numpy_helper.to_array(st.values)
            idx = numpy_helper.to_array(st.indices)
            dense = np.zeros(tuple(st.dims), np.float32)
            if idx.ndim == 1:
                dense.reshape(-1)[idx] = vals
            else:
                dense[tuple(idx.T)] = vals
            out[name] = StoredWeight(name, "sparse", list(st.dims), vals.nbytes + idx.nbytes, dense)
        elif name in inits:
            w = numpy_helper.to_array(inits[name])
            out[name] = StoredWeight(name, "dense", list(w.shape), w.nbytes, w.astype(np.float32, copy=False))
    return out


def _decode_stream(model: Any, inits: dict[str, Any]) -> dict[str, StoredWeight]:
    from onnx import numpy_helper

    split = next((n for n in model.graph.node if n.op_type == "Split" and n.input and n.input[0] == _STREAM), None)
    if split is None or BITS not in inits or VALUES not in inits:
        return {}
    bits = numpy_helper.to_array(inits[BITS]).astype(np.uint8)
    values = numpy_helper.to_array(inits[VALUES])
    sizes = [int(v) for v in numpy_helper.to_array(inits[split.input[1]]).reshape(-1)]
    total = int(numpy_helper.to_array(inits[TOTAL]).reshape(-1)[0])
    mask = np.unpackbits(bits)[:total].astype(bool)
    if mask.size < total or sum(sizes) != total:
        raise ValueError(f"bitmask holds {mask.size} bits, split sizes sum to {sum(sizes)}, numel is {total}")
    idx = np.maximum(np.cumsum(mask.astype(np.int64)) - 1, 0)
    if mask.any() and int(idx[mask].max()) >= values.size:
        raise ValueError("bitmask marks more nonzeros than there are stored values")
    stream = np.zeros(total, np.float32)
    stream[mask] = values.astype(np.float32)[idx[mask]]
    reshapes = {n.input[0]: n for n in model.graph.node if n.op_type == "Reshape" and n.input}
    out: dict[str, StoredWeight] = {}
    start = 0
    fmt = "bitmask" + ("-fp16" if values.dtype == np.float16 else "")
    for piece, size in zip(split.output, sizes):
        node = reshapes.get(piece)
        part = stream[start:start + size]
        nnz = int(mask[start:start + size].sum())
        start += size
        if node is None or node.input[1] not in inits:
            continue
        shape = [int(d) for d in numpy_helper.to_array(inits[node.input[1]]).reshape(-1)]
        name = node.output[0]
        stored = nnz * values.itemsize + (size + 7) // 8
        out[name] = StoredWeight(name, fmt, shape, stored, part.reshape(shape))
    return out


def _weight_inputs(model: Any) -> list[str]:
    out: list[str] = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") and len(node.input) > 1:
            if node.input[1] not in out:
                out.append(node.input[1])
    return out
