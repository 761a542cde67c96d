"""The Session's graph form, and the one place that reads ONNX protobufs.

Session never touches a ModelProto after this module: nodes carry plain Python attributes,
constants are numpy arrays. That keeps ONNX parsing separate from execution and lets a graph
come from somewhere other than an ONNX file (a pruned run dir, a test) by building a `Graph`
directly.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.errors import SwatError, UnsafeInputError

from .base import Node, onnx_dtype_to_numpy, onnx_type_name

FLOAT = 1  # onnx.TensorProto.FLOAT, the element type of every image input here


@dataclass
class ValueInfo:
    """A graph input or output: name, dims (int, a symbolic name, or None), ONNX element type."""

    name: str
    shape: list[int | str | None] | None = None  # None: rank unknown
    elem_type: int = FLOAT

    @property
    def type(self) -> str:
        return onnx_type_name(self.elem_type)

    @property
    def dtype(self) -> np.dtype:
        return onnx_dtype_to_numpy(self.elem_type)


@dataclass
class Graph:
    """Nodes in any order (the Session sorts them), constants by name, inputs, outputs."""

    nodes: list[Node]
    constants: dict[str, np.ndarray]
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    opset: int = 17
    metadata: dict[str, str] = field(default_factory=dict)
    name: str = ""

    def copy(self) -> "Graph":
        """A copy whose lists / dicts / nodes can be rewritten; constant arrays are shared."""
        return Graph([copy.copy(n) for n in self.nodes], dict(self.constants), list(self.inputs),
                     list(self.outputs), self.opset, dict(self.metadata), self.name)


# ------------------------------------------------------------------------ ONNX -> Graph


def _tensor(proto: Any) -> np.ndarray:
    from onnx import numpy_helper

    from ..onnx_load import uses_external_data

    if uses_external_data(proto):  # never let onnx resolve a location itself (against the cwd)
        raise UnsafeInputError(f"refused: ONNX tensor '{proto.name}' still points at external data; load the "
                               "model with swat_deploy.onnx_load (Session(path) does), which reads it from "
                               "inside the model's folder only")
    try:
        return np.asarray(numpy_helper.to_array(proto))
    except Exception as exc:  # external data not found, unsupported type, ...
        msg = " ".join(str(exc).split())
        raise SwatError(f"cannot read ONNX tensor '{proto.name}': {msg}; load the model from its file "
                        "so external data next to it is found") from exc


def _sparse_tensor(proto: Any) -> np.ndarray:
    """SparseTensorProto (values + linear or coordinate indices) -> dense numpy array."""
    values = _tensor(proto.values)
    indices = _tensor(proto.indices).astype(np.int64)
    dims = tuple(int(d) for d in proto.dims)
    dense = np.zeros(dims, dtype=values.dtype)
    if indices.size:
        if indices.ndim == 1:
            dense.reshape(-1)[indices] = values
        else:
            dense[tuple(indices.T)] = values
    return dense


def _attr_value(attr: Any) -> Any:
    from onnx import AttributeProto, helper

    value = helper.get_attribute_value(attr)
    if attr.type == AttributeProto.STRING:
        return value.decode("utf-8")
    if attr.type == AttributeProto.STRINGS:
        return [v.decode("utf-8") for v in value]
    if attr.type == AttributeProto.TENSOR:
        return _tensor(value)
    if attr.type == AttributeProto.SPARSE_TENSOR:
        return _sparse_tensor(value)
    if attr.type == AttributeProto.TENSORS:
        return [_tensor(v) for v in value]
    return value  # ints, floats, lists of them; graphs stay protobufs (no op here takes one)


def _constant_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Every form of Constant's value (value_float, value_ints, sparse_value, ...) -> ``value``."""
    forms = {
        "value_float": lambda v: np.array(v, dtype=np.float32),
        "value_floats": lambda v: np.array(v, dtype=np.float32),
        "value_int": lambda v: np.array(v, dtype=np.int64),
        "value_ints": lambda v: np.array(v, dtype=np.int64),
        "sparse_value": lambda v: v,
    }
    for key, conv in forms.items():
        if key in attrs:
            return {"value": conv(attrs[key])}
    return attrs


def _value_info(vi: Any) -> ValueInfo:
    kind = vi.type.WhichOneof("value")
    if kind != "tensor_type":
        raise SwatError(f"graph input/output '{vi.name}' is a {kind}, not a tensor; "
                        "export a model whose inputs and outputs are plain tensors")
    tt = vi.type.tensor_type
    shape = None
    if tt.HasField("shape"):
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                shape.append(d.dim_param)
            else:
                shape.append(None)
    return ValueInfo(vi.name, shape, int(tt.elem_type))


def _check_attributes(node: Any, opset: int) -> None:
    """Refuse an attribute the op's ONNX schema does not define, or of the wrong type.

    A misspelt or damaged attribute (``stsides``) would otherwise be ignored and the node run
    with defaults - onnxruntime refuses such a model, and so does the Session. Ops of other
    domains (no schema here) are left to the op registry.
    """
    if node.domain not in ("", "ai.onnx"):
        return
    import onnx.defs

    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except Exception:  # unknown op: the registry names it with a better message
        return
    for a in node.attribute:
        spec = schema.attributes.get(a.name)
        if spec is None:
            raise SwatError(f"node '{node.name or node.op_type}' has attribute '{a.name}', which {node.op_type} "
                            f"(opset {opset}) does not define; the file is damaged or was written for another "
                            "runtime - re-export it")
        if int(a.type) != int(spec.type):
            raise SwatError(f"node '{node.name or node.op_type}' attribute '{a.name}' has the wrong type for "
                            f"{node.op_type}; the file is damaged - re-export it")


def graph_from_onnx(model: Any) -> Graph:
    """ModelProto -> Graph: attributes decoded, initializers (dense and sparse) as numpy."""
    opset = None
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = int(imp.version)
    if opset is None:
        import onnx.defs

        opset = int(onnx.defs.onnx_opset_version())
    g = model.graph
    constants: dict[str, np.ndarray] = {}
    for init in g.initializer:
        constants[init.name] = _tensor(init)
    for sp in g.sparse_initializer:
        constants[sp.values.name] = _sparse_tensor(sp)
    nodes = []
    for i, n in enumerate(g.node):
        _check_attributes(n, opset)
        attrs = {a.name: _attr_value(a) for a in n.attribute}
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            attrs = _constant_attrs(attrs)
        nodes.append(Node(n.op_type, list(n.input), list(n.output), attrs, n.name or f"{n.op_type}_{i}",
                          n.domain, opset))
    inputs = [_value_info(vi) for vi in g.input if vi.name not in constants]
    outputs = [_value_info(vi) for vi in g.output]
    metadata = {p.key: p.value for p in model.metadata_props}
    return Graph(nodes, constants, inputs, outputs, opset, metadata, g.name)
