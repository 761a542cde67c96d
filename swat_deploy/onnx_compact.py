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
- ``blockmask``: for a weight whose groups of B consecutive output channels share one zero
  pattern (trained with ``--block B``; :func:`swat_deploy.formats.block_size_of`), one bit per
  B x 1 group instead of one per entry, in a second shared stream::

      bits -> (unpack as above) -> Split(per layer) -> Reshape(O/B, 1, rest) -> Expand(1, B, 1)
           -> Reshape(-1) -> Concat = mask;   then CumSum / Gather / Where / Split as above

  Cost: 4 bytes per nonzero + 1 bit per B entries (1.23 bytes/entry at 70 % with B = 4).
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

from training.errors import option
from swat_deploy.formats import ENCODED_NAMES, choose_format

# one shared stream for all bitmask-stored layers: a handful of nodes for the whole model
BITS, VALUES, TOTAL, SPLIT = "swat.bits", "swat.values", "swat.numel", "swat.split"
FLAT, SHAPE, HALF = ".swat_flat", ".swat_shape", ".swat_fp16"
COO_IDX, COO_VAL, COO_N = ".swat_idx", ".swat_val", ".swat_numel"
_SHIFTS, _ONE_U8, _AXIS1 = "swat.shifts", "swat.one_u8", "swat.axis1"
_RESHAPE_FLAT, _ZERO64, _ZERO_I, _ONE_I, _ZERO_F = "swat.flat", "swat.zero_i64", "swat.zero_i32", "swat.one_i32", "swat.zero_f32"
_STREAM = "swat.dense_stream"
# the block stream: one bit per group of B output channels (B per layer)
BLK = "swat.blk."
BLK_BITS, BLK_VALUES, BLK_TOTAL, BLK_SPLIT, BLK_ESPLIT = (BLK + "bits", BLK + "values", BLK + "numel", BLK + "split",
                                                          BLK + "esplit")
_BLK_STREAM = BLK + "dense_stream"


@dataclass
class StoredWeight:
    """How one weight is stored: what ``swat info`` shows and what verify counts zeros in."""

    name: str
    format: str          # dense | bitmask | coo | sparse | folded (+ "-fp16" when values are float16)
    shape: list[int]
    stored_bytes: int
    value: np.ndarray    # the dense float32 weight the graph computes


def _unpack_nodes(bits: str, total: str, p: str) -> list[Any]:
    """Packed bits -> ``p + "b"``: a flat uint8 0/1 vector of ``total`` entries."""
    from onnx import helper

    return [
        helper.make_node("Unsqueeze", [bits, _AXIS1], [p + "u"]),
        helper.make_node("BitShift", [p + "u", _SHIFTS], [p + "s"], direction="RIGHT"),
        helper.make_node("BitwiseAnd", [p + "s", _ONE_U8], [p + "a"]),
        helper.make_node("Reshape", [p + "a", _RESHAPE_FLAT], [p + "r"]),
        helper.make_node("Slice", [p + "r", _ZERO64, total], [p + "b"]),
    ]


def _gather_nodes(mask: str, values: str, out: str, p: str, fp16: bool) -> list[Any]:
    """A uint8 0/1 mask + the values at its ones (in order) -> the dense float32 vector ``out``."""
    from onnx import TensorProto, helper

    nodes = []
    if fp16:
        nodes.append(helper.make_node("Cast", [values], [p + "v32"], to=TensorProto.FLOAT))
        values = p + "v32"
    nodes += [
        helper.make_node("Cast", [mask], [p + "m"], to=TensorProto.BOOL),
        helper.make_node("Cast", [mask], [p + "i"], to=TensorProto.INT32),
        helper.make_node("CumSum", [p + "i", _ZERO_I], [p + "c"]),
        helper.make_node("Sub", [p + "c", _ONE_I], [p + "d"]),
        helper.make_node("Max", [p + "d", _ZERO_I], [p + "x"]),
        helper.make_node("Gather", [values, p + "x"], [p + "g"], axis=0),
        helper.make_node("Where", [p + "m", p + "g", _ZERO_F], [out]),
    ]
    return nodes


def _stream_nodes(n_layers_total: int, fp16: bool) -> list[Any]:
    """bits + values -> one flat dense float32 vector holding every bitmask layer, in order."""
    nodes = _unpack_nodes(BITS, TOTAL, "swat.")
    # the fp16 Cast first, as this graph always had it
    gather = _gather_nodes("swat.b", VALUES, _STREAM, "swat.", fp16)
    return (gather[:1] + nodes + gather[1:]) if fp16 else nodes + gather


def _block_grid(i: int) -> str:
    return f"{BLK}grid{i}"  # per layer: (O/B, 1, rest)


def _block_expand(b: int) -> str:
    return f"{BLK}x{b}"  # per block size: (1, B, 1), broadcast by Expand


def _block_stream_nodes(blocks: list[int], fp16: bool) -> list[Any]:
    """Block bits -> per layer (O/B, 1, rest) expanded to (O/B, B, rest) -> one entry-level mask ->
    the dense float32 stream of every blockmask layer, in order (split and reshaped by the caller).
    Short generated names: a layer costs ~300 serialized bytes beyond its bits and values."""
    from onnx import helper

    nodes = _unpack_nodes(BLK_BITS, BLK_TOTAL, BLK)
    pieces = [f"{BLK}p{i}" for i in range(len(blocks))]
    nodes.append(helper.make_node("Split", [BLK + "b", BLK_SPLIT], pieces, axis=0))
    for i, b in enumerate(blocks):
        nodes += [
            helper.make_node("Reshape", [pieces[i], _block_grid(i)], [f"{BLK}g{i}"]),
            helper.make_node("Expand", [f"{BLK}g{i}", _block_expand(b)], [f"{BLK}e{i}"]),
            helper.make_node("Reshape", [f"{BLK}e{i}", _RESHAPE_FLAT], [f"{BLK}f{i}"]),
        ]
    nodes.append(helper.make_node("Concat", [f"{BLK}f{i}" for i in range(len(blocks))], [BLK + "mask"], axis=0))
    return nodes + _gather_nodes(BLK + "mask", BLK_VALUES, _BLK_STREAM, BLK, fp16)


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
    blk: dict[str, list[Any]] = {"blocks": [], "grids": [], "values": [], "splits": [], "esplits": [], "tail": []}
    for name in names:
        if name not in inits:
            continue
        w = numpy_helper.to_array(inits[name])
        if w.dtype != np.float32:
            continue
        if fp16 and np.abs(w).max(initial=0.0) > np.finfo(np.float16).max:
            raise ValueError(f"weight {name} has values beyond the float16 range; export with float32 weights ({option('fp16')} off)")
        block = 1
        if weights != "dense" and w.ndim >= 2:
            from swat_deploy.formats.blocks import block_size_of

            block = block_size_of(w)
        fmt = "dense" if weights == "dense" else choose_format(w, ENCODED_NAMES, itemsize=2 if fp16 else 4,
                                                                  block=block)
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
        elif fmt == "blockmask":
            rows = w.shape[0] // block
            rest = flat.size // w.shape[0]
            grid = (w.reshape(rows, block, rest) != 0).any(axis=1)
            graph.initializer.append(numpy_helper.from_array(np.array([rows, 1, rest], np.int64),
                                                             _block_grid(len(blk["blocks"]))))
            blk["blocks"].append(block)
            blk["grids"].append(grid.reshape(-1))
            blk["values"].append(flat[np.repeat(grid[:, None, :], block, axis=1).reshape(-1)].astype(vdtype))
            blk["splits"].append(grid.size)
            blk["esplits"].append(flat.size)
            graph.initializer.append(numpy_helper.from_array(np.array(w.shape, np.int64), name + SHAPE))
            blk["tail"].append(helper.make_node("Reshape", [name + FLAT, name + SHAPE], [name]))
        else:
            mask = flat != 0
            masks.append(mask)
            values.append(flat[mask].astype(vdtype))
            splits.append(flat.size)
            graph.initializer.append(numpy_helper.from_array(np.array(w.shape, np.int64), name + SHAPE))
            tail.append(helper.make_node("Reshape", [name + FLAT, name + SHAPE], [name]))
    common = {
        _SHIFTS: np.arange(7, -1, -1, dtype=np.uint8), _ONE_U8: np.array(1, np.uint8),
        _AXIS1: np.array([1], np.int64), _RESHAPE_FLAT: np.array([-1], np.int64),
        _ZERO64: np.array([0], np.int64), _ZERO_I: np.array(0, np.int32), _ONE_I: np.array(1, np.int32),
        _ZERO_F: np.array(0.0, np.float32),
    }
    if splits:
        stream_names = [n.input[0] for n in tail]
        all_mask = np.concatenate(masks)
        shared = {
            BITS: np.packbits(all_mask), VALUES: np.concatenate(values).astype(vdtype),
            TOTAL: np.array([all_mask.size], np.int64), SPLIT: np.array(splits, np.int64), **common,
        }
        common = {}
        for k, v in shared.items():
            graph.initializer.append(numpy_helper.from_array(v, k))
        head += _stream_nodes(len(splits), fp16)
        head.append(helper.make_node("Split", [_STREAM, SPLIT], stream_names, axis=0))
        head += tail
    if blk["blocks"]:
        grids = np.concatenate(blk["grids"])
        shared = {
            BLK_BITS: np.packbits(grids), BLK_VALUES: np.concatenate(blk["values"]).astype(vdtype),
            BLK_TOTAL: np.array([grids.size], np.int64), BLK_SPLIT: np.array(blk["splits"], np.int64),
            BLK_ESPLIT: np.array(blk["esplits"], np.int64), **common,
            **{_block_expand(b): np.array([1, b, 1], np.int64) for b in sorted(set(blk["blocks"]))},
        }
        for k, v in shared.items():
            graph.initializer.append(numpy_helper.from_array(v, k))
        head += _block_stream_nodes(blk["blocks"], fp16)
        head.append(helper.make_node("Split", [_BLK_STREAM, BLK_ESPLIT], [n.input[0] for n in blk["tail"]], axis=0))
        head += blk["tail"]
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
    out.update(_decode_block_stream(model, inits))
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
    return _stream_layers(model, inits, split, sizes, mask, values, "bitmask", sizes)


def _decode_block_stream(model: Any, inits: dict[str, Any]) -> dict[str, StoredWeight]:
    """The blockmask layers: block bits expanded per layer exactly as the graph does."""
    from onnx import numpy_helper

    nodes = model.graph.node
    split = next((n for n in nodes if n.op_type == "Split" and n.input and n.input[0] == _BLK_STREAM), None)
    pieces = next((n for n in nodes if n.op_type == "Split" and n.input and n.input[0] == BLK + "b"), None)
    concat = next((n for n in nodes if n.op_type == "Concat" and n.output and n.output[0] == BLK + "mask"), None)
    if split is None or pieces is None or concat is None or BLK_BITS not in inits or BLK_VALUES not in inits:
        return {}
    arr = lambda name: numpy_helper.to_array(inits[name]).reshape(-1)  # noqa: E731
    values = numpy_helper.to_array(inits[BLK_VALUES])
    total = int(arr(BLK_TOTAL)[0])
    grid_bits = np.unpackbits(numpy_helper.to_array(inits[BLK_BITS]).astype(np.uint8))[:total].astype(bool)
    gsizes = [int(v) for v in arr(pieces.input[1])]
    if grid_bits.size < total or sum(gsizes) != total:
        raise ValueError(f"block bitmask holds {grid_bits.size} bits, split sizes sum to {sum(gsizes)}, "
                         f"blocks are {total}")
    starts = dict(zip(pieces.output, np.cumsum([0] + gsizes[:-1]).tolist()))
    sized = dict(zip(pieces.output, gsizes))
    producer = {o: n for n in nodes for o in n.output}
    masks, bits_per_layer = [], []
    for flat in concat.input:  # Reshape(-1) <- Expand(O/B, B, rest) <- Reshape(O/B, 1, rest) <- piece
        try:
            expand = producer[producer[flat].input[0]]
            grid = producer[expand.input[0]]
            piece = grid.input[0]
            g = grid_bits[starts[piece]:starts[piece] + sized[piece]]
            shaped = g.reshape([int(d) for d in arr(grid.input[1])])
            target = np.broadcast_shapes(shaped.shape, tuple(int(d) for d in arr(expand.input[1])))
            masks.append(np.broadcast_to(shaped, target).reshape(-1))  # ONNX Expand: two-way broadcast
        except (KeyError, ValueError, IndexError):
            raise ValueError(f"block stream is damaged at {flat!r}; re-export the model") from None
        bits_per_layer.append(sized[piece])
    mask = np.concatenate(masks) if masks else np.zeros(0, bool)
    sizes = [int(v) for v in arr(split.input[1])]
    if sum(sizes) != mask.size:
        raise ValueError(f"block stream expands to {mask.size} entries, split sizes sum to {sum(sizes)}")
    return _stream_layers(model, inits, split, sizes, mask, values, "blockmask", bits_per_layer)


def _stream_layers(model: Any, inits: dict[str, Any], split: Any, sizes: list[int], mask: np.ndarray,
                   values: np.ndarray, fmt: str, mask_bits: list[int]) -> dict[str, StoredWeight]:
    """Gather / Where / Split / Reshape of a stream, as the graph computes them, per layer."""
    from onnx import numpy_helper

    total = mask.size
    idx = np.maximum(np.cumsum(mask.astype(np.int64)) - 1, 0)
    if mask.any() and int(idx[mask].max()) >= values.size:
        raise ValueError("bitmask marks more nonzeros than there are stored values")
    stream = np.zeros(total, np.float32)
    stream[mask] = values.astype(np.float32)[idx[mask]]
    reshapes = {n.input[0]: n for n in model.graph.node if n.op_type == "Reshape" and n.input}
    out: dict[str, StoredWeight] = {}
    start = 0
    fmt = fmt + ("-fp16" if values.dtype == np.float16 else "")
    for piece, size, nbits in zip(split.output, sizes, mask_bits):
        node = reshapes.get(piece)
        part = stream[start:start + size]
        nnz = int(mask[start:start + size].sum())
        start += size
        if node is None or node.input[1] not in inits:
            continue
        shape = [int(d) for d in numpy_helper.to_array(inits[node.input[1]]).reshape(-1)]
        name = node.output[0]
        stored = nnz * values.itemsize + (nbits + 7) // 8
        out[name] = StoredWeight(name, fmt, shape, stored, part.reshape(shape))
    return out


def _weight_inputs(model: Any) -> list[str]:
    out: list[str] = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") and len(node.input) > 1:
            if node.input[1] not in out:
                out.append(node.input[1])
    return out
