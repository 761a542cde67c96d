"""The sparse weight a SWAT layer's forward uses - and the one pruning must reproduce.

Its own module because it joins two: element-wise selection (:mod:`training.topk`) and whole
blocks of output channels (:mod:`training.blocks`, which builds on topk); with it here neither
of those imports the other back.
"""
from __future__ import annotations

import torch
from torch import Tensor

from training.blocks import block_topk_weight
from training.topk import check_topk, select_bits

__all__ = ["topk_weight"]


def topk_weight(w: Tensor, sparsity: float, topk: str = "nchw", block: int = 1) -> Tensor:
    """TopK(W): ``w`` with all but the kept entries zeroed.

    Under ``random`` weights use magnitude ``nchw`` selection (:mod:`training.topk`: why).
    ``block`` > 1: whole groups of that many consecutive output channels (:mod:`training.blocks`).
    """
    if block != 1:
        return block_topk_weight(w, sparsity, topk, block)
    variant = "nchw" if topk == "random" else check_topk(topk)
    mask = select_bits(w, sparsity, variant).mask
    return torch.where(mask, w.detach(), torch.zeros((), dtype=w.dtype, device=w.device))
