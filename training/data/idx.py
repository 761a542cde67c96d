"""MNIST and Fashion-MNIST from their IDX files (gzipped or not).

IDX is the format both sets are distributed in: a 4-byte magic (two zero bytes, a type code,
the number of dimensions), big-endian uint32 sizes, then the raw array. We parse it ourselves
(no torchvision) and check every size against the file, so a truncated download is reported
by name instead of surfacing as a reshape error deep in training.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from training.data import locate
from training.data.dataset import ImageDataset, apply_limit
from training.data.info import DataInfo
from training.errors import SwatError, option

_UBYTE = 0x08

# Standard values: MNIST as widely published; Fashion-MNIST computed over its 60000 training
# images (0.2860, 0.3530), checked by tests/test_data.py when the files are present.
MNIST_INFO = DataInfo(
    name="mnist", num_classes=10, in_channels=1, image_size=(28, 28),
    mean=(0.1307,), std=(0.3081,), class_names=tuple(str(d) for d in range(10)),
)
FASHION_INFO = DataInfo(
    name="fashion-mnist", num_classes=10, in_channels=1, image_size=(28, 28),
    mean=(0.2860,), std=(0.3530,),
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
)

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist

_PREFIX = {"train": "train", "test": "t10k"}


def file_names(split: str, kind: str) -> list[str]:
    """Accepted names for a split's images/labels file, preferred first.

    The standard name is e.g. ``train-images-idx3-ubyte.gz``; some mirrors use a dot
    (``train-images.idx3-ubyte``), so both spellings are tried, gzipped and raw.
    """
    dims = "idx3" if kind == "images" else "idx1"
    stems = [f"{_PREFIX[split]}-{kind}-{dims}-ubyte", f"{_PREFIX[split]}-{kind}.{dims}-ubyte"]
    return [s + ext for s in stems for ext in (".gz", "")]


def read_idx(path: Path) -> np.ndarray:
    """The uint8 array stored in an IDX file; any damage is a SwatError naming the file."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise SwatError(f"cannot read {path}: {exc}; the file is damaged or truncated, "
                        "download it again") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise SwatError(f"{path} is not an IDX file (bad magic number); download it again")
    if data[2] != _UBYTE:
        raise SwatError(f"{path} holds IDX type 0x{data[2]:02x}, expected unsigned bytes (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise SwatError(f"{path} has a truncated IDX header; download it again")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise SwatError(f"{path} holds {len(data) - header} data bytes, its header {shape} needs "
                        f"{expected}; the file is truncated or damaged, download it again")
    # bytearray: a writable buffer, so torch.from_numpy gets memory it may own and write
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=header).reshape(shape)


def _subdirs(name: str) -> list[str]:
    torchvision = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name]
    return [name, f"{name}/raw", f"{torchvision}/raw"]


def _find_images(info: DataInfo, split: str, data_dir: str | Path | None) -> Path:
    subdirs = _subdirs(info.name)
    bases = locate.roots(data_dir)
    extra = [FASHION_SYSTEM_DIR] if info.name == "fashion-mnist" else []
    for d in locate.candidates(bases, subdirs) + extra:
        found = locate.find_file(d, file_names(split, "images"))
        if found is not None:
            return found
    where = locate.describe(bases, subdirs, extra)
    needed = ", ".join(file_names(s, k)[0] for s in ("train", "test") for k in ("images", "labels"))
    if info.name == "fashion-mnist":
        how = (f"install it with `apt-get install dataset-fashion-mnist` or pass {option('data_dir')} DIR "
               f"holding {needed}")
    else:
        how = f"pass {option('data_dir')} DIR holding {needed} (the standard MNIST files)"
    title = "Fashion-MNIST" if info.name == "fashion-mnist" else "MNIST"
    raise SwatError(f"{title} {split} split not found in {where}; {how}")


def _load(info: DataInfo, split: str, data_dir: str | Path | None, limit: int | None) -> ImageDataset:
    img_path = _find_images(info, split, data_dir)
    d = img_path.parent
    lab_path = locate.find_file(d, file_names(split, "labels"))
    if lab_path is None:
        raise SwatError(f"{img_path} has no labels file beside it; put "
                        f"{file_names(split, 'labels')[0]} in {d}")
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.ndim != 3 or images.shape[1:] != info.image_size:
        raise SwatError(f"{img_path} holds images of shape {images.shape[1:]}, expected "
                        f"{info.image_size}; is it really {info.name}?")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise SwatError(f"{lab_path} holds {labels.shape} labels for {images.shape[0]} images in "
                        f"{img_path}; the files do not belong together")
    if labels.size and int(labels.max()) >= info.num_classes:
        raise SwatError(f"{lab_path} has label {int(labels.max())}, expected 0..{info.num_classes - 1}")
    images, labels = apply_limit(images, labels.astype(np.int64), limit)
    x = torch.from_numpy(np.ascontiguousarray(images[:, None, :, :]))
    return ImageDataset(x, torch.from_numpy(np.ascontiguousarray(labels)), info, split)


def load_mnist(split: str, data_dir: str | Path | None = None, limit: int | None = None) -> ImageDataset:
    """MNIST from IDX files under ``data_dir`` (uint8 storage)."""
    return _load(MNIST_INFO, split, data_dir, limit)


def load_fashion_mnist(split: str, data_dir: str | Path | None = None,
                       limit: int | None = None) -> ImageDataset:
    """Fashion-MNIST from ``data_dir`` or the Debian package's folder (uint8 storage)."""
    return _load(FASHION_INFO, split, data_dir, limit)
