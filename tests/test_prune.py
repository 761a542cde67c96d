"""Pruning to the deployed model, the sparse.safetensors file and `swat prune`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from swat_deploy.prune import load_sparse, prune, save_sparse, storage_plan, to_onnx_model
from training.errors import SwatError

from conftest import run_swat


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny real run: LeNet-5 trained with SWAT at 70 % on 64 digits for one epoch."""
    from training.config import TrainConfig
    from training.launch import train

    out = tmp_path_factory.mktemp("prune") / "run"
    cfg = TrainConfig(model="lenet5", dataset="digits", mode="swat", sparsity=0.7, epochs=1, limit=64, seed=0)
    train(cfg, out, log=lambda *a, **k: None, progress=False)
    return out


pytestmark = pytest.mark.usefixtures("isolated_caches")


def _images(n: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_prune_keeps_predictions_and_sparsity(run_dir: Path) -> None:
    from training.rundir import load_trained_model

    sm = prune(run_dir)
    x = _images(64)
    trained = load_trained_model(run_dir)
    mean = torch.tensor(sm.run.meta["normalization"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(sm.run.meta["normalization"]["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        ref = trained((x - mean) / std)
        got = sm.module(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert sm.layers and all(abs(l.measured_sparsity - l.expected_sparsity) < 0.01 for l in sm.layers)


def test_sparse_file_round_trip_is_lossless(run_dir: Path, tmp_path: Path) -> None:
    sm = prune(run_dir)
    path, rows = save_sparse(sm, tmp_path / "m.safetensors")
    assert [r.name for r in rows] == [l.name for l in sm.layers]
    for r in rows:
        assert r.format in ("csr", "dense") or r.format.startswith("bsr")
        assert r.stored_bytes <= r.dense_bytes
    # 70 % unstructured: CSR (4 B value + 4 B index per non-zero) beats dense for the big layers.
    assert any(r.format == "csr" and r.stored_bytes < 0.7 * r.dense_bytes for r in rows)
    back = load_sparse(path)
    a, b = sm.module.state_dict(), back.module.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        torch.testing.assert_close(back.module(_images()), sm.module(_images()), rtol=0, atol=0)
    assert [l.measured_sparsity for l in back.layers] == [l.measured_sparsity for l in sm.layers]


def test_sparse_file_refuses_overwrite_and_rejects_other_files(run_dir: Path, tmp_path: Path) -> None:
    sm = prune(run_dir)
    path, _ = save_sparse(sm, tmp_path / "m.safetensors")
    with pytest.raises(SwatError, match="`force`"):
        save_sparse(sm, path)
    save_sparse(sm, path, force=True)
    with pytest.raises(SwatError, match="not a swat sparse model"):
        load_sparse(run_dir / "model.safetensors")


def test_session_runs_run_dir_and_sparse_file_like_onnxruntime(run_dir: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from swat_deploy import Session

    sm = prune(run_dir)
    path, _ = save_sparse(sm, tmp_path / "m.safetensors")
    x = _images(3).numpy()
    ref = ort.InferenceSession(to_onnx_model(sm).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    for source in (run_dir, path):
        sess = Session(source, threads=1, fallback=False)
        assert [i.name for i in sess.get_inputs()] == ["input"]
        np.testing.assert_allclose(sess.run(None, {"input": x})[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # two `swat` subprocesses (~5 s)
def test_swat_prune_cli(run_dir: Path) -> None:
    first = run_swat("prune", str(run_dir), "--force")
    assert first.returncode == 0, first.stderr
    assert "format" in first.stdout and "stored B" in first.stdout and "csr" in first.stdout
    assert (run_dir / "sparse.safetensors").is_file()
    again = run_swat("prune", str(run_dir))
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    assert len(storage_plan(prune(run_dir))) == len(first.stdout.splitlines()) - 3  # header, total, wrote
