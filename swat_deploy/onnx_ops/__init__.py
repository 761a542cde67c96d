"""ONNX op implementations for `swat_deploy.Session`, one module per op family.

The registry is an explicit dict built from each module's ``OPS`` list, so "which ops are
supported" is answerable by reading this file and the error for an unknown op can list them.
Only the default ONNX domain ("" / "ai.onnx") is covered.
"""
from __future__ import annotations

from . import elementwise, layers, norm, pool, reduce, shape
from .base import BuildContext, Node, OpDef
from .graph import Graph, ValueInfo, graph_from_onnx
from .optimize import DEFAULT_DOMAINS, check_supported, optimize

_MODULES = (layers, pool, norm, elementwise, shape, reduce)

REGISTRY: dict[str, OpDef] = {}
for _module in _MODULES:
    for _op in _module.OPS:
        if _op.op_type in REGISTRY:
            raise RuntimeError(f"ONNX op {_op.op_type} is registered twice")  # a bug in this package
        REGISTRY[_op.op_type] = _op


def supported_ops() -> list[str]:
    return sorted(REGISTRY)


__all__ = ["REGISTRY", "DEFAULT_DOMAINS", "BuildContext", "Graph", "Node", "OpDef", "ValueInfo",
           "check_supported", "graph_from_onnx", "optimize", "supported_ops"]
