"""Forward-only sparsification of weights or activations: the paper's Figure 2a ablation.

The forward pass computes with TopK(W) (``what="weights"``) or with TopK(a_in)
(``what="activations"``, the layer's input, zeros never counted as kept); the backward pass is
the *dense* one (grad_input from the dense W, grad_W from the dense input), so only the forward
is perturbed.  Evaluation uses the same sparse forward.  ``swatify``
cannot express this: its swat mode ties the weight and the activation sparsity of a layer
together and sparsifies the backward too.

Implemented with stock ops only: ``dense + (sparse - dense).detach()`` has the value of the
sparse product and the gradient of the dense one.  It costs a second forward GEMM, which the
small study models can afford; it is an ablation, not a training mode to deploy.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.budget import layer_sparsities, prunable_layers
from training.errors import SwatError
from training.topk import check_topk, select_bits
from training.weight_topk import topk_weight

__all__ = ["forward_only", "ForwardOnlyConv2d", "ForwardOnlyLinear"]


class _ForwardOnlyMixin:
    fo_sparsity: float
    fo_topk: str
    fo_what: str = "weights"
    weight: Tensor
    bias: Optional[Tensor]
    training: bool

    def _fo_op(self, x: Tensor, w: Tensor) -> Tensor:
        raise NotImplementedError

    def _fo_sparse(self, x: Tensor) -> Tensor:
        if self.fo_what == "activations":
            mask = select_bits(x, self.fo_sparsity, self.fo_topk, drop_zeros=True).mask
            return self._fo_op(torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)), self.weight)
        return self._fo_op(x, topk_weight(self.weight, self.fo_sparsity, self.fo_topk))

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return self._fo_sparse(x)
        dense = self._fo_op(x, self.weight)
        with torch.no_grad():
            sparse = self._fo_sparse(x)
        # the value of the sparse forward, the gradient of the dense one
        return dense + (sparse - dense).detach()


class ForwardOnlyConv2d(_ForwardOnlyMixin, nn.Conv2d):
    """Conv2d whose forward uses TopK(W) and whose backward is dense."""

    def _fo_op(self, x: Tensor, w: Tensor) -> Tensor:
        return self._conv_forward(x, w, self.bias)


class ForwardOnlyLinear(_ForwardOnlyMixin, nn.Linear):
    """Linear layer whose forward uses TopK(W) and whose backward is dense."""

    def _fo_op(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x, w, self.bias)


def forward_only(model: nn.Module, sparsity: float, topk: str = "nchw", what: str = "weights",
                 exclude: Sequence[str] = ()) -> nn.Module:
    """Make every plain Conv2d / Linear of ``model`` forward-sparse (in place; returns model).

    ``what``: "weights" (TopK(W)) or "activations" (TopK of each layer's input).  Parameters are
    untouched, so an optimizer built before the call keeps working.  The model must not be
    swatified (call :func:`training.swatify.unswatify` first).
    """
    check_topk(topk)
    if what not in ("weights", "activations"):
        raise SwatError(f"forward_only what={what!r}; choose 'weights' or 'activations'")
    plan = layer_sparsities(model, sparsity, "uniform", list(exclude))
    for name, m in prunable_layers(model):
        if name not in plan:
            continue
        if getattr(type(m), "_swat_layer", False):
            raise ValueError(f"layer {name!r} is a SWAT layer; call training.unswatify(model) before "
                             "forward_only(model, ...)")
        m.__class__ = ForwardOnlyConv2d if isinstance(m, nn.Conv2d) else ForwardOnlyLinear
        m.fo_sparsity = plan[name]
        m.fo_topk = topk
        m.fo_what = what
    return model
