"""Normalisation ops in their inference form.

A BatchNormalization right after a Conv never reaches this module: the graph optimiser folds
it into the conv's weights at load (zeros stay zeros, so sparsity survives). What is left here
is BN after something else (an Add, a pool, the input), LayerNormalization and
InstanceNormalization, computed with torch.
"""
from __future__ import annotations

import torch.nn.functional as F

from .base import Node, OpDef


def _t_batchnorm(node: Node, xs: list) -> list:
    x, scale, bias, mean, var = xs[:5]
    if node.attr("training_mode", 0) or len([o for o in node.outputs if o]) > 1:
        raise node.error("training-mode BatchNormalization (running-stat outputs) is not supported",
                         "export the model in eval mode (model.eval())")
    eps = float(node.attr("epsilon", 1e-5))
    if x.dim() == 1:
        raise node.error("input has no channel axis", "feed an (N, C, ...) tensor")
    return [F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)]


def _t_layernorm(node: Node, xs: list) -> list:
    x, scale = xs[0], xs[1]
    bias = xs[2] if len(xs) > 2 else None
    axis = int(node.attr("axis", -1))
    axis = axis + x.dim() if axis < 0 else axis
    eps = float(node.attr("epsilon", 1e-5))
    shape = tuple(x.shape[axis:])
    y = F.layer_norm(x, shape, scale.expand(shape) if scale is not None else None,
                     bias.expand(shape) if bias is not None else None, eps)
    # Optional outputs Mean / InvStdDev are training-only; refuse rather than fake them.
    if len([o for o in node.outputs if o]) > 1:
        raise node.error("Mean/InvStdDev outputs are not supported", "export the model in eval mode")
    return [y]


def _t_instancenorm(node: Node, xs: list) -> list:
    x, scale, bias = xs
    return [F.instance_norm(x, weight=scale, bias=bias, eps=float(node.attr("epsilon", 1e-5)))]


OPS: list[OpDef] = [
    OpDef("BatchNormalization", run=_t_batchnorm),
    OpDef("LayerNormalization", run=_t_layernorm),
    OpDef("InstanceNormalization", run=_t_instancenorm),
]
