"""Any image classification set laid out one folder per class.

``DIR/train/<class>/*.png|jpg`` and ``DIR/test/<class>/...`` (or ``DIR/val/``). Class indices
come from the sorted folder names of the train split, so train and test agree on them even when
a class has no test images. Images are decoded with Pillow, converted to RGB (or grayscale),
resized to ``image_size`` and kept in memory as uint8: this is meant for small sets that a
2-core machine can train on, not ImageNet.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.data.dataset import ImageDataset, apply_limit
from training.data.info import DataInfo
from training.errors import SwatError, option

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# ImageNet statistics: the usual default for photos of unknown origin; the grayscale value is
# the luma-weighted (ITU-R 601) combination of the RGB ones (an approximation for std).
RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.4590,), (0.2256,)

_USAGE = "expected DIR/train/<class>/*.png and DIR/test/<class>/*.png (or DIR/val/)"


def _size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        hw = (int(image_size), int(image_size))
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        hw = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    if min(hw) < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return hw


def _split_dir(root: Path, split: str) -> Path:
    names = ["train"] if split == "train" else ["test", "val"]
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise SwatError(f"image folder {root} has no {' or '.join(n + '/' for n in names)} "
                    f"subfolder; {_USAGE}")


def _classes(train_dir: Path) -> list[str]:
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SwatError(f"{train_dir} has no class subfolders; {_USAGE}")
    return classes


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in EXTENSIONS)


def load_imagefolder(split: str, data_dir: str | Path | None = None,
                     image_size: int | tuple[int, int] = 32, in_channels: int = 3,
                     limit: int | None = None) -> ImageDataset:
    """Images under ``data_dir/<split>/<class>/``; ``in_channels`` 3 = RGB, 1 = grayscale."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise SwatError("the imagefolder data set needs Pillow; install it with "
                        "`pip install pillow`") from exc
    if data_dir is None:
        raise SwatError(f"the imagefolder data set needs {option('data_dir')} DIR; {_USAGE}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {in_channels!r}")
    h, w = _size(image_size)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise SwatError(f"image folder {root} does not exist; {_USAGE}")
    classes = _classes(_split_dir(root, "train"))
    split_dir = _split_dir(root, split)
    present = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [c for c in present if c not in classes]
    if unknown:
        raise SwatError(f"{split_dir} has class folders {', '.join(unknown)} that "
                        f"{root / 'train'} lacks; give both splits the same class folders")

    paths: list[Path] = []
    targets: list[int] = []
    for idx, c in enumerate(classes):
        if (split_dir / c).is_dir():
            files = _files(split_dir / c)
            paths.extend(files)
            targets.extend([idx] * len(files))
    if not paths:
        raise SwatError(f"no images ({', '.join(EXTENSIONS)}) under {split_dir}; {_USAGE}")
    labels = np.asarray(targets, dtype=np.int64)
    # Subsample before decoding: a quick run should not pay for decoding the whole folder.
    keep = np.arange(len(paths))
    if limit is not None:
        keep, labels = apply_limit(keep, labels, limit)

    mode = "RGB" if in_channels == 3 else "L"
    images = np.empty((len(keep), in_channels, h, w), dtype=np.uint8)
    for row, i in enumerate(keep):
        p = paths[int(i)]
        try:
            with Image.open(p) as im:
                im = im.convert(mode)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise SwatError(f"cannot decode image {p}: {exc}; remove or replace the file") from exc
        images[row] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    mean, std = (RGB_MEAN, RGB_STD) if in_channels == 3 else (GRAY_MEAN, GRAY_STD)
    info = DataInfo(name="imagefolder", num_classes=len(classes), in_channels=in_channels,
                    image_size=(h, w), mean=mean, std=std, class_names=tuple(classes))
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), info, split)
