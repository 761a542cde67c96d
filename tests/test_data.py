"""Tests for training.data: every loader on files written here in the real on-disk format,
the pinned digits split, augmentation determinism, and the user-facing error messages."""
from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from training import data as D
from training.data import idx as idx_mod
from training.errors import SwatError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# --------------------------------------------------------------------------- DataInfo / registry

def test_names_are_the_documented_ones():
    assert D.names() == ["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic"]
    assert D.DEFAULT_DATASET == "digits"


def test_datainfo_json_round_trip_and_validation():
    info = D.load("digits").info
    d = json.loads(json.dumps(info.to_json()))
    assert d["image_size"] == [8, 8] and d["class_names"][3] == "3"
    back = D.DataInfo.from_json(d)
    assert back == info and isinstance(back.mean, tuple) and isinstance(back.image_size, tuple)
    with pytest.raises(SwatError, match="missing std"):
        D.DataInfo.from_json({k: v for k, v in d.items() if k != "std"})
    with pytest.raises(SwatError, match="invalid"):
        D.DataInfo.from_json({**d, "mean": [0.1, 0.2]})
    with pytest.raises(ValueError):
        D.DataInfo("x", 2, 1, (8, 8), (0.0,), (0.0,), ("a", "b"))  # std must be > 0


def test_unknown_name_bad_split_bad_option():
    with pytest.raises(SwatError) as e:
        D.load("imagenet")
    msg = one_line_error(e)
    assert "imagenet" in msg and all(n in msg for n in D.names())
    with pytest.raises(ValueError, match="split"):
        D.load("digits", "val")
    with pytest.raises(SwatError) as e:
        D.load("digits", limit=10, image_size=3)
    assert "image_size" in one_line_error(e) and "limit" in str(e.value)
    assert D.load("DIGITS", limit=10).info.name == "digits"
    assert D.canonical("CIFAR-10") == "cifar10" and D.canonical("fashion_mnist") == "fashion-mnist"


# --------------------------------------------------------------------------- digits

def test_digits_split_is_pinned():
    from sklearn.datasets import load_digits

    train, test = D.load("digits", "train"), D.load("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    # Pinned forever: changing these moves samples between train and test.
    labels_sha = hashlib.sha256(test.labels.numpy().astype("<i8").tobytes()).hexdigest()
    assert labels_sha == "fa6f26bbe2b0057193d275e30a1c466c8635b089145f8b65ba93831ac3c70681"
    assert torch.bincount(test.labels).tolist() == [36, 37, 35, 37, 36, 36, 36, 36, 35, 36]
    tr_idx, te_idx = D.digits.split_indices(load_digits().target)
    idx_sha = hashlib.sha256(te_idx.astype("<i8").tobytes()).hexdigest()
    assert idx_sha == "6989d26310a497ba7ea30eb4d859658a22dca56931e34f9255e7d101e4c56e3e"
    assert len(np.intersect1d(tr_idx, te_idx)) == 0 and len(np.union1d(tr_idx, te_idx)) == 1797

    # Values are sklearn's pixel / 16 for exactly those indices, as float32 1x8x8.
    ref = load_digits()
    assert test.images.dtype == torch.float32 and test.images.shape == (360, 1, 8, 8)
    np.testing.assert_array_equal(test.images[:, 0].numpy(), (ref.images[te_idx] / 16).astype(np.float32))
    np.testing.assert_array_equal(test.labels.numpy(), ref.target[te_idx])
    np.testing.assert_array_equal(train.labels.numpy(), ref.target[tr_idx])
    # The stated normalisation is the train split's statistics.
    x = train.images.double()
    assert abs(x.mean().item() - train.info.mean[0]) < 5e-4
    assert abs(x.std().item() - train.info.std[0]) < 5e-4


def test_digits_item_batch_and_limit():
    ds = D.load("digits", "train", limit=100)
    assert len(ds) == 100 and torch.bincount(ds.labels).tolist() == [10] * 10
    assert torch.equal(ds.labels, D.load("digits", "train", limit=100).labels)
    x, y = ds[3]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8) and isinstance(y, int)
    bx, by = ds.batch(torch.tensor([3, 5]))
    assert torch.equal(bx[0], x) and by[0].item() == y
    with pytest.raises(ValueError, match="limit"):
        D.load("digits", limit=0)


def test_stratified_subset_balances_and_is_deterministic():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 5)
    idx = D.stratified_subset(labels, 20)
    assert list(idx) == sorted(idx) and len(set(idx)) == 20
    assert np.bincount(labels[idx]).tolist() == [8, 7, 5]
    assert np.array_equal(idx, D.stratified_subset(labels, 20))


# --------------------------------------------------------------------------- MNIST IDX

def write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    """Independent IDX writer: magic 0,0,0x08,ndim then big-endian uint32 dims, then bytes."""
    payload = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload += arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def make_mnist(root: Path, n: dict[str, int], compress: bool, dotted: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        imgs = rng.integers(0, 256, size=(n[split], 28, 28), dtype=np.uint8)
        labs = rng.integers(0, 10, size=n[split], dtype=np.uint8)
        sep = "." if dotted else "-"
        write_idx(root / f"{prefix}-images{sep}idx3-ubyte", imgs, compress)
        write_idx(root / f"{prefix}-labels{sep}idx1-ubyte", labs, compress)
        out[split] = (imgs, labs)
    return out


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("layout", ["", "mnist/raw", "MNIST/raw"])
def test_mnist_idx_formats_and_layouts(tmp_path, compress, layout):
    ref = make_mnist(tmp_path / layout if layout else tmp_path, {"train": 30, "test": 7}, compress)
    for split in ("train", "test"):
        ds = D.load("mnist", split, data_dir=tmp_path)
        imgs, labs = ref[split]
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(labs), 1, 28, 28)
        np.testing.assert_array_equal(ds.images[:, 0].numpy(), imgs)
        np.testing.assert_array_equal(ds.labels.numpy(), labs.astype(np.int64))
        assert ds.info.name == "mnist" and ds.info.mean == (0.1307,)
        x, y = ds[0]
        assert x.dtype == torch.float32 and torch.allclose(x[0] * 255, torch.from_numpy(imgs[0]).float())


def test_mnist_dotted_names_and_limit(tmp_path):
    ref = make_mnist(tmp_path, {"train": 40, "test": 5}, compress=False, dotted=True)
    ds = D.load("mnist", "train", data_dir=tmp_path, limit=12)
    expected = D.stratified_subset(ref["train"][1].astype(np.int64), 12)
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), ref["train"][0][expected])


def test_data_dir_defaults_to_env_var(tmp_path, monkeypatch):
    ref = make_mnist(tmp_path / "mnist", {"train": 3, "test": 2}, compress=True)
    monkeypatch.setenv("SWAT_DATA_DIR", str(tmp_path))
    np.testing.assert_array_equal(D.load("mnist", "test").labels.numpy(), ref["test"][1])


def test_mnist_missing_names_where_and_how(tmp_path):
    with pytest.raises(SwatError) as e:
        D.load("mnist", data_dir=tmp_path)
    msg = one_line_error(e)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte.gz" in msg and "`data_dir`" in msg


def test_idx_damaged_files_are_named(tmp_path):
    make_mnist(tmp_path, {"train": 10, "test": 3}, compress=True)
    img = tmp_path / "train-images-idx3-ubyte.gz"
    good = img.read_bytes()

    img.write_bytes(good[: len(good) // 2])  # truncated gzip stream
    with pytest.raises(SwatError) as e:
        D.load("mnist", data_dir=tmp_path)
    assert str(img) in one_line_error(e)

    raw = bytearray(gzip.decompress(good))
    img.write_bytes(gzip.compress(bytes(raw[:-5])))  # whole gzip, but data shorter than the header says
    with pytest.raises(SwatError, match="truncated") as e:
        D.load("mnist", data_dir=tmp_path)
    assert str(img) in one_line_error(e)

    bad = bytearray(raw)
    bad[0] = 7
    img.write_bytes(gzip.compress(bytes(bad)))
    with pytest.raises(SwatError, match="magic"):
        D.load("mnist", data_dir=tmp_path)

    img.write_bytes(good)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SwatError, match="train-labels-idx1-ubyte.gz"):
        D.load("mnist", data_dir=tmp_path)
    assert len(D.load("mnist", "test", data_dir=tmp_path)) == 3

    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(10, 10, np.uint8), compress=True)
    with pytest.raises(SwatError, match="label 10"):
        D.load("mnist", data_dir=tmp_path)


def test_idx_wrong_image_size_rejected(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 8, 8), np.uint8), compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2, np.uint8), compress=False)
    with pytest.raises(SwatError, match="28, 28"):
        D.load("mnist", data_dir=tmp_path)


# --------------------------------------------------------------------------- Fashion-MNIST

def test_fashion_mnist_missing_message(tmp_path, monkeypatch):
    monkeypatch.setattr(idx_mod, "FASHION_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(SwatError) as e:
        D.load("fashion-mnist", data_dir=tmp_path)
    msg = one_line_error(e)
    assert str(tmp_path) in msg and str(tmp_path / "nowhere") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "train-images-idx3-ubyte.gz" in msg


def test_fashion_mnist_from_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(idx_mod, "FASHION_SYSTEM_DIR", tmp_path / "nowhere")
    ref = make_mnist(tmp_path / "fashion-mnist", {"train": 8, "test": 4}, compress=True)
    ds = D.load("fashion-mnist", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), ref["test"][0])
    assert ds.info.class_names[0] == "T-shirt/top" and ds.info.class_names[9] == "Ankle boot"


@pytest.mark.skipif(not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files(tmp_path):
    test = D.load("fashion-mnist", "test", data_dir=tmp_path)  # empty data_dir: falls back to /usr/share
    assert test.images.shape == (10000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert torch.bincount(test.labels).tolist() == [1000] * 10  # the published class balance
    train = D.load("fashion-mnist", "train", data_dir=tmp_path)
    assert len(train) == 60000 and torch.bincount(train.labels).tolist() == [6000] * 10
    x = train.images.double() / 255
    assert abs(x.mean().item() - train.info.mean[0]) < 5e-4 and abs(x.std().item() - train.info.std[0]) < 5e-4


# --------------------------------------------------------------------------- CIFAR binary

def cifar_record(label_bytes: bytes, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    planes = rng.integers(0, 256, size=(3, 32, 32), dtype=np.uint8)
    # the format: label byte(s), then the red plane, green plane, blue plane, each row-major
    return label_bytes + planes[0].tobytes() + planes[1].tobytes() + planes[2].tobytes(), planes


def make_cifar10(root: Path, per_file: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ref = {"train": ([], []), "test": ([], [])}
    files = [(f"data_batch_{i}.bin", "train") for i in range(1, 6)] + [("test_batch.bin", "test")]
    for name, split in files:
        blob = b""
        for _ in range(per_file):
            label = int(rng.integers(0, 10))
            rec, planes = cifar_record(bytes([label]), rng)
            blob += rec
            ref[split][0].append(planes)
            ref[split][1].append(label)
        (root / name).write_bytes(blob)
    return {k: (np.stack(v[0]), np.array(v[1])) for k, v in ref.items()}


def test_cifar10_binary(tmp_path):
    ref = make_cifar10(tmp_path / "cifar-10-batches-bin", per_file=3)
    for split, n in (("train", 15), ("test", 3)):
        ds = D.load("cifar10", split, data_dir=tmp_path)
        assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.uint8
        np.testing.assert_array_equal(ds.images.numpy(), ref[split][0])  # batch order 1..5 kept
        np.testing.assert_array_equal(ds.labels.numpy(), ref[split][1])
    info = ds.info
    assert info.class_names[0] == "airplane" and info.mean == (0.4914, 0.4822, 0.4465)
    assert info.std == (0.2470, 0.2435, 0.2616)
    names = [f"c{i}" for i in range(10)]
    (tmp_path / "cifar-10-batches-bin" / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    assert D.load("cifar10", "test", data_dir=tmp_path / "cifar-10-batches-bin").info.class_names == tuple(names)


def test_cifar10_damaged_and_missing(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    make_cifar10(d)
    (d / "data_batch_3.bin").write_bytes((d / "data_batch_3.bin").read_bytes()[:-100])
    with pytest.raises(SwatError) as e:
        D.load("cifar10", data_dir=tmp_path)
    assert str(d / "data_batch_3.bin") in one_line_error(e)
    (d / "data_batch_3.bin").unlink()
    with pytest.raises(SwatError) as e:
        D.load("cifar10", data_dir=tmp_path)
    assert str(d / "data_batch_3.bin") in one_line_error(e)
    (d / "batches.meta.txt").write_text("a\nb\n")
    with pytest.raises(SwatError, match="batches.meta.txt"):
        D.load("cifar10", "test", data_dir=tmp_path)


def test_cifar_not_found_mentions_binary_and_python_version(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(SwatError) as e:
        D.load("cifar10", data_dir=tmp_path)
    msg = one_line_error(e)
    assert "cifar-10-binary.tar.gz" in msg and "cifar-10-batches-py" in msg and str(tmp_path) in msg
    with pytest.raises(SwatError) as e:
        D.load("cifar100", "test", data_dir=tmp_path)
    assert "cifar-100-binary.tar.gz" in one_line_error(e)


def test_cifar100_binary_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "cifar100" / "cifar-100-binary"
    d.mkdir(parents=True)
    for name, n in (("train.bin", 4), ("test.bin", 2)):
        blob, planes_all, fine = b"", [], []
        for _ in range(n):
            coarse, f = int(rng.integers(0, 20)), int(rng.integers(0, 100))
            rec, planes = cifar_record(bytes([coarse, f]), rng)
            blob += rec
            planes_all.append(planes)
            fine.append(f)
        (d / name).write_bytes(blob)
        ds = D.load("cifar100", name[:-4], data_dir=tmp_path)
        np.testing.assert_array_equal(ds.labels.numpy(), fine)
        np.testing.assert_array_equal(ds.images.numpy(), np.stack(planes_all))
    assert ds.info.num_classes == 100 and ds.info.class_names[-1] == "worm"
    assert len(set(ds.info.class_names)) == 100


# --------------------------------------------------------------------------- image folder

def write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_folder(root: Path, split: str, counts: dict[str, int], size: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    ref = []
    for cls, n in counts.items():
        for i in range(n):
            arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            write_png(root / split / cls / f"img{i:02d}.png", arr)
            ref.append((cls, arr))
    return ref


def test_imagefolder_exact_pixels_classes_and_val(tmp_path):
    ref = make_folder(tmp_path, "train", {"zebra": 2, "ant": 3})
    make_folder(tmp_path, "val", {"zebra": 1}, seed=1)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    ds = D.load("imagefolder", "train", data_dir=tmp_path, image_size=8)
    assert ds.info.class_names == ("ant", "zebra") and ds.info.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    order = sorted(ref, key=lambda t: t[0])  # ant first; files within a class sorted by name
    for i, (_, arr) in enumerate(order):
        np.testing.assert_array_equal(ds.images[i].numpy(), arr.transpose(2, 0, 1))
    test = D.load("imagefolder", "test", data_dir=tmp_path, image_size=8)
    assert test.labels.tolist() == [1] and test.info == ds.info


def test_imagefolder_resize_gray_limit(tmp_path):
    make_folder(tmp_path, "train", {"a": 6, "b": 6, "c": 6}, size=12)
    ds = D.load("imagefolder", data_dir=tmp_path)
    assert ds.images.shape == (18, 3, 32, 32) and ds.info.image_size == (32, 32)
    g = D.load("imagefolder", data_dir=tmp_path, image_size=(10, 6), in_channels=1, limit=6)
    assert g.images.shape == (6, 1, 10, 6) and g.info.in_channels == 1 and len(g.info.mean) == 1
    assert torch.bincount(g.labels).tolist() == [2, 2, 2]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(SwatError, match="`data_dir`"):
        D.load("imagefolder")
    make_folder(tmp_path, "train", {"a": 1})
    with pytest.raises(SwatError) as e:
        D.load("imagefolder", "test", data_dir=tmp_path)
    assert "test/" in one_line_error(e)
    make_folder(tmp_path, "test", {"b": 1})
    with pytest.raises(SwatError, match="b"):
        D.load("imagefolder", "test", data_dir=tmp_path)
    bad = tmp_path / "train" / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(SwatError) as e:
        D.load("imagefolder", data_dir=tmp_path)
    assert str(bad) in one_line_error(e)


# --------------------------------------------------------------------------- synthetic

def test_synthetic_deterministic_shapes_and_learnable():
    a = D.load("synthetic", "train")
    b = D.load("synthetic", "train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (512, 3, 32, 32) and len(D.load("synthetic", "test")) == 128
    assert 0 <= a.images.min() and a.images.max() <= 1 and a.images.dtype == torch.float32
    assert torch.bincount(a.labels).tolist() == [52] * 2 + [51] * 8
    assert not torch.equal(D.load("synthetic", "train", seed=1).images, a.images)
    s = D.load("synthetic", "test", in_channels=1, image_size=(6, 10), num_classes=3, size=30)
    assert s.images.shape == (30, 1, 6, 10) and s.info.num_classes == 3 and s.info.image_size == (6, 10)
    # learnable: class means of train classify the (different) test samples far above chance
    test = D.load("synthetic", "test")
    assert not torch.equal(test.images[:5], a.images[:5])
    means = torch.stack([a.images[a.labels == c].mean(0) for c in range(10)])
    pred = ((test.images[:, None] - means[None]) ** 2).flatten(2).sum(-1).argmin(1)
    assert (pred == test.labels).float().mean() > 0.9
    with pytest.raises(ValueError):
        D.load("synthetic", num_classes=0)


# --------------------------------------------------------------------------- augment / normalize

def reference_crops(img: torch.Tensor, pad: int = 4) -> list[torch.Tensor]:
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=img.dtype)
    padded[:, pad:pad + h, pad:pad + w] = img
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out += [crop, torch.flip(crop, dims=[2])]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_augment_crop_flip_is_a_real_crop_and_deterministic(dtype):
    x = torch.randint(1, 256, (48, 3, 12, 10), generator=torch.Generator().manual_seed(0))
    x = x.to(dtype) if dtype == torch.uint8 else x.float() / 255
    out = D.augment("cifar10", x, torch.Generator().manual_seed(7))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, D.augment("cifar10", x, torch.Generator().manual_seed(7)))
    assert not torch.equal(out, D.augment("cifar10", x, torch.Generator().manual_seed(8)))
    flips = shifted = 0
    for i in range(len(x)):
        cands = reference_crops(x[i])
        hit = [k for k, cnd in enumerate(cands) if torch.equal(cnd, out[i])]
        assert hit, f"sample {i} is not a 4-padded crop (+flip) of its input"
        flips += hit[0] % 2
        shifted += hit[0] // 2 != 4 * 9 + 4
    assert 5 < flips < 43 and shifted > 30  # both branches are exercised


def test_augment_policies_and_generator_use():
    x = torch.rand(4, 1, 8, 8)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    digits_info = D.load("digits", limit=10).info
    for name in ("digits", "mnist", "fashion-mnist", "synthetic"):
        assert D.augment(name, x, g) is x
    assert D.augment(digits_info, x, g) is x and torch.equal(g.get_state(), state)
    # imagefolder and cifar100 use crop + flip; same generator state -> same result
    rgb = torch.rand(6, 3, 8, 8)
    a = D.augment("imagefolder", rgb, torch.Generator().manual_seed(1))
    b = D.augment("cifar100", rgb, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, rgb)
    with pytest.raises(ValueError):
        D.augment("cifar10", rgb[0], g)


def test_normalize():
    info = D.DataInfo("t", 2, 3, (2, 2), (0.1, 0.2, 0.3), (0.5, 0.25, 2.0), ("a", "b"))
    x = torch.rand(5, 3, 2, 2)
    out = D.normalize(x, info)
    for ch in range(3):
        torch.testing.assert_close(out[:, ch], (x[:, ch] - info.mean[ch]) / info.std[ch])
    torch.testing.assert_close(D.normalize(x[0], info), out[0])
    u = torch.randint(0, 256, (2, 3, 2, 2), dtype=torch.uint8)
    torch.testing.assert_close(D.normalize(u, info), D.normalize(u.float() / 255, info))
    with pytest.raises(ValueError):
        D.normalize(torch.rand(2, 1, 2, 2), info)
