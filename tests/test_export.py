"""Exports: compact ONNX weights, metadata, external data, fp16, TorchScript packing, every model.

Run dirs are made programmatically (an untrained swatified model + run.json, as `swat train`
writes them) so no test trains; one torch export per model is written in several forms.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import models
from swat_deploy import artifact as art
from swat_deploy import onnx_compact
from swat_deploy.export import export_torchscript, torch_to_onnx, write_onnx
from swat_deploy.prune import prune
from training import data as datasets
from training.config import TrainConfig
from training.fileio import atomic_write_json, save_tensors, sha256_file
from training.rundir import build_model, load_trained_model, read_run
from training.swatify import layer_table
from training.evaluation import evaluate


def make_run(path: Path, model: str = "lenet5", dataset: str = "digits", sparsity: float = 0.7,
             seed: int = 0, image_size: list[int] | None = None) -> Path:
    """A run dir as `swat train` writes it, for an untrained (randomly initialised) swatified model."""
    path.mkdir(parents=True, exist_ok=True)
    info = datasets.load(dataset, "test").info
    size = image_size or list(info.image_size)
    torch.manual_seed(seed)
    config = TrainConfig(model=model, dataset=dataset, sparsity=sparsity, seed=seed, epochs=1,
                         model_cfg=models.small_input_cfg(model))
    config.validate()
    net = build_model(config, info.num_classes, info.in_channels).eval()
    save_tensors(path / "model.safetensors", {k: v for k, v in net.state_dict().items()})
    meta = {"format_version": 1, "producer": "swat 0.1.0", "model": model, "dataset": dataset,
            "num_classes": info.num_classes, "in_channels": info.in_channels, "image_size": size,
            "mode": "swat", "sparsity": sparsity, "topk": "nchw", "epochs": 1, "seed": seed,
            "test_accuracy": 0.0, "normalization": {"mean": list(info.mean), "std": list(info.std)},
            "class_names": list(info.class_names), "layers": layer_table(net),
            "weights_sha256": sha256_file(path / "model.safetensors"), "config": config.to_json()}
    atomic_write_json(path / "run.json", meta)
    if size == list(info.image_size):
        ds = datasets.load(dataset, "test")
        meta["test_accuracy"] = evaluate(load_trained_model(read_run(path)), ds, ds.info, torch.device("cpu"))["accuracy"]
        atomic_write_json(path / "run.json", meta)
    return path


@pytest.fixture(scope="module")
def lenet(tmp_path_factory) -> dict:
    """lenet5 on digits at 70 %: one torch export, written dense / sparse / fp16, plus TorchScript."""
    root = tmp_path_factory.mktemp("lenet")
    run = make_run(root / "run")
    sm = prune(run)
    base = torch_to_onnx(sm)
    files = {w: write_onnx(base, sm, root / f"{w}.onnx", weights=w) for w in ("dense", "sparse")}
    files["fp16"] = write_onnx(base, sm, root / "fp16.onnx", fp16=True)
    files["ts_sparse"] = export_torchscript(run, root / "sparse.pt", weights="sparse")
    files["ts_dense"] = export_torchscript(run, root / "dense.pt", weights="dense")
    return {"run": run, "sm": sm, "base": base, "root": root, **files}


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})[0]


def _torch_logits(run: Path, x: np.ndarray) -> np.ndarray:
    """The trained model (training's own eval forward, normalisation outside) - the independent reference."""
    model = load_trained_model(read_run(run))
    meta = json.loads((run / "run.json").read_text())
    norm = meta["normalization"]
    mean = torch.tensor(norm["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        return model((torch.from_numpy(x) - mean) / std).numpy()


def test_sparse_onnx_is_small_checked_and_exact(lenet: dict) -> None:
    dense, sparse = lenet["dense"], lenet["sparse"]
    ratio = sparse.stat().st_size / dense.stat().st_size
    assert ratio <= 0.40, ratio
    model = onnx.load(str(sparse))
    onnx.checker.check_model(model, full_check=True)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert model.opset_import[0].version == 18
    x = np.random.default_rng(0).random((7, 1, 8, 8), dtype=np.float32)
    a, b = _ort(sparse, x), _ort(dense, x)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    np.testing.assert_allclose(a, _torch_logits(lenet["run"], x), atol=1e-4, rtol=0)


def test_stored_weights_decode_to_the_pruned_weights(lenet: dict) -> None:
    expected = {k: v.numpy() for k, v in lenet["sm"].weights().items()}
    model = art.load_onnx(lenet["sparse"])
    stored = art.onnx_stored_weights(model)
    assert {s.format for s in stored.values()} == {"bitmask"}
    got = art.onnx_layer_weights(model)
    assert set(got) == set(expected)
    for name, w in expected.items():
        np.testing.assert_array_equal(got[name], w)
        assert got[name].shape == w.shape
    # the generic path (constant folding with onnx.reference) agrees with the direct decoder
    folded = art.onnx_constants(model)
    for name, sw in stored.items():
        np.testing.assert_array_equal(folded[name], sw.value)


def test_our_session_runs_the_compact_file(lenet: dict) -> None:
    from swat_deploy.session import Session

    x = np.random.default_rng(1).random((4, 1, 8, 8), dtype=np.float32)
    out = Session(lenet["sparse"], fallback=False).run(None, {"input": x})[0]
    np.testing.assert_allclose(out, _ort(lenet["dense"], x), atol=1e-4, rtol=0)


def test_metadata_and_hash(lenet: dict) -> None:
    model = art.load_onnx(lenet["sparse"])
    meta = art.onnx_metadata(model)
    run_meta = json.loads((lenet["run"] / "run.json").read_text())
    p = art.META_PREFIX
    assert meta[p + "producer"] == "swat" and meta[p + "model"] == "lenet5" and meta[p + "dataset"] == "digits"
    assert float(meta[p + "sparsity"]) == 0.7 and meta[p + "mode"] == "swat"
    assert float(meta[p + "test_accuracy"]) == run_meta["test_accuracy"]
    assert json.loads(meta[p + "class_names"]) == run_meta["class_names"]
    assert json.loads(meta[p + "normalization"]) == run_meta["normalization"]
    assert [l["sparsity"] for l in json.loads(meta[p + "layers"])] == [0.7] * 5
    assert meta[p + "run_weights_sha256"] == run_meta["weights_sha256"]
    assert meta[p + "weights_sha256"] == art.onnx_weights_sha256(model)
    # any stored byte of the compact stream changes the hash
    values = next(t for t in model.graph.initializer if t.name == onnx_compact.VALUES)
    raw = bytearray(values.raw_data)
    raw[0] ^= 1
    values.raw_data = bytes(raw)
    assert art.onnx_weights_sha256(model) != meta[p + "weights_sha256"]


@pytest.mark.parametrize("sparsity, limit", [(0.7, 0.40), (0.9, 0.20)])
def test_size_follows_sparsity(lenet: dict, tmp_path: Path, sparsity: float, limit: float) -> None:
    """Re-sparsify the exported graph's weights to ``sparsity`` (magnitude Top-K) and compare sizes."""
    from onnx import numpy_helper

    base = onnx.ModelProto()
    base.CopyFrom(lenet["base"])
    for t in base.graph.initializer:
        if t.name in onnx_compact.weight_initializer_names(base):
            w = numpy_helper.to_array(t).copy()
            k = int(round(w.size * sparsity))
            w.reshape(-1)[np.argsort(np.abs(w).reshape(-1), kind="stable")[:k]] = 0
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    d = write_onnx(base, lenet["sm"], tmp_path / "d.onnx", weights="dense")
    s = write_onnx(base, lenet["sm"], tmp_path / "s.onnx", weights="sparse")
    assert s.stat().st_size <= limit * d.stat().st_size, s.stat().st_size / d.stat().st_size
    x = np.random.default_rng(2).random((3, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(_ort(s, x), _ort(d, x), atol=1e-5, rtol=0)


def test_choose_format_picks_the_smallest_file_form() -> None:
    from swat_deploy.formats import ENCODED_NAMES, choose_format

    rng = np.random.default_rng(0)
    dense = rng.standard_normal((64, 64)).astype(np.float32)
    assert choose_format(dense, ENCODED_NAMES) == "dense"
    w = dense.copy()
    w.reshape(-1)[rng.permutation(w.size)[: int(0.7 * w.size)]] = 0
    assert choose_format(w, ENCODED_NAMES) == "bitmask"
    w.reshape(-1)[rng.permutation(w.size)[: int(0.995 * w.size)]] = 0
    assert choose_format(w, ENCODED_NAMES) == "coo"
    tiny = np.zeros((2, 2), np.float32)
    tiny[0, 0] = 1
    assert choose_format(tiny, ENCODED_NAMES) != "bitmask"  # node overhead beats 16 bytes


def test_coo_storage_round_trips(lenet: dict, tmp_path: Path) -> None:
    from onnx import numpy_helper

    base = onnx.ModelProto()
    base.CopyFrom(lenet["base"])
    name = onnx_compact.weight_initializer_names(base)[2]
    t = next(t for t in base.graph.initializer if t.name == name)
    w = numpy_helper.to_array(t).copy()
    w.reshape(-1)[np.argsort(np.abs(w).reshape(-1))[: int(w.size * 0.995)]] = 0
    t.CopyFrom(numpy_helper.from_array(w, name))
    path = write_onnx(base, lenet["sm"], tmp_path / "s.onnx")
    stored = art.onnx_stored_weights(art.load_onnx(path))
    assert stored[name].format == "coo"
    np.testing.assert_array_equal(stored[name].value, w)
    d = write_onnx(base, lenet["sm"], tmp_path / "d.onnx", weights="dense")
    x = np.random.default_rng(3).random((2, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(_ort(path, x), _ort(d, x), atol=1e-5, rtol=0)


def test_fp16_export(lenet: dict) -> None:
    fp16, dense = lenet["fp16"], lenet["dense"]
    model = art.load_onnx(fp16)
    onnx.checker.check_model(model, full_check=True)
    assert art.onnx_metadata(model)["swat.fp16"] == "true"
    assert {s.format for s in art.onnx_stored_weights(model).values()} == {"bitmask-fp16"}
    assert fp16.stat().st_size < lenet["sparse"].stat().st_size
    x = np.random.default_rng(4).random((16, 1, 8, 8), dtype=np.float32)
    a, b = _ort(fp16, x), _ort(dense, x)
    from swat_deploy.verify import LOGIT_TOL_FP16
    assert np.abs(a - b).max() <= LOGIT_TOL_FP16
    assert np.abs(a - b).max() > 0  # really float16 values
    for name, w in art.onnx_layer_weights(model).items():
        assert float((w == 0).mean()) == pytest.approx(0.7, abs=0.005), name


def test_external_data_path(lenet: dict, tmp_path: Path) -> None:
    path = write_onnx(lenet["base"], lenet["sm"], tmp_path / "big.onnx", external_threshold=1000)
    data = tmp_path / "big.onnx.data"
    assert data.is_file() and data.stat().st_size > 10_000 and path.stat().st_size < 20_000
    onnx.checker.check_model(str(path), full_check=True)
    model = art.load_onnx(path)
    assert art.onnx_metadata(model)["swat.weights_sha256"] == art.onnx_weights_sha256(model)
    x = np.random.default_rng(5).random((2, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(_ort(path, x), _ort(lenet["sparse"], x), atol=1e-6, rtol=0)


def test_torchscript_packed_storage(lenet: dict, tmp_path: Path) -> None:
    sparse, dense = lenet["ts_sparse"], lenet["ts_dense"]
    assert sparse.stat().st_size < 0.6 * dense.stat().st_size
    module, meta = art.load_torchscript(sparse)
    stored = art.torchscript_stored_weights(module)
    assert {s.format for s in stored.values()} == {"bitmask"}
    expected = {k: v.numpy() for k, v in lenet["sm"].weights().items()}
    for name, w in art.torchscript_layer_weights(module).items():
        np.testing.assert_array_equal(w, expected[name])
    assert meta["weights_sha256"] == art.torchscript_weights_sha256(module)
    assert meta["model"] == "lenet5" and json.loads(meta["class_names"])
    # loads and runs where nothing of this project is importable; same logits as the dense file
    x = np.random.default_rng(6).random((3, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, torch, numpy as np; x = torch.from_numpy(np.load(sys.argv[2])); "
            "out = [torch.jit.load(p)(x).detach().numpy() for p in sys.argv[1].split(',')]; "
            "bad = [k for k in sys.modules if k.split('.')[0] in ('training', 'models', 'swat_deploy', 'cli')]; "
            "assert not bad, bad; print(float(np.abs(out[0] - out[1]).max()))")
    proc = subprocess.run([sys.executable, "-c", code, f"{sparse},{dense}", str(tmp_path / "x.npy")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip()) <= 1e-5
    np.testing.assert_allclose(module(torch.from_numpy(x)).detach().numpy(), _torch_logits(lenet["run"], x),
                               atol=1e-4, rtol=0)


def test_bad_options_are_one_line_errors(lenet: dict, tmp_path: Path) -> None:
    from swat_deploy.export import export
    from training.errors import SwatError

    with pytest.raises(SwatError, match="`weights`"):
        export(lenet["run"], "onnx", tmp_path / "a.onnx", weights="csr")
    with pytest.raises(SwatError, match="`fp16`"):
        export(lenet["run"], "torchscript", tmp_path / "a.pt", fp16=True)


FAST = {"resnet20"}  # lenet5 is covered by the module fixture; the rest: -m slow


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow)
                                  for n in models.names()])
def test_every_registry_model_exports_and_matches_torch(name: str, tmp_path: Path) -> None:
    """Each model at 32x32 (3 channels, synthetic data set's shape): ONNX in onnxruntime == torch."""
    run = make_run(tmp_path / name, model=name, dataset="synthetic", sparsity=0.7)
    sm = prune(run)
    path = write_onnx(torch_to_onnx(sm), sm, tmp_path / "m.onnx")
    x = np.random.default_rng(7).random((2, 3, 32, 32), dtype=np.float32)
    out = _ort(path, x)
    assert out.shape == (2, 10)
    ref = _torch_logits(run, x)
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(out - ref).max() <= 1e-4 * scale
    weights = art.onnx_layer_weights(art.load_onnx(path))
    layers = {l["name"]: l for l in json.loads((run / "run.json").read_text())["layers"]}
    assert set(weights) == set(layers)
    for lname, w in weights.items():
        assert list(w.shape) == layers[lname]["shape"]
        assert abs(float((w == 0).mean()) - layers[lname]["sparsity"]) <= 0.005, lname
