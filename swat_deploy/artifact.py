"""Reading exported files back: their weights, metadata and integrity hash.

Verify and info must judge a file by what is *in the file*, so everything here works from the
bytes on disk (ONNX protobuf, TorchScript archive), never from the objects that wrote them.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import FAILED, SwatError, option
from swat_deploy.onnx_load import onnx_weights_sha256, read_model  # noqa: F401 - the hash is part of this surface

META_PREFIX = "swat."
TS_META_FILE = "swat.json"


# -- ONNX -----------------------------------------------------------------------------------
def load_onnx(path: str | Path) -> Any:
    """Parse an ONNX file with one-line errors for missing, truncated, foreign or unsafe files.

    External data is read only from inside the file's folder (:mod:`swat_deploy.onnx_load`).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise SwatError(f"{path} not found; export it from its run dir ({option('fmt')} onnx)")
    model = read_model(path)
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
    """Per weight tensor name: a :class:`swat_deploy.onnx_compact.StoredWeight` (format, bytes, value).

    A quantised (QDQ) model's weights are its int8 tensors, as stored (see :mod:`swat_deploy.qdq`).
    """
    from swat_deploy.onnx_compact import StoredWeight, decode_weights
    from swat_deploy.qdq import decode_int8_weights, is_quantized

    if is_quantized(model):
        try:
            return decode_int8_weights(model)
        except SwatError:
            raise
        except Exception as e:  # any failure to decode a (possibly hostile) file is the file's fault
            raise SwatError(f"stored int8 weights cannot be decoded ({e}); the file was edited - re-export it",
                            kind=FAILED) from None
    try:
        out = decode_weights(model)
    except SwatError:
        raise
    except Exception as e:  # ValueError for a tampered stream; IndexError, TypeError... for a damaged file
        raise SwatError(f"stored weights cannot be decoded ({e}); the file was edited - re-export it",
                        kind=FAILED) from None
    missing = [n.input[1] for n in model.graph.node
               if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] not in out]
    if missing:
        try:
            consts = onnx_constants(model)
        except Exception as e:  # a damaged constant: the file's fault, reported like the others
            raise SwatError(f"stored weights cannot be decoded ({type(e).__name__}: {e}); the file was edited or "
                            f"damaged - re-export it", kind=FAILED) from None
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




def onnx_named_tensors(model: Any) -> dict[str, np.ndarray]:
    """Every float constant the graph computes with, by tensor name: plain initializers, and
    each layer weight decoded from its compact form (``net.<layer>.weight``)."""
    from onnx import numpy_helper

    out: dict[str, np.ndarray] = {}
    for t in model.graph.initializer:
        try:
            out[t.name] = numpy_helper.to_array(t)
        except Exception:
            continue  # undecodable: the integrity row and the weights rows report it
    out.update({name: np.asarray(sw.value) for name, sw in onnx_stored_weights(model).items()})
    return out


# -- TorchScript ----------------------------------------------------------------------------
def load_torchscript(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """torch.jit.load the file (a TorchScript archive, no pickle of Python objects) and its metadata."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise SwatError(f"{path} is a directory, not a TorchScript file; give the path of a .pt file")
    if not path.is_file():
        raise SwatError(f"{path} not found; export it from its run dir ({option('fmt')} torchscript)")
    if not zipfile.is_zipfile(path):
        raise SwatError(f"{path} is not a TorchScript archive (truncated or another format); re-export it")
    extra = {TS_META_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as e:
        raise SwatError(f"{path} cannot be loaded by torch.jit.load ({type(e).__name__}); re-export it") from None
    try:
        meta = json.loads(extra[TS_META_FILE]) if extra[TS_META_FILE] else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = {}
    if not isinstance(meta, dict):  # metadata is untrusted: a dict of strings, like ONNX's
        meta = {}
    return module.eval(), {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


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
                                f"are stored; the file was edited - re-export it", kind=FAILED)
            flat = np.zeros(n, np.float32)
            flat[mask] = vals
            out[prefix] = StoredWeight(prefix, "bitmask", dims, int(bits.nbytes + vals.nbytes), flat.reshape(dims))
    return out


def torchscript_named_tensors(module: Any) -> dict[str, np.ndarray]:
    """Every parameter and buffer by name (sparse ones densified), packed weights decoded to
    ``net.<layer>.weight``: what to compare with the pruned model's state dict."""
    import torch

    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    out: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        out[name] = (t.to_dense() if t.layout != torch.strided else t).numpy()
    out.update({name: np.asarray(sw.value) for name, sw in torchscript_stored_weights(module).items()})
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
    """Canonical hash of every parameter and buffer (sparse ones densified), by name."""
    from training.fileio import sha256_tensors

    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    return sha256_tensors(tensors)


def artifact_kind(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".pt", ".pth", ".ts", ".torchscript"):
        return "torchscript"
    raise SwatError(f"cannot tell the format of {path}; use a .onnx or .pt (TorchScript) file")
