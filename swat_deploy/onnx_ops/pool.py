"""MaxPool, AveragePool and the global pools, with ONNX's padding and ceil_mode rules.

torch's pools only take symmetric padding of at most half the kernel, while ONNX allows any
begin/end pads plus auto_pad. So the padding is applied explicitly (-inf for max, zeros for
average) and the torch pool runs unpadded. For averages the divisor is the pooled count of
a mask (1 where a value counts: the input, plus the explicit pads when count_include_pad),
which reproduces onnxruntime's divisor at every border, ceil_mode overhang included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from swat_deploy.threads import allowed_threads
from swat_native import pool as native_pool

from .base import Node, OpDef, resolve_pads, spatial_attrs

_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _geometry(node: Node, x: torch.Tensor):
    """kernel, strides, dilations, begin pads, end pads (incl. ceil_mode overhang), explicit ends."""
    spatial = tuple(x.shape[2:])
    nd = len(spatial)
    kernel = node.ints("kernel_shape")
    if kernel is None or len(kernel) != nd:
        raise node.error(f"kernel_shape {kernel} does not match a {nd}-D input", "fix kernel_shape")
    if nd not in _MAX:
        raise node.error(f"{nd}-D pooling is not supported", "use 1-D, 2-D or 3-D pooling")
    strides, dilations = spatial_attrs(node, kernel)
    begins, ends = resolve_pads(node, spatial, kernel, strides, dilations)
    ceil_mode = bool(node.attr("ceil_mode", 0))
    total_ends = []
    for size, k, s, d, b, e in zip(spatial, kernel, strides, dilations, begins, ends):
        if b >= k or e >= k:  # a window of padding only (onnxruntime refuses such a model as well)
            raise node.error(f"pads {list(begins)} / {list(ends)} are not all smaller than kernel {kernel}",
                             "fix pads")
        span = (k - 1) * d + 1
        room = size + b + e - span  # < 0: the kernel overhangs; with ceil_mode still one window
        out = (-(-room // s) if ceil_mode else room // s) + 1
        if ceil_mode and (out - 1) * s >= size + b:  # a window may not start in the end padding
            out -= 1
        if out < 1:
            raise node.error(f"kernel {kernel} is larger than the padded input {spatial}",
                             "use a smaller kernel or a larger input")
        total_ends.append(e + max(0, (out - 1) * s + span - (size + b + e)))
    return kernel, strides, dilations, begins, total_ends, ends


def _pad_spec(begins: list[int], ends: list[int]) -> list[int]:
    flat = []
    for b, e in zip(reversed(begins), reversed(ends)):
        flat += [b, e]
    return flat


def _max_pool2d(x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> torch.Tensor:
    """Unpadded 2-D max pooling as a max over strided views, first along W, then along H (where
    the compiled pool, ``swat_native.pool``, is missing or the dtype is not float32).

    Why: torch's own NCHW max_pool2d runs its window loop per output element, unvectorised:
    ResNet-50's stem pool (64 x 112 x 112, 3x3 stride 2) took 3.7 ms at batch 1 on 2 threads
    (AMD EPYC), more than its largest sparse conv; these few elementwise maxima take 0.54 ms.
    NaN propagates as in torch's pool (torch.maximum keeps NaN)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    h, w = x.shape[-2:]
    oh = (h - (kh - 1) * dh - 1) // sh + 1
    ow = (w - (kw - 1) * dw - 1) // sw + 1
    rows = None
    for j in range(kw):
        v = x[..., j * dw: j * dw + (ow - 1) * sw + 1: sw]
        rows = v if rows is None else torch.maximum(rows, v)
    out = None
    for i in range(kh):
        v = rows[..., i * dh: i * dh + (oh - 1) * sh + 1: sh, :]
        out = v if out is None else torch.maximum(out, v)
    return out.contiguous()


def _t_maxpool(node: Node, xs: list) -> list:
    x = xs[0]
    if len([o for o in node.outputs if o]) > 1:
        raise node.error("the Indices output is not supported", "export MaxPool without return_indices")
    if node.attr("storage_order", 0):
        raise node.error("storage_order=1 is not supported", "export with the default storage order")
    kernel, strides, dilations, begins, ends, _ = _geometry(node, x)
    if len(kernel) == 2 and x.dtype == torch.float32:
        out_hw = [(size + b + e - (k - 1) * d - 1) // s + 1
                  for size, k, s, d, b, e in zip(x.shape[2:], kernel, strides, dilations, begins, ends)]
        threads = allowed_threads(torch.get_num_threads())
        y = native_pool.maxpool2d(x, kernel, strides, dilations, begins, out_hw, threads)
        if y is not None:
            return [y]
    if any(begins) or any(ends):
        fill = float("-inf") if x.dtype.is_floating_point else torch.iinfo(x.dtype).min
        x = F.pad(x, _pad_spec(begins, ends), value=fill)
    if len(kernel) == 2 and x.dtype.is_floating_point:
        return [_max_pool2d(x, kernel, strides, dilations)]
    return [_MAX[len(kernel)](x, kernel, strides, 0, dilations)]


def _t_avgpool(node: Node, xs: list) -> list:
    x = xs[0]
    kernel, strides, dilations, begins, ends, explicit_ends = _geometry(node, x)
    if any(d != 1 for d in dilations):
        raise node.error("dilated AveragePool is not supported", "use dilations of 1")
    pool = _AVG[len(kernel)]
    if not any(begins) and not any(ends):
        return [pool(x, kernel, strides)]
    spatial = tuple(x.shape[2:])
    mask = torch.ones((1, 1) + spatial, dtype=x.dtype)
    if node.attr("count_include_pad", 0):  # explicit pads count, the ceil_mode overhang does not
        mask = F.pad(mask, _pad_spec(begins, explicit_ends), value=1.0)
        overhang = [e - ee for e, ee in zip(ends, explicit_ends)]
        mask = F.pad(mask, _pad_spec([0] * len(kernel), overhang), value=0.0)
    else:
        mask = F.pad(mask, _pad_spec(begins, ends), value=0.0)
    summed = pool(F.pad(x, _pad_spec(begins, ends), value=0.0), kernel, strides)
    counts = pool(mask, kernel, strides)
    return [summed / counts]


def _t_global_avg(node: Node, xs: list) -> list:
    x = xs[0]
    return [torch.mean(x, dim=tuple(range(2, x.dim())), keepdim=True)]


def _t_global_max(node: Node, xs: list) -> list:
    x = xs[0]
    return [torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)]


OPS: list[OpDef] = [
    OpDef("MaxPool", run=_t_maxpool),
    OpDef("AveragePool", run=_t_avgpool),
    OpDef("GlobalAveragePool", run=_t_global_avg),
    OpDef("GlobalMaxPool", run=_t_global_max),
]
