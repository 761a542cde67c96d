"""Deploying SWAT-trained models: prune, store sparse, export, run sparse, verify, bench.

Reads only what training wrote (the run dir); heavy runtimes are imported on first use.
"""
from training.errors import SwatError

__all__ = ["SwatError", "prune", "SparseModel", "Session", "export", "export_onnx", "export_torchscript",
           "verify"]

_LAZY = {
    "prune": "swat_deploy.prune", "SparseModel": "swat_deploy.prune", "Session": "swat_deploy.session",
    "export": "swat_deploy.export", "export_onnx": "swat_deploy.export", "export_torchscript": "swat_deploy.export",
    "verify": "swat_deploy.verify",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'swat_deploy' has no attribute {name!r}")
