"""CIFAR-10 and CIFAR-100, binary version only.

The binary version is fixed-size records (label byte(s) then 3072 pixel bytes, R then G then B
planes, row-major), which we can read and validate with NumPy alone. The python version is a
pickle, and unpickling a downloaded file can run arbitrary code, so it is deliberately not read;
the error message points to the binary download instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.data import locate
from training.data.dataset import ImageDataset, apply_limit
from training.data.info import DataInfo
from training.errors import SwatError, option

_PIXELS = 3 * 32 * 32

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

# Standard published per-channel statistics of the training sets.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class _Spec:
    """What differs between CIFAR-10 and CIFAR-100 on disk."""

    name: str
    title: str
    folder: str
    py_folder: str
    url: str
    files: dict[str, list[str]]
    label_bytes: int
    label_index: int
    names_file: str
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR10 = _Spec(
    "cifar10", "CIFAR-10", "cifar-10-batches-bin", "cifar-10-batches-py",
    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]},
    label_bytes=1, label_index=0, names_file="batches.meta.txt", classes=CIFAR10_CLASSES,
    mean=CIFAR10_MEAN, std=CIFAR10_STD,
)
CIFAR100 = _Spec(
    "cifar100", "CIFAR-100", "cifar-100-binary", "cifar-100-python",
    "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    {"train": ["train.bin"], "test": ["test.bin"]},
    label_bytes=2, label_index=1,  # (coarse, fine): we use the 100 fine labels
    names_file="fine_label_names.txt", classes=CIFAR100_CLASSES,
    mean=CIFAR100_MEAN, std=CIFAR100_STD,
)


def _subdirs(spec: _Spec) -> list[str]:
    return [spec.folder, spec.name, f"{spec.name}/{spec.folder}"]


def _find_dir(spec: _Spec, split: str, data_dir: str | Path | None) -> Path:
    bases = locate.roots(data_dir)
    dirs = locate.candidates(bases, _subdirs(spec))
    first = spec.files[split][0]
    for d in dirs:
        if (d / first).is_file():
            return d
    hint = ""
    for d in dirs:
        if (d / spec.py_folder).is_dir():
            hint = (f" (found the python version in {d / spec.py_folder}, which swat does not read "
                    "because unpickling a downloaded file can run code)")
            break
    archive = spec.url.rsplit("/", 1)[1]
    raise SwatError(
        f"{spec.title} binary version ({first}) not found in "
        f"{locate.describe(bases, _subdirs(spec))}{hint}; download {spec.url}, "
        f"extract it with `tar xzf {archive}` and pass {option('data_dir')} DIR holding {spec.folder}/"
    )


def read_records(path: Path, label_bytes: int, label_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N,3,32,32), labels int64 (N,)) of one binary batch file."""
    record = label_bytes + _PIXELS
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise SwatError(f"cannot read {path}: {exc}; download the data set again") from exc
    if data.size == 0 or data.size % record:
        raise SwatError(f"{path} is {data.size} bytes, not a whole number of {record}-byte "
                        "records; the file is truncated or not this data set, download it again")
    rows = data.reshape(-1, record)
    labels = rows[:, label_index].astype(np.int64)
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32)
    return images, labels


def _class_names(spec: _Spec, d: Path) -> tuple[str, ...]:
    """Names from the set's own names file when present, the built-in list otherwise."""
    p = d / spec.names_file
    if not p.is_file():
        return spec.classes
    try:
        names = tuple(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise SwatError(f"cannot read {p}: {exc}; download the data set again") from exc
    if len(names) != len(spec.classes):
        raise SwatError(f"{p} lists {len(names)} class names, {spec.title} has "
                        f"{len(spec.classes)}; download the data set again")
    return names


def _load(spec: _Spec, split: str, data_dir: str | Path | None, limit: int | None) -> ImageDataset:
    d = _find_dir(spec, split, data_dir)
    parts_x, parts_y = [], []
    for name in spec.files[split]:
        p = d / name
        if not p.is_file():
            raise SwatError(f"{spec.title} file {p} is missing (found {spec.files[split][0]} beside "
                            f"it); extract the whole archive {spec.url.rsplit('/', 1)[1]} again")
        x, y = read_records(p, spec.label_bytes, spec.label_index)
        if int(y.max()) >= len(spec.classes):
            raise SwatError(f"{p} has label {int(y.max())}, {spec.title} has {len(spec.classes)} "
                            "classes; the file is damaged or not this data set")
        parts_x.append(x)
        parts_y.append(y)
    images = np.concatenate(parts_x) if len(parts_x) > 1 else parts_x[0]
    labels = np.concatenate(parts_y) if len(parts_y) > 1 else parts_y[0]
    info = DataInfo(name=spec.name, num_classes=len(spec.classes), in_channels=3,
                    image_size=(32, 32), mean=spec.mean, std=spec.std,
                    class_names=_class_names(spec, d))
    images, labels = apply_limit(images, labels, limit)
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(images)),
                        torch.from_numpy(np.ascontiguousarray(labels)), info, split)


def load_cifar10(split: str, data_dir: str | Path | None = None, limit: int | None = None) -> ImageDataset:
    """CIFAR-10 from ``cifar-10-batches-bin/`` (uint8 storage)."""
    return _load(CIFAR10, split, data_dir, limit)


def load_cifar100(split: str, data_dir: str | Path | None = None, limit: int | None = None) -> ImageDataset:
    """CIFAR-100 (fine labels) from ``cifar-100-binary/`` (uint8 storage)."""
    return _load(CIFAR100, split, data_dir, limit)
