"""Measuring what autograd really keeps for backward (``saved_tensors_hooks``).

Every storage is counted once: a tensor saved by two nodes costs memory once.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class SavedTensor:
    """One tensor autograd kept for backward (``duplicate``: its storage was already counted)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    duplicate: bool
    parameter: bool


LossSpec = Union[Tensor, Callable[[Tensor], Tensor]]


def saved_tensors(model: nn.Module, x: Tensor, y_or_loss_fn: LossSpec) -> list[SavedTensor]:
    """Every tensor one training-mode forward + loss saves for backward, in save order.

    Runs on a deep copy, so the caller's BatchNorm statistics and SWAT threshold caches are
    untouched.  ``y_or_loss_fn`` is either class targets (cross-entropy) or ``output -> loss``.
    """
    net = copy.deepcopy(model).train()
    owned = {p.untyped_storage().data_ptr() for p in list(net.parameters()) + list(net.buffers())}
    seen: set[int] = set()
    records: list[SavedTensor] = []

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # sparse / meta tensors: no storage to count
            key, nbytes = -1 - len(records), t.numel() * t.element_size()
        dup = key in seen and nbytes > 0
        seen.add(key)
        records.append(SavedTensor(tuple(t.shape), t.dtype, nbytes, dup, key in owned))
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
        loss = y_or_loss_fn(out) if callable(y_or_loss_fn) else F.cross_entropy(out, y_or_loss_fn)
        del loss, out
    return records


def saved_bytes(model: nn.Module, x: Tensor, y_or_loss_fn: LossSpec, *,
                exclude_parameters: bool = False) -> int:
    """Bytes autograd keeps alive for one backward pass (each storage counted once).

    ``exclude_parameters`` leaves out storages owned by the model (weights saved by reference
    cost no extra memory); the default counts them so that SWAT's compact weight copy and a
    dense layer's reference to its weight are compared on equal terms.
    """
    return sum(r.nbytes for r in saved_tensors(model, x, y_or_loss_fn)
               if not r.duplicate and not (exclude_parameters and r.parameter))
