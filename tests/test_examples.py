"""SWAT in your own code: examples/own_loop.py end to end, and the module API it uses.

A model outside the registry (depthwise convs, squeeze-excite) is swatified, exported straight
from the module (ONNX and TorchScript) and judged by ``verify_module`` with no run dir; a module
export equals the run-dir export of the same weights; tampered files and wrong models fail.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import models
import swat_deploy
from swat_deploy import artifact as art
from training import data as datasets
from training import swatify
from training.config import TrainConfig
from training.errors import SwatError
from training.fileio import HASH_SCHEME, atomic_write_json, save_tensors, sha256_tensors
from training.rundir import build_model, load_trained_model, read_run
from training.swatify import layer_table

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "own_loop.py"
NORM = ([0.3], [0.4])


@pytest.fixture(autouse=True)
def _quiet_session(monkeypatch, tmp_path):
    # kernels picked by rule (no timing), nothing written to ~/.cache
    monkeypatch.setenv("SWAT_AUTOTUNE", "0")
    monkeypatch.setenv("SWAT_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))


def _example_module():
    spec = importlib.util.spec_from_file_location("own_loop_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _net(seed: int) -> torch.nn.Module:
    """The example's TinyMobileNet, swatified at 0.7, with BN statistics that are not the defaults."""
    torch.manual_seed(seed)
    model = swatify(_example_module().TinyMobileNet(), sparsity=0.7, mode="swat")
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8))
    return model


def _images(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("own")
    model = _net(0)
    x, _ = _images()
    before = sha256_tensors({k: v.clone() for k, v in model.state_dict().items()})
    path = swat_deploy.export_onnx(model, root / "m.onnx", example_input=x[:2], normalize=NORM,
                                   class_names=[str(i) for i in range(10)])
    return {"model": model, "path": path, "root": root, "before": before}


def _loader(n: int = 64):
    x, y = _images(n)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


# ------------------------------------------------------------------------- the example
def test_own_loop_example_runs(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", SWAT_AUTOTUNE="0", SWAT_AUTOTUNE_CACHE=str(tmp_path / "at.json"),
               PYTHONPATH=str(ROOT))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--epochs", "1", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verify_module: PASSED" in proc.stdout
    assert "onnxruntime vs swat Session" in proc.stdout
    assert (out / "model.onnx").is_file()
    assert re.search(r"same top-1 on (\d+)/\1 images", proc.stdout), proc.stdout


# ----------------------------------------------------------------------- the module API
def test_module_export_verifies_without_run_dir(exported):
    model, path = exported["model"], exported["path"]
    assert model.training, "export must leave the module's mode alone"
    assert sha256_tensors(model.state_dict()) == exported["before"], "export must not modify the module"
    report = swat_deploy.verify_module(model, path, _loader())
    assert report.passed, report.format()
    d = report.to_dict()
    assert d["passed"] and d["agreement"] == 1.0 and d["max_abs_diff"] <= 1e-3 and d["samples"] == 64
    assert {r.artifact for r in report.rows} == {"onnxruntime", "swat Session"}
    names = {l["name"] for l in d["layers"]}
    assert {"blocks.0.depthwise.0", "blocks.0.se.reduce", "blocks.0.se.expand", "classifier"} <= names
    for layer in d["layers"]:
        assert abs(layer["measured_sparsity"] - 0.7) < 0.02
    assert model.training
    meta = {p.key[len(art.META_PREFIX):]: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["source"] == "module" and meta["model"] == "TinyMobileNet"
    assert json.loads(meta["normalization"]) == {"mean": NORM[0], "std": NORM[1]}
    assert meta["run_weights_sha256"] == exported["before"]
    # images without labels: agreement rows, no accuracy rows
    x, _ = _images()
    plain = swat_deploy.verify_module(model, path, [x], backend=False)
    assert plain.passed and plain.module_accuracy is None
    assert not any("accuracy" in r.check for r in plain.rows)


def test_verify_module_fails_on_tampered_file(exported, tmp_path):
    proto = onnx.load(str(exported["path"]))
    init = next(t for t in proto.graph.initializer if t.name == "swat.values")
    values = onnx.numpy_helper.to_array(init).copy()
    values[0] *= 1.5
    init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    bad = tmp_path / "tampered.onnx"
    bad.write_bytes(proto.SerializeToString())
    report = swat_deploy.verify_module(exported["model"], bad, _loader(), backend=False)
    assert not report.passed
    failed = {r.check for r in report.rows if not r.passed}
    assert "integrity (weights hash vs metadata)" in failed
    assert "weights = module's pruned weights (exact)" in failed


def test_verify_module_fails_on_wrong_model(exported):
    other = _net(1)
    report = swat_deploy.verify_module(other, exported["path"], _loader(), backend=False)
    assert not report.passed
    failed = {r.check for r in report.rows if not r.passed}
    assert "provenance (module weights hash)" in failed
    assert "weights = module's pruned weights (exact)" in failed


def test_torchscript_from_module(exported, tmp_path):
    model = exported["model"]
    x, _ = _images()
    path = swat_deploy.export_torchscript(model, tmp_path / "m.pt", example_input=x[:1], normalize=NORM)
    report = swat_deploy.verify_module(model, path, _loader())
    assert report.passed, report.format()
    assert {r.artifact for r in report.rows} == {"torchscript"}
    _, meta = art.load_torchscript(path)
    onnx_meta = {p.key[len(art.META_PREFIX):] for p in onnx.load(str(exported["path"])).metadata_props}
    assert set(meta) == onnx_meta and meta["source"] == "module"


def test_module_export_refuses_bad_calls(exported, tmp_path):
    model, x = exported["model"], _images()[0]
    with pytest.raises(SwatError, match="example_input"):
        swat_deploy.export_onnx(model, tmp_path / "a.onnx")
    with pytest.raises(SwatError, match="already exists"):
        swat_deploy.export_onnx(model, exported["path"], example_input=x[:1])
    with pytest.raises(SwatError, match=r"\(N, C, H, W\)"):
        swat_deploy.export_onnx(model, tmp_path / "a.onnx", example_input=torch.rand(8, 8))
    with pytest.raises(SwatError, match="normalize"):
        swat_deploy.export_onnx(model, tmp_path / "a.onnx", example_input=x[:1], normalize=([0.1, 0.2], [1.0, 1.0]))
    with pytest.raises(SwatError, match="the loader"):
        swat_deploy.verify_module(model, exported["path"], [])
    assert not (tmp_path / "a.onnx").exists()


# --------------------------------------------------- a module export == the run dir export
def _run_dir(path: Path) -> Path:
    """A run dir as `swat train` writes it (untrained lenet5 on digits; no training in tests)."""
    path.mkdir(parents=True)
    info = datasets.load("digits", "test").info
    torch.manual_seed(0)
    config = TrainConfig(model="lenet5", dataset="digits", sparsity=0.7, seed=0, epochs=1,
                         model_cfg=models.small_input_cfg("lenet5"))
    config.validate()
    net = build_model(config, info.num_classes, info.in_channels).eval()
    state = dict(net.state_dict())
    save_tensors(path / "model.safetensors", state)
    atomic_write_json(path / "run.json", {
        "format_version": 1, "producer": "swat 0.1.0", "model": "lenet5", "dataset": "digits",
        "num_classes": info.num_classes, "in_channels": info.in_channels, "image_size": list(info.image_size),
        "mode": "swat", "sparsity": 0.7, "topk": "nchw", "block": 1, "epochs": 1, "seed": 0, "test_accuracy": 0.1,
        "normalization": {"mean": list(info.mean), "std": list(info.std)}, "class_names": list(info.class_names),
        "layers": layer_table(net), "weights_sha256": sha256_tensors(state), "weights_hash": HASH_SCHEME,
        "config": config.to_json()})
    return path


def test_module_export_equals_run_dir_export(tmp_path):
    run = _run_dir(tmp_path / "run")
    meta_run = read_run(run).meta
    model = load_trained_model(read_run(run))
    from_run = swat_deploy.export_onnx(run, tmp_path / "run.onnx")
    from_module = swat_deploy.export_onnx(
        model, tmp_path / "module.onnx", example_input=torch.rand(1, 1, 8, 8), name="lenet5",
        normalize=meta_run["normalization"], class_names=meta_run["class_names"])
    a, b = onnx.load(str(from_run)), onnx.load(str(from_module))
    ta, tb = art.onnx_named_tensors(a), art.onnx_named_tensors(b)
    assert ta.keys() == tb.keys()
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)
    ma = {p.key: p.value for p in a.metadata_props}
    mb = {p.key: p.value for p in b.metadata_props}
    assert ma.keys() == mb.keys()
    differ = {k[len(art.META_PREFIX):] for k in ma if ma[k] != mb[k]}
    # only what a module cannot know (training history, run name) and the provenance label differ
    assert differ <= {"source", "run_name", "run_producer", "dataset", "test_accuracy", "train_accuracy_last_epoch",
                      "epochs", "seed", "trained_with_torch"}, differ
    assert ma["swat.weights_sha256"] == mb["swat.weights_sha256"]
    assert ma["swat.run_weights_sha256"] == mb["swat.run_weights_sha256"] == meta_run["weights_sha256"]
    assert (ma["swat.source"], mb["swat.source"]) == ("run", "module")
    # the run-dir export verifies against the module loaded from that run dir, too
    x = torch.rand(32, 1, 8, 8)
    assert swat_deploy.verify_module(model, from_run, [x], backend=False).passed
    with pytest.raises(SwatError, match="module"):
        swat_deploy.export_onnx(run, tmp_path / "x.onnx", example_input=x[:1])
