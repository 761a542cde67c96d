"""`swat verify` cannot be fooled: each tampering fails with the right row named, or one line.

Exit codes: a failed row -> 1; a file that cannot be judged (missing, truncated, another model's
shapes, data set unavailable) -> 2 with one line on stderr.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from swat_deploy import artifact as art
from swat_deploy import onnx_compact
from swat_deploy.export import export_torchscript, torch_to_onnx, write_onnx
from swat_deploy.info import format_info, info
from swat_deploy.prune import prune
from swat_deploy.verify import verify
from conftest import invoke_swat, run_swat
from test_export import make_run

INTEGRITY = "integrity (weights hash vs metadata)"
PROVENANCE = "provenance (run weights hash vs run.json)"
CLAIMS = "metadata claims vs run.json"
LOGIT_ROWS = {"max |logit diff|", "top-1 agreement with trained model", "accuracy vs run.json"}


swat = invoke_swat            # the real command, in process
swat_process = run_swat      # the real command, in its own process


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("verify")
    a = make_run(root / "a", seed=0)
    b = make_run(root / "b", seed=1)  # same architecture, other weights: "another run"
    sm = prune(a)
    base = torch_to_onnx(sm)
    write_onnx(base, sm, a / "model.onnx")
    write_onnx(base, sm, root / "fp16.onnx", fp16=True)
    export_torchscript(a, a / "model.pt")
    smb = prune(b)
    write_onnx(torch_to_onnx(smb), smb, root / "other_run.onnx")
    return {"a": a, "b": b, "root": root}


def failed(report) -> set[str]:
    return {c.check for c in report.checks if not c.passed}


def _resave(model: onnx.ModelProto, path: Path, fix_hash: bool) -> Path:
    if fix_hash:
        for p in model.metadata_props:
            if p.key == "swat.weights_sha256":
                p.value = art.onnx_weights_sha256(model)
    onnx.save(model, str(path))
    return path


def test_clean_exports_pass_every_row(runs: dict) -> None:
    report = verify(runs["a"], limit=120)
    assert report.passed, [c for c in report.checks if not c.passed]
    names = {c.artifact for c in report.checks}
    assert names == {"onnxruntime", "swat Session", "torchscript", "pruned model"}
    for artifact in ("onnxruntime", "torchscript"):
        rows = {c.check for c in report.checks if c.artifact == artifact}
        assert {INTEGRITY, PROVENANCE, CLAIMS, "sparsity features.0"} | LOGIT_ROWS <= rows
    out = report.to_json()
    assert out["passed"] is True and out["layers"] and out["agreement"] == 1.0


def test_changed_weights_fail_integrity(runs: dict, tmp_path: Path) -> None:
    model = onnx.load(str(runs["a"] / "model.onnx"))
    values = next(t for t in model.graph.initializer if t.name == onnx_compact.VALUES)
    v = numpy_helper.to_array(values).copy()
    v[::7] *= -3.0
    values.CopyFrom(numpy_helper.from_array(v, values.name))
    bad = _resave(model, tmp_path / "w.onnx", fix_hash=False)
    report = verify(runs["a"], bad, limit=120, backend=False)
    assert INTEGRITY in failed(report)
    assert failed(report) & LOGIT_ROWS


def test_zero_made_nonzero_fails_sparsity_even_with_forged_hash(runs: dict, tmp_path: Path) -> None:
    """Flip a mask bit of the first layer and insert a matching value: decodes fine, hash re-forged."""
    model = onnx.load(str(runs["a"] / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    bits = np.unpackbits(numpy_helper.to_array(inits[onnx_compact.BITS]))
    values = numpy_helper.to_array(inits[onnx_compact.VALUES])
    zeros = np.flatnonzero(bits[:150] == 0)          # features.0 is first in the stream (150 weights)
    for pos in zeros[:2]:
        insert_at = int(bits[:pos].sum())
        bits[pos] = 1
        values = np.insert(values, insert_at, np.float32(5.0))
    inits[onnx_compact.BITS].CopyFrom(numpy_helper.from_array(np.packbits(bits), onnx_compact.BITS))
    inits[onnx_compact.VALUES].CopyFrom(numpy_helper.from_array(values, onnx_compact.VALUES))
    bad = _resave(model, tmp_path / "z.onnx", fix_hash=True)
    report = verify(runs["a"], bad, limit=120, backend=False)
    bad_rows = failed(report)
    assert INTEGRITY not in bad_rows
    assert "sparsity features.0" in bad_rows
    assert "max |logit diff|" in bad_rows
    assert not report.passed


def test_edited_metadata_fails_the_claims_or_integrity_row(runs: dict, tmp_path: Path) -> None:
    model = onnx.load(str(runs["a"] / "model.onnx"))
    for p in model.metadata_props:
        if p.key == "swat.sparsity":
            p.value = "0.5"
    report = verify(runs["a"], _resave(model, tmp_path / "m.onnx", False), limit=60, backend=False)
    assert failed(report) == {CLAIMS}
    model = onnx.load(str(runs["a"] / "model.onnx"))
    for p in model.metadata_props:
        if p.key == "swat.weights_sha256":
            p.value = "0" * 64
    report = verify(runs["a"], _resave(model, tmp_path / "h.onnx", False), limit=60, backend=False)
    assert failed(report) == {INTEGRITY}


def test_model_from_another_run_fails_provenance(runs: dict) -> None:
    report = verify(runs["a"], runs["root"] / "other_run.onnx", limit=120, backend=False)
    assert PROVENANCE in failed(report)
    assert INTEGRITY not in failed(report)


def test_tampered_torchscript_fails(runs: dict, tmp_path: Path) -> None:
    import torch

    module, meta = art.load_torchscript(runs["a"] / "model.pt")
    packed = dict(module.named_buffers())["net.features.8.weight_values"]
    with torch.no_grad():
        packed.mul_(-2.0)
    path = tmp_path / "t.pt"
    torch.jit.save(module, str(path), _extra_files={art.TS_META_FILE: json.dumps(meta)})
    report = verify(runs["a"], path, limit=60)
    assert INTEGRITY in failed(report)


def test_cli_truncated_missing_foreign_and_wrong_model_are_one_line(runs: dict, tmp_path: Path) -> None:
    data = (runs["a"] / "model.onnx").read_bytes()
    cases = {}
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 2])
    cases["trunc.onnx"] = "re-export"
    (tmp_path / "text.onnx").write_text("not a model\n")
    cases["text.onnx"] = "ONNX"
    cases["nope.onnx"] = "not found"
    for name, words in cases.items():
        run = swat_process if name == "trunc.onnx" else swat  # one real process: stderr and exit code
        proc = run("verify", str(runs["a"]), "--model", str(tmp_path / name))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr, (name, proc.stderr)
    # a run dir whose model takes another input shape: the file belongs elsewhere
    other = tmp_path / "wrong"
    shutil.copytree(runs["a"], other)
    meta = json.loads((other / "run.json").read_text())
    meta["image_size"] = [16, 16]
    (other / "run.json").write_text(json.dumps(meta))
    proc = swat("verify", str(other), "--model", str(runs["a"] / "model.onnx"))
    assert proc.returncode == 2 and "run dir it was exported from" in proc.stderr, proc.stderr


def test_dataset_unavailable_is_one_line(runs: dict, tmp_path: Path) -> None:
    other = tmp_path / "fm"
    shutil.copytree(runs["a"], other)
    meta = json.loads((other / "run.json").read_text())
    meta["dataset"] = "mnist"
    (other / "run.json").write_text(json.dumps(meta))
    empty = tmp_path / "empty"
    empty.mkdir()
    from training.errors import BAD_INPUT, SwatError

    with pytest.raises(SwatError, match="unavailable.*`data_dir`") as e:
        verify(other, data_dir=str(empty))
    assert e.value.kind == BAD_INPUT and "\n" not in str(e.value)


def test_cli_json_contract_and_limit(runs: dict) -> None:
    proc = swat("verify", str(runs["a"]), "--json", "--limit", "50")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    for key in ("passed", "train_accuracy", "exported_accuracy", "agreement", "max_abs_diff", "layers"):
        assert key in report
    assert report["samples"] == 50 and report["passed"] is True


def test_info_reports_storage_and_metadata(runs: dict) -> None:
    items = info(runs["a"])
    kinds = [i.kind for i in items]
    assert kinds == ["run", "onnx", "torchscript"]
    onnx_info = items[1]
    assert {l.format for l in onnx_info.layers} == {"bitmask"}
    assert all(abs(l.sparsity - 0.7) <= 0.005 for l in onnx_info.layers)
    total = sum(l.stored_bytes for l in onnx_info.layers) / sum(l.dense_bytes for l in onnx_info.layers)
    assert 0.3 < total < 0.36  # 4 bytes per nonzero + 1 bit per entry at 70 %: 1.325 / 4
    assert onnx_info.metadata["model"] == "lenet5"
    text = format_info(items)
    assert "bitmask" in text and "weights_sha256" in text and "features.8" in text
    proc = swat("info", str(runs["a"] / "model.onnx"))
    assert proc.returncode == 0 and "bitmask" in proc.stdout


def test_fp16_export_is_judged_with_the_fp16_logit_threshold(runs: dict) -> None:
    from swat_deploy.verify import LOGIT_TOL, LOGIT_TOL_FP16

    report = verify(runs["a"], runs["root"] / "fp16.onnx", limit=120)
    rows = [c for c in report.checks if c.check == "max |logit diff|"]
    assert rows and all(c.threshold == f"<= {LOGIT_TOL_FP16:g}" and c.passed for c in rows)
    assert report.artifacts[0].max_abs_diff > LOGIT_TOL / 100  # the values really are float16
    # this untrained model's logits are nearly tied, so float16 may flip a prediction: agreement
    # stays judged at >= 0.999 (fp16 is offered "where values tolerate it", and verify says so)
    assert {c.check for c in report.checks if not c.passed} <= {"top-1 agreement with trained model",
                                                                "accuracy vs run.json"}
