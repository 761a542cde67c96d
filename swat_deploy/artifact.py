"""Reading exported files back: their weights, metadata and integrity hash.

Verify and info must judge a file by what is *in the file*, so everything here works from the
bytes on disk (ONNX protobuf, TorchScript archive), never from the objects that wrote them.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import SwatError

META_PREFIX = "swat."
TS_META_FILE = "swat.json"


# -- ONNX -----------------------------------------------------------------------------------
def load_onnx(path: str | Path) -> Any:
    """Parse an ONNX file with one-line errors for missing, truncated or foreign files."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise SwatError(f"{path} not found; export it with `swat export RUN --format onnx`")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as e:
        raise SwatError(f"{path} is not a readable ONNX file ({type(e).__name__}); it may be truncated - "
                        f"re-export it") from None
    if not model.graph.node:
        raise SwatError(f"{path} holds no ONNX graph (truncated or not an ONNX file); re-export it")
    return model


def onnx_metadata(model: Any) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def onnx_constants(model: Any) -> dict[str, np.ndarray]:
    """Every constant tensor of the graph: initializers, then Constant nodes and constant-only subgraphs.

    Sparse weights may be stored compactly and expanded in-graph; folding the constant part with
    the reference evaluator recovers the dense weight each Conv / Gemm actually sees.
    """
    from onnx import numpy_helper

    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for st in model.graph.sparse_initializer:
        dense = np.zeros(tuple(st.dims), dtype=numpy_helper.to_array(st.values).dtype)
        idx = numpy_helper.to_array(st.indices)
        vals = numpy_helper.to_array(st.values)
        if idx.ndim == 1:
            dense.reshape(-1)[idx] = vals
        else:
            dense[tuple(idx.T)] = vals
        consts[st.values.name] = dense
    graph_inputs = {i.name for i in model.graph.input}
    pending = [n for n in model.graph.node]
    progress = True
    while progress:
        progress = False
        for node in list(pending):
            ins = [i for i in node.input if i]
            if all(i in consts for i in ins) and not any(i in graph_inputs for i in ins):
                try:
                    outs = _eval_node(model, node, [consts[i] for i in ins])
                except Exception:
                    pending.remove(node)
                    continue
                for name, value in zip(node.output, outs):
                    consts[name] = value
                pending.remove(node)
                progress = True
    return consts


def _eval_node(model: Any, node: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    opset = [o for o in model.opset_import]
    names = [f"in{i}" for i in range(len(inputs))]
    it = iter(names)
    new_inputs = [next(it) if i else "" for i in node.input]
    sub = helper.make_node(node.op_type, new_inputs, list(node.output), domain=node.domain)
    sub.attribute.extend(node.attribute)
    ev = ReferenceEvaluator(helper.make_model(
        helper.make_graph([sub], "fold", [helper.make_tensor_value_info(n, 0, None) for n in names],
                          [helper.make_tensor_value_info(o, 0, None) for o in node.output]),
        opset_imports=opset))
    return ev.run(None, dict(zip(names, inputs)))


def onnx_layer_weights(model: Any) -> dict[str, np.ndarray]:
    """Dense weight of every Conv / Gemm / MatMul, keyed by the training layer name.

    The exporter names weight tensors ``net.<layer>.weight``; anything else keeps its tensor name.
    Stored forms of :mod:`swat_deploy.onnx_compact` are decoded directly (fast, exact); any other
    constant subgraph is folded with the reference evaluator.
    """
    return {layer_name(name): sw.value for name, sw in onnx_stored_weights(model).items()}


def onnx_stored_weights(model: Any) -> dict[str, Any]:
    """Per weight tensor name: a :class:`swat_deploy.onnx_compact.StoredWeight` (format, bytes, value)."""
    from swat_deploy.onnx_compact import StoredWeight, decode_weights

    try:
        out = decode_weights(model)
    except ValueError as e:
        raise SwatError(f"stored weights cannot be decoded ({e}); the file was edited - re-export it",
                        exit_code=1) from None
    missing = [n.input[1] for n in model.graph.node
               if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] not in out]
    if missing:
        consts = onnx_constants(model)
        for name in missing:
            if name in consts:
                v = np.asarray(consts[name])
                out[name] = StoredWeight(name, "folded", list(v.shape), int(v.nbytes), v)
    return out


def layer_name(tensor_name: str) -> str:
    name = tensor_name
    if name.startswith("net."):
        name = name[len("net."):]
    for suffix in (".weight", ".dense"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def onnx_weights_sha256(model: Any) -> str:
    """Hash of every stored tensor (initializers + sparse initializers + Constant nodes), name order."""
    h = hashlib.sha256()
    tensors = [(t.name, t) for t in model.graph.initializer]
    tensors += [(st.values.name, st.values) for st in model.graph.sparse_initializer]
    tensors += [(st.values.name + "#idx", st.indices) for st in model.graph.sparse_initializer]
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    tensors.append((node.output[0], a.t))
    for name, t in sorted(tensors, key=lambda p: p[0]):
        h.update(name.encode())
        h.update(str(t.data_type).encode())
        h.update(str(list(t.dims)).encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _tensor_bytes(t: Any) -> bytes:
    from onnx import numpy_helper

    return np.ascontiguousarray(numpy_helper.to_array(t)).tobytes()


# -- TorchScript ----------------------------------------------------------------------------
def load_torchscript(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """torch.jit.load the file (a TorchScript archive, no pickle of Python objects) and its metadata."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise SwatError(f"{path} not found; export it with `swat export RUN --format torchscript`")
    if not zipfile.is_zipfile(path):
        raise SwatError(f"{path} is not a TorchScript archive (truncated or another format); re-export it")
    extra = {TS_META_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as e:
        raise SwatError(f"{path} cannot be loaded by torch.jit.load ({type(e).__name__}); re-export it") from None
    try:
        meta = json.loads(extra[TS_META_FILE]) if extra[TS_META_FILE] else {}
    except json.JSONDecodeError:
        meta = {}
    return module.eval(), meta


def torchscript_layer_weights(module: Any) -> dict[str, np.ndarray]:
    """Dense weight per training layer name, from parameters/buffers or the stored packed form."""
    return {layer_name(name): sw.value for name, sw in torchscript_stored_weights(module).items()}


def torchscript_stored_weights(module: Any) -> dict[str, Any]:
    """Per ``net.<layer>.weight``: format (dense | bitmask | csr), stored bytes and dense value.

    Packed layers (``swat_deploy.ts_packed.PackedConv2d`` / ``PackedLinear``) hold ``weight_bits``,
    ``weight_values`` and ``weight_shape`` buffers; they are decoded here with numpy, independently
    of the scripted unpacking code.
    """
    import torch

    from swat_deploy.onnx_compact import StoredWeight

    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    out: dict[str, Any] = {}
    for name, t in tensors.items():
        if not name.startswith("net."):
            continue
        if name.endswith(".weight") and t.dim() >= 2:
            if t.layout != torch.strided:
                out[name] = StoredWeight(name, "csr", list(t.shape), _sparse_nbytes(t),
                                         t.to_dense().detach().cpu().numpy())
            else:
                v = t.detach().cpu().numpy()
                out[name] = StoredWeight(name, "dense", list(v.shape), int(v.nbytes), v)
        elif name.endswith(".weight_bits"):
            prefix = name[: -len("_bits")]
            values = tensors.get(prefix + "_values")
            shape = tensors.get(prefix + "_shape")
            if values is None or shape is None:
                continue
            bits = t.detach().cpu().numpy().astype(np.uint8)
            vals = values.detach().cpu().numpy()
            dims = [int(d) for d in shape.tolist()]
            n = int(np.prod(dims)) if dims else 1
            mask = np.unpackbits(bits)[:n].astype(bool)
            if mask.size < n or int(mask.sum()) != vals.size:
                raise SwatError(f"{prefix}: bitmask marks {int(mask.sum())} nonzeros but {vals.size} values "
                                f"are stored; the file was edited - re-export it", exit_code=1)
            flat = np.zeros(n, np.float32)
            flat[mask] = vals
            out[prefix] = StoredWeight(prefix, "bitmask", dims, int(bits.nbytes + vals.nbytes), flat.reshape(dims))
    return out


def _sparse_nbytes(t: Any) -> int:
    import torch

    if t.layout == torch.sparse_csr:
        parts = [t.crow_indices(), t.col_indices(), t.values()]
    else:
        t = t.coalesce()
        parts = [t.indices(), t.values()]
    return int(sum(p.numel() * p.element_size() for p in parts))


def torchscript_weights_sha256(module: Any) -> str:
    import torch

    h = hashlib.sha256()
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    for name in sorted(tensors):
        t = tensors[name].detach().cpu()
        if t.layout != torch.strided:
            t = t.to_dense()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def artifact_kind(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".pt", ".pth", ".ts", ".torchscript"):
        return "torchscript"
    raise SwatError(f"cannot tell the format of {path}; use a .onnx or .pt (TorchScript) file")
