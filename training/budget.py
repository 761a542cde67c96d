"""How a model-wide sparsity is split into per-layer sparsities.

* ``uniform`` - every layer gets the same sparsity s (the paper's setting).
* ``erk`` - Erdos-Renyi-Kernel (RigL; also in the official SWAT code): a layer's density is
  proportional to sum(weight dims) / prod(weight dims), so small layers (the first conv, the
  classifier) stay denser than big ones; the scale is solved so that the kept parameters total
  (1 - s) of all (non-excluded) layers' parameters.  A layer whose density would exceed 1 is
  made dense and the rest is re-solved (capping only raises the others' scale, so all layers
  over the cap can be fixed in one round, repeated until none is).

``per_layer`` overrides are applied on top of the budget (they do not re-balance it).
"""
from __future__ import annotations

import fnmatch
import math
from typing import Mapping, Optional, Sequence

from torch import nn

from training.config import BUDGETS
from training.topk import SwatValueError, check_sparsity

__all__ = ["BUDGETS", "layer_sparsities", "prunable_layers", "match_any"]


def _convertible(m: nn.Module) -> bool:
    cls = type(m)
    if getattr(cls, "_swat_layer", False):
        return True
    return (isinstance(m, nn.Conv2d) and cls.forward is nn.Conv2d.forward) or \
        (isinstance(m, nn.Linear) and cls.forward is nn.Linear.forward)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d / Linear that SWAT can convert (standard forward), in module order.

    A subclass with its own ``forward`` is refused loudly rather than skipped: silently
    leaving it dense would make a "70% sparse" model that is not.
    """
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if not _convertible(m):
            raise SwatValueError(f"layer {name!r} is a {type(m).__name__} with its own forward(), which "
                                 f"SWAT cannot convert; add it to exclude (e.g. exclude=[{name!r}])")
        out.append((name, m))
    return out


def match_any(name: str, patterns: Sequence[str]) -> bool:
    """Exact module name or fnmatch glob (``layer1.*``, ``*.conv2``)."""
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(model: nn.Module, exclude: Sequence[str]) -> list[str]:
    if isinstance(exclude, str):
        exclude = [exclude]
    pats = list(exclude)
    for p in pats:
        if not isinstance(p, str) or not p:
            raise SwatValueError(f"exclude entries must be module names or globs, got {p!r}")
    names = [n for n, _ in model.named_modules() if n]
    for p in pats:
        if not any(match_any(n, [p]) for n in names):
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise SwatValueError(f"exclude pattern {p!r} matches no module; module names look like: {sample}")
    return pats


def _erk(shapes: dict[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    total = sum(numel.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        if not free:
            break
        budget = (1.0 - sparsity) * total - sum(numel[n] for n in dense)
        scale = budget / sum(raw[n] * numel[n] for n in free)
        over = [n for n in free if scale * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    out = {}
    for n in shapes:
        density = 1.0 if n in dense else scale * raw[n]
        out[n] = min(max(1.0 - density, 0.0), 1.0 - 1e-9)
    return out


def layer_sparsities(model: nn.Module, sparsity: float, budget: str = "uniform", exclude: Sequence[str] = (),
                     per_layer: Optional[Mapping[str, float]] = None) -> dict[str, float]:
    """Sparsity per convertible, non-excluded layer (module name -> s in [0, 1))."""
    s = check_sparsity(sparsity)
    if budget not in BUDGETS:
        raise SwatValueError(f"unknown budget {budget!r}; choose one of: {', '.join(BUDGETS)}")
    pats = _check_patterns(model, exclude)
    layers = [(n, m) for n, m in prunable_layers(model) if not match_any(n, pats)]
    shapes = {n: tuple(m.weight.shape) for n, m in layers}
    if budget == "uniform" or not shapes:
        result = {n: s for n in shapes}
    else:
        result = _erk(shapes, s)
    for name, value in (per_layer or {}).items():
        if name not in shapes:
            all_names = [n for n, _ in prunable_layers(model)]
            why = "it is excluded" if name in all_names else "no such Conv2d/Linear layer"
            raise SwatValueError(f"per_layer names {name!r} but {why}; convertible layers: {', '.join(all_names)}")
        result[name] = check_sparsity(value)
    return result
