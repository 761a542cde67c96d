"""Training compute per run from what the run *recorded*, not from the nominal sparsity.

The FLOP model is :mod:`training.measure`'s (the paper's section 3.3): per layer and sample the
forward GEMM costs M multiply-accumulates, the backward M for grad_input and M for grad_W.
Each term is scaled by the density the run actually used, averaged over its training steps:
the weight Top-K (``weight_sparsity_train``), the saved activation Top-K (``act_sparsity``,
which counts the zeros a ReLU already made as dropped, as a sparse kernel would skip them) or
meProp's output-gradient Top-K.  Layers a run keeps dense (an excluded first conv, meProp's
output layer) count in full.
"""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["training_macs", "compute_reduction"]


def _density(v: Optional[float]) -> float:
    return 1.0 if v is None else 1.0 - float(v)


def training_macs(rec: dict[str, Any]) -> tuple[float, float]:
    """(dense, as-run) training MACs per sample of a run record."""
    dense = run = 0.0
    for layer in rec.get("layers", []):
        m = layer.get("macs")
        if not m:
            continue
        dense += 3 * m
        mode = layer.get("mode", "dense")
        w = _density(layer.get("weight_sparsity_train", layer.get("weight_sparsity")))
        a = _density(layer.get("act_sparsity"))
        if mode == "swat":
            run += m * w + m * w + m * a
        elif mode == "saw":
            run += m + m * w + m * a
        elif mode == "meprop":
            g = _density(layer.get("grad_sparsity"))
            run += m + 2 * m * g
        elif mode.startswith("forward-"):
            run += m * _density(layer.get("nominal_sparsity")) + 2 * m
        else:
            run += 3 * m
    return dense, run


def compute_reduction(rec: dict[str, Any]) -> Optional[float]:
    """Dense / as-run training MACs (the paper's Figure 7 quantity), None without layer data."""
    dense, run = training_macs(rec)
    return dense / run if run else None
