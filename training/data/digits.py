"""scikit-learn's 8x8 handwritten digits: the set that needs no download (the default).

The train/test split is ours, not ``train_test_split``'s: it is stratified 80/20 and decided by
a hash of each sample's index, so no scikit-learn or NumPy release can move a sample between
train and test (accuracies in old run dirs stay comparable). Values are pixel / 16 in [0, 1],
stored as float32 (exact).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from training.data.dataset import ImageDataset, apply_limit
from training.data.info import DataInfo
from training.errors import SwatError

TEST_FRACTION = 0.2
_SALT = b"swat-digits-split-v1:"

# Statistics of pixel/16 over this module's train split (1437 images, all 64 pixels),
# recomputed and checked by tests/test_data.py.
MEAN = (0.3056,)
STD = (0.3764,)

INFO = DataInfo(
    name="digits", num_classes=10, in_channels=1, image_size=(8, 8),
    mean=MEAN, std=STD, class_names=tuple(str(d) for d in range(10)),
)


def split_indices(labels: np.ndarray, test_fraction: float = TEST_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) index arrays, sorted: stratified, test size ceil(fraction * N).

    Class c gets floor(n_test * n_c / N) test samples; the remaining test slots go to the
    classes with the largest remainders (ties: lower class first). Within a class, the samples
    with the smallest BLAKE2b hash of their index are the test ones.
    """
    n = len(labels)
    n_test = math.ceil(test_fraction * n)
    classes, counts = np.unique(labels, return_counts=True)
    # Hamilton apportionment of n_test over classes in exact integer arithmetic (no float ties).
    take = (n_test * counts) // n
    remainder = (n_test * counts) % n
    order = sorted(range(len(classes)), key=lambda i: (-int(remainder[i]), i))
    for i in order[: n_test - int(take.sum())]:
        take[i] += 1

    def key(i: int) -> bytes:
        return hashlib.blake2b(_SALT + str(i).encode(), digest_size=16).digest()

    test: list[int] = []
    for c, k in zip(classes, take):
        members = sorted(np.nonzero(labels == c)[0].tolist(), key=key)
        test.extend(members[:k])
    test_idx = np.sort(np.asarray(test, dtype=np.int64))
    train_mask = np.ones(n, dtype=bool)
    train_mask[test_idx] = False
    return np.nonzero(train_mask)[0], test_idx


def load_digits(split: str, data_dir: object = None, limit: int | None = None) -> ImageDataset:
    """The digits train or test split (``data_dir`` is ignored: the data ship with scikit-learn)."""
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a hard dependency
        raise SwatError("the digits data set needs scikit-learn; install it with "
                        "`pip install scikit-learn`") from exc
    bunch = _sk_load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = split_indices(labels)
    idx = train_idx if split == "train" else test_idx
    images, labels = apply_limit(images[idx], labels[idx], limit)
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(images)),
                        torch.from_numpy(labels), INFO, split)
