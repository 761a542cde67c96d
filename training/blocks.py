"""Block Top-K of weights: B consecutive output channels share one zero pattern.

Why blocks: a sparse kernel that keeps B output channels in registers loads each input once
for B multiply-adds only if those B channels need the same inputs.  Unstructured Top-K gives
every output channel its own pattern; block Top-K keeps or drops whole B x 1 groups (B
consecutive output channels at the same input position ``(i, kh, kw)``, or input feature for
a Linear layer).

Scores.  For a weight ``W`` of shape ``(O, *rest)`` and block ``b`` the score tensor ``S`` has
shape ``(O // b, *rest)`` and ``S[j, p] = sum_r W[j*b + r, p] ** 2`` - the squared L2 norm of
the group (same order as the norm, without a square root).  It is summed one slice at a time in
a fixed order, so training (any device) and pruning compute bit-identical scores and the
selection stays a pure function of the weights.  The Top-K variant groups ``S`` exactly as it
would group ``W`` (``nchw``: the whole layer; ``chw``: per block of output channels; ``hw``: per
block and input channel), with the same kept counts and tie rule (:mod:`training.topk`); a
kept score keeps all ``b`` weights of its group.  ``random`` has no block form (it is the
unstructured control) and is refused.

Layer block.  A layer whose output count ``O`` is not a multiple of the requested ``B`` uses
``gcd(O, B)``, the largest power of two dividing both (B is a power of two): every block is
whole, the kept count is exact and the storage / kernels never see a ragged last block.  So at
B = 4 LeNet-5's 6-channel conv1 and a 10-class classifier use blocks of 2, a 3-output layer
stays unstructured.  The block each layer used is recorded in run.json.

Sparsity.  A layer keeps ``b`` weights per kept score, so its realised sparsity is
``1 - kept_scores / S.numel()``: the requested sparsity rounded to the block grid (e.g. 0.6933
instead of 0.7 for a 150-weight conv with blocks of 2).  That realised value is what run.json
claims per layer, what pruning produces and what verify measures.

Threshold caching (a layer's ``cache_weight_threshold``) works on the score scale: the
thresholds of a selection made here are squared block norms, and :func:`select_block_cached`
keeps the groups whose score is ``>= t``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from training.topk import Selection, SwatValueError, check_topk, select_bits

__all__ = ["check_block", "layer_block", "block_scores", "expand_rows", "select_block", "select_block_cached",
           "block_topk_weight", "block_sparsity"]


def check_block(block: int) -> int:
    """A valid block size: a positive power of two (1 = unstructured)."""
    ok = isinstance(block, int) and not isinstance(block, bool) and block >= 1 and block & (block - 1) == 0
    if not ok:
        raise SwatValueError(f"block must be a power of two >= 1 (1 = unstructured; e.g. 4), got {block!r}")
    return int(block)


def layer_block(out_channels: int, block: int) -> int:
    """The block a layer with ``out_channels`` outputs uses for a requested ``block`` (module doc)."""
    return math.gcd(int(out_channels), check_block(block)) if out_channels > 0 else 1


def block_scores(w: Tensor, b: int) -> Tensor:
    """``(O // b, *rest)`` squared L2 norms of the b x 1 groups; ``b`` must divide O."""
    w = w.detach()
    o = int(w.shape[0])
    if b < 1 or o % b:
        raise SwatValueError(f"block {b} does not divide the {o} output channels; use a block that does "
                             f"(swatify picks training.blocks.layer_block({o}, B), the gcd)")
    g = w.reshape(o // b, b, *w.shape[1:])
    s = g[:, 0] * g[:, 0]
    for r in range(1, b):  # fixed order, one rounding per add: identical on every backend
        s = s + g[:, r] * g[:, r]
    return s.contiguous()


def expand_rows(score_mask: Tensor, b: int) -> Tensor:
    """A score-level mask repeated over the b output channels of each block (weight-level mask)."""
    return score_mask.repeat_interleave(b, dim=0)


def select_block(w: Tensor, sparsity: float, topk: str, b: int) -> Selection:
    """The weight selection of block Top-K: whole b x 1 groups, chosen by their scores.

    ``thresholds`` of the result are on the score scale, one per ``topk`` group of ``S``
    (what :func:`select_block_cached` takes back between refreshes).
    """
    if check_topk(topk) == "random":
        raise SwatValueError("topk 'random' is the unstructured control and has no block form; "
                             "use block=1 with random, or nchw / chw / hw with blocks")
    sel = select_bits(block_scores(w, b), sparsity, topk)
    return Selection(w.shape, sel.count * b, sel.thresholds, mask=expand_rows(sel.mask, b))


def select_block_cached(w: Tensor, b: int, threshold: Tensor) -> Selection:
    """Block selection on a cached score threshold: groups whose score is ``>= t`` and non-zero.

    ``threshold`` has the shape :func:`select_block` returned (``()`` for nchw, one per block
    row for chw, per block row and input channel for hw), so the kept count drifts between
    refreshes exactly as the element-wise weight cache does.
    """
    scores = block_scores(w, b)
    t = threshold.detach().to(device=scores.device, dtype=scores.dtype)
    keep = (scores >= t.view(t.shape + (1,) * (scores.dim() - t.dim()))) & (scores != 0)
    return Selection(w.shape, int(keep.sum()) * b, threshold, mask=expand_rows(keep, b))


def block_topk_weight(w: Tensor, sparsity: float, topk: str, b: int) -> Tensor:
    """The sparse weight a block SWAT layer computes with - the one pruning reproduces."""
    mask = select_block(w, sparsity, topk, b).mask
    return torch.where(mask, w.detach(), torch.zeros((), dtype=w.dtype, device=w.device))


def block_sparsity(w: Tensor, sparsity: float, topk: str, b: int) -> float:
    """Realised sparsity of :func:`block_topk_weight` (the kept total depends on the shape only)."""
    n = w.numel()
    if n == 0:
        return 0.0
    return 1.0 - select_block(w, sparsity, topk, b).count / n
