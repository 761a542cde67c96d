"""Batch-level train-time augmentation and normalisation.

Augmentation works on whole batches with one gather (no per-image Python loop, which would
dominate a small model's step on 2 cores) and draws all its randomness from the caller's
generator in a fixed order, so a resumed epoch replays bit-identical batches.
"""
from __future__ import annotations

import torch
from torch import Tensor

from training.data.dataset import as_float
from training.data.info import DataInfo

PAD = 4

# Data sets whose standard recipe is random crop (4-pixel zero padding) + horizontal flip.
# Digits and the MNIST family are trained without augmentation (flipping a digit changes it);
# synthetic has none so a smoke test sees the plain data.
CROP_FLIP = frozenset({"cifar10", "cifar100", "imagefolder"})
NO_AUGMENT = frozenset({"digits", "mnist", "fashion-mnist", "synthetic"})


def crop_flip(x: Tensor, generator: torch.Generator, pad: int = PAD) -> Tensor:
    """Random ``pad``-pixel zero-padded crop back to the input size, then flip half the images.

    Works on [0, 1] images (float or uint8), before ``normalize``, so the padding is black as in
    the usual torchvision recipe. Draws, in this order: N row offsets, N column offsets, N flip
    coins (``torch.randint`` / ``torch.rand`` on the generator's device).
    """
    if x.dim() != 4:
        raise ValueError(f"augment expects a batch (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    gdev = generator.device
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev).to(x.device)
    flip = (torch.rand(n, generator=generator, device=gdev) < 0.5).to(x.device)
    if n == 0:
        return x
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = oy[:, None] + ar_h                                        # (N, H)
    cols = torch.where(flip[:, None], ox[:, None] + (w - 1 - ar_w), ox[:, None] + ar_w)  # (N, W)
    bi = torch.arange(n, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(x: Tensor, info: DataInfo) -> Tensor:
    """``(x - mean) / std`` per channel; uint8 input is first scaled to [0, 1].

    Accepts a batch (N, C, H, W) or one image (C, H, W).
    """
    x = as_float(x)
    if x.dim() not in (3, 4) or x.shape[-3] != info.in_channels:
        raise ValueError(f"normalize expects (N, {info.in_channels}, H, W) or ({info.in_channels}, H, W) "
                         f"for {info.name}, got shape {tuple(x.shape)}")
    mean = torch.tensor(info.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std
