"""Random but learnable images of any shape: for smoke tests and benchmarks without data files.

Each class has a fixed coarse 4x4 pattern per channel (upsampled to the image size); a sample
is its class pattern plus Gaussian pixel noise, clipped to [0, 1]. A model that learns anything
beats chance quickly, which is what a training smoke test needs to show. NumPy's legacy
RandomState is used because its streams are frozen across NumPy releases, so the same options
give the same data everywhere.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.data.dataset import ImageDataset, apply_limit
from training.data.info import DataInfo

DEFAULT_SIZE = {"train": 512, "test": 128}
PATTERN = 4          # coarse pattern resolution (PATTERN x PATTERN cells)
NOISE_STD = 0.25
# Pixels are 0.5 + U(-0.2, 0.2) pattern + N(0, 0.25) noise, clipped: mean 0.5, std ~0.26.
MEAN_VALUE, STD_VALUE = 0.5, 0.26


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def info(in_channels: int = 3, image_size: int | tuple[int, int] = 32, num_classes: int = 10) -> DataInfo:
    """The DataInfo for given options (no data generated)."""
    c = _positive("in_channels", in_channels)
    k = _positive("num_classes", num_classes)
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2:
            raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
        hw = (_positive("image_size", image_size[0]), _positive("image_size", image_size[1]))
    else:
        s = _positive("image_size", image_size)
        hw = (s, s)
    return DataInfo(name="synthetic", num_classes=k, in_channels=c, image_size=hw,
                    mean=(MEAN_VALUE,) * c, std=(STD_VALUE,) * c,
                    class_names=tuple(f"class{i}" for i in range(k)))


def load_synthetic(split: str, data_dir: str | Path | None = None, in_channels: int = 3,
                   image_size: int | tuple[int, int] = 32, num_classes: int = 10,
                   size: int | None = None, seed: int = 0, limit: int | None = None) -> ImageDataset:
    """``size`` samples (default 512 train / 128 test); ``data_dir`` is ignored."""
    meta = info(in_channels, image_size, num_classes)
    n = DEFAULT_SIZE[split] if size is None else _positive("size", size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    c, k, (h, w) = meta.in_channels, meta.num_classes, meta.image_size

    # Class patterns depend on the seed only, so train and test share them.
    patterns = np.random.RandomState(int(seed)).uniform(-0.2, 0.2, size=(k, c, PATTERN, PATTERN))
    rows = (np.arange(h) * PATTERN) // h
    cols = (np.arange(w) * PATTERN) // w
    full = patterns[:, :, rows][:, :, :, cols]          # (k, c, h, w)

    rng = np.random.RandomState([int(seed), 1 if split == "train" else 2])
    labels = rng.permutation(np.arange(n) % k).astype(np.int64)
    noise = rng.standard_normal(size=(n, c, h, w)) * NOISE_STD
    images = np.clip(0.5 + full[labels] + noise, 0.0, 1.0).astype(np.float32)
    images, labels = apply_limit(images, labels, limit)
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(images)),
                        torch.from_numpy(labels), meta, split)
