"""The one in-memory data set type every loader returns.

All supported sets fit in memory on a small machine (CIFAR-10 train is 150 MB as uint8), and
keeping them as two tensors lets the trainer batch by fancy indexing instead of a DataLoader
with worker processes, which matters on 2 CPU cores.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from training.data.info import DataInfo


def as_float(images: Tensor) -> Tensor:
    """Images as float32 in [0, 1]: uint8 storage is divided by 255, float storage is kept.

    Loaders store 8-bit sources (MNIST, CIFAR, image folders) as uint8 to save 4x memory;
    digits and synthetic are stored as float32 already in [0, 1].
    """
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if images.dtype != torch.float32:
        return images.to(torch.float32)
    return images


class ImageDataset(Dataset):
    """Images (N, C, H, W) and int64 labels (N,) in memory, plus the set's ``DataInfo``.

    ``images`` is uint8 (value / 255 is the pixel in [0, 1]) or float32 already in [0, 1];
    use ``as_float`` (or ``batch``) to get float32 either way. ``__getitem__`` returns
    ``(float32 tensor C,H,W in [0, 1], int label)`` for code that wants a plain Dataset.
    """

    def __init__(self, images: Tensor, labels: Tensor, info: DataInfo, split: str) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if images.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"images must be uint8 or float32, got {images.dtype}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match {images.shape[0]} images")
        if tuple(images.shape[1:]) != (info.in_channels, *info.image_size):
            raise ValueError(
                f"images are {tuple(images.shape[1:])}, info says "
                f"{(info.in_channels, *info.image_size)}"
            )
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64).contiguous()
        self.info = info
        self.split = split

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return as_float(self.images[index]), int(self.labels[index])

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Float32 images in [0, 1] and int64 labels for the given indices, in one gather."""
        return as_float(self.images[indices]), self.labels[indices]

    def __repr__(self) -> str:
        return (f"ImageDataset({self.info.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={tuple(self.images.shape[1:])}, dtype={self.images.dtype})")


def stratified_subset(labels: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``limit`` samples with class counts as equal as the data allows.

    Used by the ``limit=`` option: a quick run on the first N samples of an image folder would
    see only class 0, so we interleave classes (round-robin over a seeded shuffle) instead.
    Deterministic for a given (labels, limit, seed).
    """
    n = len(labels)
    if limit >= n:
        return np.arange(n)
    perm = np.random.RandomState(seed).permutation(n)  # legacy stream: frozen across numpy releases
    permuted = labels[perm]
    rank = np.empty(n, dtype=np.int64)
    for c in np.unique(labels):
        where = np.nonzero(permuted == c)[0]
        rank[where] = np.arange(len(where))
    # order by (rank within class, position in the shuffle)
    order = np.lexsort((np.arange(n), rank))
    return np.sort(perm[order[:limit]])


def apply_limit(images: np.ndarray, labels: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Apply the ``limit=`` option; ``None`` keeps everything."""
    if limit is None:
        return images, labels
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    idx = stratified_subset(labels, int(limit))
    return images[idx], labels[idx]
