"""The main job through the real `swat` command: train -> export onnx / torchscript -> verify."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import run_swat

EPOCHS = 4
TRAIN = ["train", "--model", "lenet5", "--dataset", "digits", "--mode", "swat", "--sparsity", "0.7",
         "--seed", "0"]


swat = run_swat  # the real command, in its own process


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("e2e") / "demo"
    swat(*TRAIN, "--epochs", str(EPOCHS), "--out", str(run), check=True)
    swat("export", str(run), "--format", "onnx", check=True)
    swat("export", str(run), "--format", "torchscript", check=True)
    return run


def test_run_dir_contract(run_dir: Path) -> None:
    meta = json.loads((run_dir / "run.json").read_text())
    for key in ("model", "dataset", "num_classes", "in_channels", "mode", "sparsity", "topk", "epochs", "seed",
                "test_accuracy", "layers"):
        assert key in meta, key
    assert (meta["model"], meta["dataset"], meta["mode"], meta["sparsity"], meta["epochs"]) == \
        ("lenet5", "digits", "swat", 0.7, EPOCHS)
    assert 0.0 <= meta["test_accuracy"] <= 1.0 and meta["test_accuracy"] > 0.5
    assert meta["layers"] and all({"name", "shape", "sparsity"} <= set(l) for l in meta["layers"])
    assert all(l["sparsity"] == 0.7 for l in meta["layers"])
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "curves.png").is_file()


def test_onnx_contract(run_dir: Path) -> None:
    model = onnx.load(str(run_dir / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value, "batch axis must be dynamic"
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), "standard ops only"
    meta = json.loads((run_dir / "run.json").read_text())
    from swat_deploy.artifact import onnx_layer_weights
    weights = onnx_layer_weights(model)
    assert set(weights) == {l["name"] for l in meta["layers"]}
    for layer in meta["layers"]:
        w = weights[layer["name"]]
        assert abs(float((w == 0).mean()) - layer["sparsity"]) <= 0.005, layer["name"]


def test_onnx_in_stock_onnxruntime_matches_torchscript(run_dir: Path) -> None:
    import onnxruntime as ort
    import torch

    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    sess = ort.InferenceSession(str(run_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    a = sess.run(["logits"], {"input": x})[0]
    b = torch.jit.load(str(run_dir / "model.pt"))(torch.from_numpy(x)).detach().numpy()
    assert a.shape == (5, 10)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_torchscript_loads_without_this_project(run_dir: Path, tmp_path: Path) -> None:
    code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); y = m(torch.rand(2, 1, 8, 8)); "
            "assert tuple(y.shape) == (2, 10); "
            "bad = [k for k in sys.modules if k.split('.')[0] in ('training', 'models', 'swat_deploy', 'cli')]; "
            "assert not bad, bad; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code, str(run_dir / "model.pt")], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_verify_passes_and_json_contract(run_dir: Path) -> None:
    proc = swat("verify", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    for key in ("passed", "train_accuracy", "exported_accuracy", "agreement", "max_abs_diff", "layers"):
        assert key in report, key
    assert report["passed"] is True
    assert abs(report["exported_accuracy"] - report["train_accuracy"]) <= 0.001
    assert report["agreement"] >= 0.999
    assert all(abs(l["measured_sparsity"] - l["expected_sparsity"]) <= 0.005 for l in report["layers"])
    table = swat("verify", str(run_dir))
    assert table.returncode == 0 and "PASSED" in table.stdout


def _tamper_onnx(src: Path, dst: Path, fix_hash: bool) -> None:
    model = onnx.load(str(src))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(init).copy()
    w.reshape(-1)[np.flatnonzero(w)[: max(1, w.size // 20)]] *= -3.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    if fix_hash:
        from swat_deploy.artifact import onnx_weights_sha256
        for p in model.metadata_props:
            if p.key == "swat.weights_sha256":
                p.value = onnx_weights_sha256(model)
    onnx.save(model, str(dst))


@pytest.mark.slow  # the CLI form of test_verify.py's in-process integrity tests
@pytest.mark.parametrize("fix_hash", [False, True], ids=["hash-stale", "hash-forged"])
def test_verify_fails_on_tampered_weights(run_dir: Path, tmp_path: Path, fix_hash: bool) -> None:
    bad = tmp_path / "tampered.onnx"
    _tamper_onnx(run_dir / "model.onnx", bad, fix_hash)
    proc = swat("verify", str(run_dir), "--model", str(bad), "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    failed = {c["check"] for c in report["checks"] if not c["passed"]}
    if fix_hash:
        assert failed & {"max |logit diff|", "top-1 agreement with trained model", "accuracy vs run.json"}
    else:
        assert "integrity (weights hash vs metadata)" in failed


def test_missing_run_dir_is_one_line_error(tmp_path: Path) -> None:
    for args in (["verify", str(tmp_path / "nope")], ["export", str(tmp_path / "nope")]):
        proc = swat(*args)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "not found" in lines[0] and "Traceback" not in proc.stderr


def test_refuses_to_overwrite_without_force(run_dir: Path) -> None:
    proc = swat(*TRAIN, "--epochs", "1", "--out", str(run_dir))
    assert proc.returncode == 2 and "--force" in proc.stderr
    proc = swat("export", str(run_dir), "--format", "onnx")
    assert proc.returncode == 2 and "--force" in proc.stderr


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    proc = swat(*TRAIN, "--sparsity", "1.5", "--epochs", "1", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "sparsity" in proc.stderr and "Traceback" not in proc.stderr
    proc = swat("export", str(tmp_path), "--format", "tflite")
    assert proc.returncode == 2


@pytest.mark.slow
def test_readme_main_job_reaches_target_accuracy(tmp_path: Path) -> None:
    run = tmp_path / "demo"
    swat(*TRAIN, "--epochs", "15", "--out", str(run), check=True)
    assert json.loads((run / "run.json").read_text())["test_accuracy"] >= 0.95
