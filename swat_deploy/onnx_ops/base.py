"""The pieces every ONNX op module shares: the graph node, the op definition, conversions.

An op can have two implementations because a graph is evaluated in two places: constant
folding at load (numpy, where every ONNX integer type exists and the exporter's bitmask
expansion lives) and inference (torch, where the activations live). An op that has only one
of them still works in both places through a conversion, so each module writes the version
that is natural for it and adds the other only where speed matters.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from training.errors import SwatError

TorchFn = Callable[["Node", list], Sequence[torch.Tensor]]
NumpyFn = Callable[["Node", list], Sequence[np.ndarray]]
# A prepared step: inputs (torch tensors or None for an absent optional input) -> outputs.
Step = Callable[[list], Sequence[torch.Tensor]]


@dataclass
class Node:
    """One graph node, independent of the ONNX protobuf so graphs can come from elsewhere.

    ``inputs`` uses "" for an absent optional input, as ONNX does. ``opset`` is the version
    of the default domain the graph was written for; ops whose attributes moved to inputs
    between opsets read it.
    """

    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    domain: str = ""
    opset: int = 17

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def ints(self, key: str, default: Sequence[int] | None = None) -> list[int] | None:
        """An INTS attribute as a list of Python ints (``default`` when absent)."""
        value = self.attrs.get(key)
        if value is None:
            return None if default is None else [int(v) for v in default]
        return [int(v) for v in value]

    def label(self) -> str:
        return self.name or (self.outputs[0] if self.outputs else self.op_type)

    def error(self, problem: str, fix: str) -> SwatError:
        """A one-line error that names this node, the problem and the fix."""
        return SwatError(f"ONNX {self.op_type} node '{self.label()}': {problem}; {fix}")


@dataclass(frozen=True)
class OpDef:
    """How to evaluate one ONNX op type.

    ``run`` works on torch tensors (inference), ``fold`` on numpy arrays (constant folding).
    ``prepare`` is for ops that keep state between runs (a conv layer with a built sparse
    kernel); it sees the constants of the graph and returns the step to call per run, or
    None to fall back to ``run``. ``foldable=False`` keeps an op out of constant folding.
    """

    op_type: str
    run: TorchFn | None = None
    fold: NumpyFn | None = None
    prepare: Callable[["Node", Mapping[str, np.ndarray], "BuildContext"], Step | None] | None = None
    foldable: bool = True

    def run_torch(self, node: Node, inputs: list) -> list[torch.Tensor]:
        if self.run is not None:
            return list(self.run(node, inputs))
        assert self.fold is not None, f"op {self.op_type} registered without an implementation"
        outs = self.fold(node, [None if t is None else to_numpy(t) for t in inputs])
        return [to_torch(o) for o in outs]

    def run_numpy(self, node: Node, inputs: list) -> list[np.ndarray]:
        if self.fold is not None:
            return [np.asarray(o) for o in self.fold(node, inputs)]
        assert self.run is not None, f"op {self.op_type} registered without an implementation"
        outs = self.run(node, [None if a is None else to_torch(a) for a in inputs])
        return [to_numpy(o) for o in outs]


@dataclass
class BuildContext:
    """Session-wide settings an op's ``prepare`` needs (the kernel override, thread count)."""

    kernel: str | None = None
    threads: int | None = None
    layers: list = field(default_factory=list)  # stateful layer objects, for Session.layers()


# ---------------------------------------------------------------------------- conversions

def to_torch(a: np.ndarray | np.generic) -> torch.Tensor:
    """numpy -> torch without a copy where possible (torch refuses negative strides)."""
    arr = np.asarray(a)
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        arr = np.array(arr, copy=True, order="C")
    return torch.from_numpy(arr)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().resolve_conj().numpy()


_ONNX_TO_NP: dict[int, np.dtype] = {}


def onnx_dtype_to_numpy(elem_type: int) -> np.dtype:
    """ONNX TensorProto element type -> numpy dtype (error for types numpy cannot hold)."""
    if elem_type not in _ONNX_TO_NP:
        import onnx

        try:
            _ONNX_TO_NP[elem_type] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
        except (KeyError, ValueError, TypeError) as exc:
            raise SwatError(f"ONNX element type {elem_type} is not supported; "
                            "export the model with float/int tensors") from exc
    return _ONNX_TO_NP[elem_type]


def onnx_type_name(elem_type: int) -> str:
    """ONNX element type -> the string onnxruntime's NodeArg.type shows, e.g. 'tensor(float)'."""
    import onnx

    try:
        return f"tensor({onnx.TensorProto.DataType.Name(elem_type).lower()})"
    except ValueError:
        return "tensor(undefined)"


_NP_TO_TORCH = {
    np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
    np.dtype(np.float16): torch.float16, np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32, np.dtype(np.int16): torch.int16,
    np.dtype(np.int8): torch.int8, np.dtype(np.uint8): torch.uint8,
    np.dtype(np.uint16): torch.uint16, np.dtype(np.uint32): torch.uint32,
    np.dtype(np.uint64): torch.uint64, np.dtype(np.bool_): torch.bool,
}


def torch_dtype(np_dtype: np.dtype) -> torch.dtype:
    try:
        return _NP_TO_TORCH[np.dtype(np_dtype)]
    except KeyError as exc:
        raise SwatError(f"tensor type {np.dtype(np_dtype)} is not supported at inference; "
                        "export the model with float32 activations") from exc


def to_int_list(value: Any) -> list[int]:
    """A shape / axes / pads value given as a tensor, array or list -> list of Python ints."""
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in np.asarray(value).reshape(-1).tolist()]


def scalar(value: Any) -> float | int | bool:
    """A one-element tensor / array -> Python scalar."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)[0].item()
    return np.asarray(value).reshape(-1)[0].item()


def norm_axis(axis: int, rank: int, node: Node) -> int:
    if not -rank <= axis < max(rank, 1):
        raise node.error(f"axis {axis} is out of range for a rank-{rank} tensor",
                         "fix the model's axis attribute")
    return axis + rank if axis < 0 else axis


def input_or_attr(node: Node, inputs: list, index: int, attr: str, since_opset: int) -> list[int] | None:
    """A list of ints that moved from an attribute to an input at ``since_opset``.

    Reads whichever the node actually carries (an exporter may mix), so older and newer
    models both work. Returns None when neither is given.
    """
    if node.opset >= since_opset or attr not in node.attrs:
        if len(inputs) > index and inputs[index] is not None:
            return to_int_list(inputs[index])
    if attr in node.attrs:
        return node.ints(attr)
    return None


def resolve_pads(node: Node, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                 dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    """(begin pads, end pads) per spatial axis for Conv and the pools, auto_pad included.

    SAME_* pads depend on the input size, which is why conv/pool steps resolve them per run
    (the sizes can change with a new input shape) instead of once at load.
    """
    nd = len(spatial)
    auto = node.attr("auto_pad", "NOTSET") or "NOTSET"
    if auto == "NOTSET":
        pads = node.ints("pads", [0] * (2 * nd))
        if len(pads) != 2 * nd:
            raise node.error(f"pads {pads} do not have 2 entries per spatial axis ({nd})", "fix the pads")
        return pads[:nd], pads[nd:]
    if auto == "VALID":
        return [0] * nd, [0] * nd
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise node.error(f"auto_pad {auto!r} is not valid", "use NOTSET, VALID, SAME_UPPER or SAME_LOWER")
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        out = -(-int(size) // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - int(size))
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return begins, ends


def spatial_attrs(node: Node, kernel: Sequence[int]) -> tuple[list[int], list[int]]:
    """(strides, dilations) with ONNX's defaults of 1, checked against the kernel rank."""
    nd = len(kernel)
    strides = node.ints("strides", [1] * nd)
    dilations = node.ints("dilations", [1] * nd)
    if len(strides) != nd or len(dilations) != nd:
        raise node.error(f"strides {strides} / dilations {dilations} do not match a {nd}-D kernel",
                         "give one value per spatial axis")
    return strides, dilations
