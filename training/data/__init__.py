"""Data sets: one ``load(name, split)`` for every supported set, plus augmentation and
normalisation.

Every loader returns an in-memory :class:`ImageDataset` (``images`` uint8 or float32 in [0, 1],
``labels`` int64, ``info``) so the trainer batches by indexing. Models see images in [0, 1];
``normalize`` (inside the exported graph, too) applies the set's mean / std.

Sets: ``digits`` (scikit-learn, no files: the default), ``mnist``, ``fashion-mnist`` (IDX files;
Fashion-MNIST also from Debian's ``dataset-fashion-mnist``), ``cifar10``, ``cifar100`` (binary
version), ``imagefolder`` (one folder per class) and ``synthetic`` (generated).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from training.data.cifar import load_cifar10, load_cifar100
from training.data.dataset import ImageDataset, as_float, stratified_subset
from training.data.digits import load_digits
from training.data.idx import load_fashion_mnist, load_mnist, read_idx
from training.data.imagefolder import load_imagefolder
from training.data.info import DataInfo
from training.data.synthetic import load_synthetic
from training.data.transforms import CROP_FLIP, NO_AUGMENT, crop_flip, normalize
from training.errors import SwatError

__all__ = ["DataInfo", "ImageDataset", "DEFAULT_DATASET", "SPLITS", "names", "load", "options",
           "augment", "normalize", "as_float", "read_idx", "stratified_subset"]

DEFAULT_DATASET = "digits"
SPLITS = ("train", "test")

_LOADERS: dict[str, Callable[..., ImageDataset]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagefolder": load_imagefolder,
    "synthetic": load_synthetic,
}

# Spellings people type; the canonical name is what DataInfo and run.json carry.
_ALIASES = {
    "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar-10": "cifar10", "cifar_10": "cifar10", "cifar-100": "cifar100", "cifar_100": "cifar100",
    "image-folder": "imagefolder", "image_folder": "imagefolder",
}


def names() -> list[str]:
    """Canonical data set names, in a stable order (the default first)."""
    return list(_LOADERS)


def canonical(name: str) -> str:
    """The canonical name for ``name`` (case and common spellings forgiven)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _LOADERS:
        raise SwatError(f"unknown data set {name!r}; choose one of {', '.join(names())}")
    return key


def options(name: str) -> list[str]:
    """The keyword options ``load`` accepts for data set ``name`` (e.g. ``limit``)."""
    params = inspect.signature(_LOADERS[canonical(name)]).parameters
    return [p for p in params if p not in ("split", "data_dir")]


def load(name: str, split: str = "train", data_dir: str | Path | None = None, **opts: Any) -> ImageDataset:
    """Load one split of a data set into memory.

    ``data_dir`` is where file-based sets are looked for (default $SWAT_DATA_DIR, else ./data);
    ``opts`` are per-set options (see :func:`options`), e.g. ``limit=N`` for a deterministic,
    class-balanced subsample. Missing or damaged files raise :class:`SwatError`.
    """
    key = canonical(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    allowed = options(key)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise SwatError(f"data set {key!r} has no option {', '.join(unknown)}; "
                        f"its options are: {', '.join(allowed) or 'none'}")
    return _LOADERS[key](split, data_dir, **opts)


def augment(info_or_name: DataInfo | str, x: Tensor, generator: torch.Generator) -> Tensor:
    """The standard train-time augmentation of that data set, applied to a batch (N, C, H, W).

    CIFAR and image folders: random crop with 4-pixel zero padding + horizontal flip
    (see :func:`training.data.transforms.crop_flip`); digits, MNIST, Fashion-MNIST and synthetic:
    none (``x`` is returned as is and the generator is not advanced). Apply it to [0, 1] images,
    before :func:`normalize`. Deterministic given the generator's state.
    """
    name = info_or_name.name if isinstance(info_or_name, DataInfo) else info_or_name
    key = canonical(name)
    if key in CROP_FLIP:
        return crop_flip(x, generator)
    if key in NO_AUGMENT:
        return x
    raise SwatError(f"no augmentation is defined for data set {key!r}")  # a new set was registered without one
