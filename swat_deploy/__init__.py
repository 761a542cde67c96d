"""Deploying SWAT-trained models: prune, store sparse, export, run sparse, verify, bench.

Reads what training wrote (the run dir), or a module trained in your own loop
(``export_onnx(model, path, example_input=...)``, ``verify_module``); heavy runtimes are
imported on first use.
"""
from training.errors import SwatError

# These three functions share their names with the submodules that define them. Imported
# lazily, the function would be replaced by the submodule as soon as anything imported it
# (Python binds a loaded submodule onto its package), and `swat_deploy.prune(run)` would fail
# with "module is not callable". Bound here, after the submodules load, they stay functions.
from .export import export  # noqa: E402
from .prune import prune  # noqa: E402
from .verify import verify  # noqa: E402

__all__ = ["SwatError", "prune", "SparseModel", "Session", "export", "export_onnx", "export_torchscript",
           "verify", "verify_module", "ModuleReport", "prune_module"]

_LAZY = {
    "SparseModel": "swat_deploy.prune", "Session": "swat_deploy.session",
    "export_onnx": "swat_deploy.export", "export_torchscript": "swat_deploy.export",
    "verify_module": "swat_deploy.module_verify", "ModuleReport": "swat_deploy.module_verify",
    "prune_module": "swat_deploy.from_module",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'swat_deploy' has no attribute {name!r}")
