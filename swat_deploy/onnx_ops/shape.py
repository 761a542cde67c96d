"""Ops that move, select or create data without arithmetic on it.

Most of these run on small int64 shape tensors (Shape -> Gather -> Concat -> Reshape) or on
constants during folding, so numpy is the main implementation; the ones that touch
activations in a CNN (Reshape, Flatten, Concat, Transpose, ...) also have a torch version so
inference never leaves torch for them. ONNX semantics that differ from numpy's (Reshape's 0,
Slice's clamping, Gather's negative indices, integer-only attribute/input moves between
opsets) are spelled out here.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import Node, OpDef, input_or_attr, norm_axis, onnx_dtype_to_numpy, scalar, to_int_list, torch_dtype

# ----------------------------------------------------------------------- Reshape, Flatten


def _reshape_target(node: Node, in_shape: tuple[int, ...], spec: list[int]) -> list[int]:
    """Resolve ONNX Reshape's 0 (copy the input dim unless allowzero) and -1 (infer)."""
    allowzero = int(node.attr("allowzero", 0))
    out = []
    for i, d in enumerate(spec):
        if d == 0 and not allowzero:
            if i >= len(in_shape):
                raise node.error(f"shape {spec} copies dim {i} of a rank-{len(in_shape)} input",
                                 "fix the shape tensor")
            out.append(int(in_shape[i]))
        else:
            out.append(int(d))
    if out.count(-1) > 1:
        raise node.error(f"shape {spec} has more than one -1", "give at most one inferred dim")
    return out


def _t_reshape(node: Node, xs: list) -> list:
    x = xs[0]
    if node.opset < 5 and "shape" in node.attrs:
        spec = node.ints("shape")
    else:
        spec = to_int_list(xs[1])
    return [x.reshape(_reshape_target(node, tuple(x.shape), spec))]


def _np_reshape(node: Node, xs: list) -> list:
    x = xs[0]
    spec = node.ints("shape") if node.opset < 5 and "shape" in node.attrs else to_int_list(xs[1])
    return [x.reshape(_reshape_target(node, x.shape, spec))]


def _flat_shape(node: Node, shape: tuple[int, ...]) -> tuple[int, int]:
    rank = len(shape)
    axis = int(node.attr("axis", 1))
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis <= rank:
        raise node.error(f"axis {node.attr('axis')} is out of range for rank {rank}", "fix the axis")
    return int(np.prod(shape[:axis], dtype=np.int64)), int(np.prod(shape[axis:], dtype=np.int64))


def _t_flatten(node: Node, xs: list) -> list:
    return [xs[0].reshape(_flat_shape(node, tuple(xs[0].shape)))]


def _np_flatten(node: Node, xs: list) -> list:
    return [xs[0].reshape(_flat_shape(node, xs[0].shape))]


# ------------------------------------------------------------------- Squeeze, Unsqueeze


def _squeeze_axes(node: Node, xs: list, shape: tuple[int, ...]) -> list[int]:
    axes = input_or_attr(node, xs, 1, "axes", since_opset=13)
    if axes is None:
        return [i for i, d in enumerate(shape) if d == 1]
    axes = sorted(norm_axis(a, len(shape), node) for a in axes)
    for a in axes:
        if shape[a] != 1:
            raise node.error(f"cannot squeeze axis {a} of size {shape[a]}", "squeeze only size-1 axes")
    return axes


def _t_squeeze(node: Node, xs: list) -> list:
    x = xs[0]
    axes = _squeeze_axes(node, xs, tuple(x.shape))
    keep = [d for i, d in enumerate(x.shape) if i not in axes]
    return [x.reshape(keep)]


def _np_squeeze(node: Node, xs: list) -> list:
    x = xs[0]
    return [np.squeeze(x, axis=tuple(_squeeze_axes(node, xs, x.shape)))]


def _unsqueeze_shape(node: Node, xs: list, shape: tuple[int, ...]) -> list[int]:
    axes = input_or_attr(node, xs, 1, "axes", since_opset=13)
    if axes is None:
        raise node.error("no axes given", "add the axes input (opset >= 13) or attribute")
    rank = len(shape) + len(axes)
    axes = sorted(norm_axis(a, rank, node) for a in axes)
    if len(set(axes)) != len(axes):
        raise node.error(f"duplicate axes {axes}", "list each axis once")
    out = list(shape)
    for a in axes:
        out.insert(a, 1)
    return out


def _t_unsqueeze(node: Node, xs: list) -> list:
    return [xs[0].reshape(_unsqueeze_shape(node, xs, tuple(xs[0].shape)))]


def _np_unsqueeze(node: Node, xs: list) -> list:
    return [xs[0].reshape(_unsqueeze_shape(node, xs, xs[0].shape))]


# ---------------------------------------------------------------- Transpose, Concat, Split


def _perm(node: Node, rank: int) -> list[int]:
    perm = node.ints("perm")
    return list(range(rank))[::-1] if perm is None else [norm_axis(p, rank, node) for p in perm]


def _t_transpose(node: Node, xs: list) -> list:
    return [xs[0].permute(_perm(node, xs[0].dim()))]


def _np_transpose(node: Node, xs: list) -> list:
    return [np.transpose(xs[0], _perm(node, xs[0].ndim))]


def _t_concat(node: Node, xs: list) -> list:
    parts = [x for x in xs if x is not None]
    axis = norm_axis(int(node.attr("axis", 0)), parts[0].dim(), node)
    return [torch.cat(parts, dim=axis)]


def _np_concat(node: Node, xs: list) -> list:
    parts = [x for x in xs if x is not None]
    axis = norm_axis(int(node.attr("axis", 0)), parts[0].ndim, node)
    return [np.concatenate(parts, axis=axis)]


def _split_sizes(node: Node, xs: list, dim: int) -> list[int]:
    sizes = input_or_attr(node, xs, 1, "split", since_opset=13)
    if sizes is not None:
        if sum(sizes) != dim:
            raise node.error(f"split sizes {sizes} do not add up to {dim}", "fix the split sizes")
        return sizes
    n = int(node.attr("num_outputs", len(node.outputs)))
    chunk = -(-dim // n)  # opset 18: equal chunks, the last one smaller
    if "num_outputs" not in node.attrs and dim % n:
        raise node.error(f"cannot split {dim} into {n} equal parts", "give explicit split sizes")
    return [min(chunk, dim - i * chunk) for i in range(n)]


def _t_split(node: Node, xs: list) -> list:
    x = xs[0]
    axis = norm_axis(int(node.attr("axis", 0)), x.dim(), node)
    return list(torch.split(x, _split_sizes(node, xs, x.shape[axis]), dim=axis))


def _np_split(node: Node, xs: list) -> list:
    x = xs[0]
    axis = norm_axis(int(node.attr("axis", 0)), x.ndim, node)
    sizes = _split_sizes(node, xs, x.shape[axis])
    return np.split(x, np.cumsum(sizes)[:-1], axis=axis)


# -------------------------------------------------------------------------- Slice


def _slice_params(node: Node, xs: list, rank: int) -> list[tuple[int, int, int, int]]:
    """(axis, start, end, step) per sliced axis, from attributes (< opset 10) or inputs."""
    if node.opset < 10 or "starts" in node.attrs:
        starts, ends = node.ints("starts"), node.ints("ends")
        axes, steps = node.ints("axes"), None
    else:
        starts, ends = to_int_list(xs[1]), to_int_list(xs[2])
        axes = to_int_list(xs[3]) if len(xs) > 3 and xs[3] is not None else None
        steps = to_int_list(xs[4]) if len(xs) > 4 and xs[4] is not None else None
    axes = list(range(len(starts))) if axes is None else [norm_axis(a, rank, node) for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    if 0 in steps:
        raise node.error("a slice step is 0", "use a non-zero step")
    return list(zip(axes, starts, ends, steps))


def _onnx_slice(start: int, end: int, step: int, dim: int) -> slice:
    """ONNX's clamping rules (they differ from Python's for negative steps)."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
    start = min(max(start, 0), dim - 1)
    end = min(max(end, -1), dim - 1)
    return slice(start, None if end < 0 else end, step)


def _np_slice(node: Node, xs: list) -> list:
    x = xs[0]
    index = [slice(None)] * x.ndim
    for axis, start, end, step in _slice_params(node, xs, x.ndim):
        index[axis] = _onnx_slice(start, end, step, x.shape[axis])
    return [x[tuple(index)]]


def _t_slice(node: Node, xs: list) -> list:
    x = xs[0]
    for axis, start, end, step in _slice_params(node, xs, x.dim()):
        s = _onnx_slice(start, end, step, x.shape[axis])
        if step > 0:
            index = [slice(None)] * x.dim()
            index[axis] = s
            x = x[tuple(index)]
        else:  # torch has no negative-step slicing: gather the indices
            idx = torch.tensor(list(range(x.shape[axis]))[s], dtype=torch.int64)
            x = torch.index_select(x, axis, idx)
    return [x]


# ------------------------------------------------------------------ Gather, GatherElements


def _t_gather(node: Node, xs: list) -> list:
    data, idx = xs
    axis = norm_axis(int(node.attr("axis", 0)), data.dim(), node)
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    shape = list(data.shape[:axis]) + list(idx.shape) + list(data.shape[axis + 1:])
    return [out.reshape(shape)]


def _np_gather(node: Node, xs: list) -> list:
    data, idx = xs
    axis = norm_axis(int(node.attr("axis", 0)), data.ndim, node)
    idx = np.asarray(idx, dtype=np.int64)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    return [np.take(data, idx, axis=axis)]


def _np_gather_elements(node: Node, xs: list) -> list:
    data, idx = xs
    axis = norm_axis(int(node.attr("axis", 0)), data.ndim, node)
    idx = np.asarray(idx, dtype=np.int64)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    return [np.take_along_axis(data[_leading_box(idx.shape, axis)], idx, axis=axis)]


def _leading_box(shape: tuple[int, ...], axis: int) -> tuple[slice, ...]:
    """ONNX lets the indices be smaller than the data off the axis; numpy would broadcast."""
    return tuple(slice(None) if a == axis else slice(0, d) for a, d in enumerate(shape))


# ------------------------------------------------------------------------ Shape, Size


def _shape_range(node: Node, shape: tuple[int, ...]) -> list[int]:
    rank = len(shape)
    start = int(node.attr("start", 0))
    end = node.attr("end")
    end = rank if end is None else int(end)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return [int(d) for d in shape[start:end]]


def _t_shape(node: Node, xs: list) -> list:
    return [torch.tensor(_shape_range(node, tuple(xs[0].shape)), dtype=torch.int64)]


def _np_shape(node: Node, xs: list) -> list:
    return [np.array(_shape_range(node, xs[0].shape), dtype=np.int64)]


def _np_size(node: Node, xs: list) -> list:
    return [np.array(int(np.prod(np.shape(xs[0]), dtype=np.int64)), dtype=np.int64)]


# ----------------------------------------------------------------- Cast, Identity, Constant


def _target_dtype(node: Node) -> np.dtype:
    to = node.attr("to")
    if to is None:
        raise node.error("no 'to' attribute", "set the target type")
    return onnx_dtype_to_numpy(int(to))


def _t_cast(node: Node, xs: list) -> list:
    return [xs[0].to(torch_dtype(_target_dtype(node)))]


def _np_cast(node: Node, xs: list) -> list:
    return [xs[0].astype(_target_dtype(node))]


def _t_cast_like(node: Node, xs: list) -> list:
    return [xs[0].to(xs[1].dtype)]


def _np_cast_like(node: Node, xs: list) -> list:
    return [xs[0].astype(xs[1].dtype)]


def _identity(node: Node, xs: list) -> list:
    return [xs[0]]


def _np_constant(node: Node, xs: list) -> list:
    """Constant's value; graph loaders already turn every attribute form into ``value``."""
    if "value" not in node.attrs:
        raise node.error(f"unsupported value attribute(s) {sorted(node.attrs)}",
                         "store the constant as a numeric tensor")
    return [np.asarray(node.attrs["value"])]


def _np_constant_of_shape(node: Node, xs: list) -> list:
    shape = to_int_list(xs[0])
    value = node.attr("value")
    value = np.zeros(1, dtype=np.float32) if value is None else np.asarray(value).reshape(-1)
    return [np.full(shape, value[0], dtype=value.dtype)]


def _np_range(node: Node, xs: list) -> list:
    start, limit, delta = (np.asarray(x) for x in xs)
    if scalar(delta) == 0:
        raise node.error("delta is 0", "use a non-zero delta")
    n = max(int(np.ceil((scalar(limit) - scalar(start)) / scalar(delta))), 0)
    return [(start + np.arange(n, dtype=start.dtype) * delta).astype(start.dtype)]


# ----------------------------------------------------------------- Expand, Tile, Pad


def _np_expand(node: Node, xs: list) -> list:
    x = xs[0]
    shape = np.broadcast_shapes(x.shape, tuple(to_int_list(xs[1])))
    return [np.broadcast_to(x, shape).copy()]


def _t_expand(node: Node, xs: list) -> list:
    x = xs[0]
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(to_int_list(xs[1])))
    return [x.expand(shape).contiguous()]


def _np_tile(node: Node, xs: list) -> list:
    return [np.tile(xs[0], to_int_list(xs[1]))]


def _t_tile(node: Node, xs: list) -> list:
    return [xs[0].repeat(to_int_list(xs[1]))]


def _pad_params(node: Node, xs: list, rank: int) -> tuple[str, list[int], float]:
    """(mode, pads as [begin..., end...] over all axes, constant value) for any opset."""
    mode = node.attr("mode", "constant")
    if node.opset < 11 or "pads" in node.attrs:
        pads = node.ints("pads")
        value = float(node.attr("value", 0.0))
    else:
        pads = to_int_list(xs[1])
        value = scalar(xs[2]) if len(xs) > 2 and xs[2] is not None else 0
        axes = to_int_list(xs[3]) if len(xs) > 3 and xs[3] is not None else None
        if axes is not None:  # opset 18: pads only for the listed axes
            axes = [norm_axis(a, rank, node) for a in axes]
            full = [0] * (2 * rank)
            for i, a in enumerate(axes):
                full[a], full[a + rank] = pads[i], pads[i + len(axes)]
            pads = full
    if pads is None or len(pads) != 2 * rank:
        raise node.error(f"pads {pads} do not match a rank-{rank} input", "give 2 pads per axis")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise node.error(f"pad mode {mode!r} is not supported", "use constant, reflect, edge or wrap")
    return mode, pads, value


def _crop_negative(x, pads: list[int], rank: int):
    """ONNX allows negative pads (crop); numpy/torch padding do not, so crop first."""
    index = []
    for a in range(rank):
        b, e = pads[a], pads[a + rank]
        index.append(slice(-b if b < 0 else 0, x.shape[a] + e if e < 0 else x.shape[a]))
    return x[tuple(index)], [max(p, 0) for p in pads]


def _np_pad(node: Node, xs: list) -> list:
    x = xs[0]
    mode, pads, value = _pad_params(node, xs, x.ndim)
    x, pads = _crop_negative(x, pads, x.ndim)
    width = [(pads[a], pads[a + x.ndim]) for a in range(x.ndim)]
    if mode == "constant":
        return [np.pad(x, width, mode="constant", constant_values=np.asarray(value, dtype=x.dtype))]
    return [np.pad(x, width, mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode])]


def _t_pad(node: Node, xs: list) -> list:
    x = xs[0]
    mode, pads, value = _pad_params(node, xs, x.dim())
    if mode != "constant":  # rare in CNN inference; numpy covers every axis layout
        return [torch.from_numpy(_np_pad(node, [x.numpy()] + [None if v is None else np.asarray(v)
                                                              for v in xs[1:]])[0])]
    x, pads = _crop_negative(x, pads, x.dim())
    rank = x.dim()
    flat = []
    for a in reversed(range(rank)):  # F.pad wants (last_begin, last_end, prev_begin, ...)
        flat += [pads[a], pads[a + rank]]
    return [F.pad(x, flat, mode="constant", value=value)]


# ------------------------------------------- NonZero, ScatterND, ScatterElements, CumSum


def _np_nonzero(node: Node, xs: list) -> list:
    x = xs[0]
    x = x.reshape(1) if x.ndim == 0 else x
    return [np.array(np.nonzero(x), dtype=np.int64).reshape(x.ndim, -1)]


def _np_scatter_nd(node: Node, xs: list) -> list:
    data, idx, updates = xs
    out = data.copy()
    k = idx.shape[-1]
    flat_idx = idx.reshape(-1, k).astype(np.int64)
    flat_idx = np.where(flat_idx < 0, flat_idx + np.array(data.shape[:k]), flat_idx)
    flat_upd = updates.reshape((flat_idx.shape[0],) + data.shape[k:])
    target = tuple(flat_idx.T)
    reduction = node.attr("reduction", "none")
    if reduction == "none":
        out[target] = flat_upd
    elif reduction in ("add", "mul", "max", "min"):
        ufunc = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}[reduction]
        ufunc.at(out, target, flat_upd)
    else:
        raise node.error(f"reduction {reduction!r} is not supported", "use none, add, mul, max or min")
    return [out]


def _np_scatter_elements(node: Node, xs: list) -> list:
    data, idx, updates = xs
    axis = norm_axis(int(node.attr("axis", 0)), data.ndim, node)
    idx = np.asarray(idx, dtype=np.int64)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    out = data.copy()
    reduction = node.attr("reduction", "none")
    if reduction != "none":
        raise node.error(f"reduction {reduction!r} is not supported", "use reduction='none'")
    np.put_along_axis(out[_leading_box(idx.shape, axis)], idx, updates, axis=axis)  # a view of out
    return [out]


def _np_cumsum(node: Node, xs: list) -> list:
    x = xs[0]
    axis = norm_axis(int(scalar(xs[1])), x.ndim, node)
    reverse, exclusive = bool(node.attr("reverse", 0)), bool(node.attr("exclusive", 0))
    y = np.flip(x, axis) if reverse else x
    y = np.cumsum(y, axis=axis, dtype=x.dtype)
    if exclusive:
        y = np.concatenate([np.zeros_like(np.take(y, [0], axis=axis)),
                            np.take(y, np.arange(y.shape[axis] - 1), axis=axis)], axis=axis)
    return [np.ascontiguousarray(np.flip(y, axis) if reverse else y)]


# ---------------------------------------------------------------------------- registry

OPS: list[OpDef] = [
    OpDef("Reshape", run=_t_reshape, fold=_np_reshape),
    OpDef("Flatten", run=_t_flatten, fold=_np_flatten),
    OpDef("Squeeze", run=_t_squeeze, fold=_np_squeeze),
    OpDef("Unsqueeze", run=_t_unsqueeze, fold=_np_unsqueeze),
    OpDef("Transpose", run=_t_transpose, fold=_np_transpose),
    OpDef("Concat", run=_t_concat, fold=_np_concat),
    OpDef("Split", run=_t_split, fold=_np_split),
    OpDef("Slice", run=_t_slice, fold=_np_slice),
    OpDef("Gather", run=_t_gather, fold=_np_gather),
    OpDef("GatherElements", fold=_np_gather_elements),
    OpDef("Shape", run=_t_shape, fold=_np_shape),
    OpDef("Size", fold=_np_size),
    OpDef("Cast", run=_t_cast, fold=_np_cast),
    OpDef("CastLike", run=_t_cast_like, fold=_np_cast_like),
    OpDef("Identity", run=_identity, fold=_identity),
    OpDef("Constant", fold=_np_constant),
    OpDef("ConstantOfShape", fold=_np_constant_of_shape),
    OpDef("Range", fold=_np_range),
    OpDef("Expand", run=_t_expand, fold=_np_expand),
    OpDef("Tile", run=_t_tile, fold=_np_tile),
    OpDef("Pad", run=_t_pad, fold=_np_pad),
    OpDef("NonZero", fold=_np_nonzero),
    OpDef("ScatterND", fold=_np_scatter_nd),
    OpDef("ScatterElements", fold=_np_scatter_elements),
    OpDef("CumSum", fold=_np_cumsum),
]
