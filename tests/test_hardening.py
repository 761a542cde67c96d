"""Issue 18: a hostile or careless user gets a refusal or one line, never a wrong answer.

CLI cases run the real ``swat`` command in a subprocess and check the exit code, that stderr is
one ``error:`` line (no traceback), and that no file of the user's changed. Library cases call
the function the command calls. One small trained run with both exports is shared (copied per
test that changes it).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from swat_deploy import artifact as art
from swat_deploy import onnx_compact
from training.errors import SwatError, UnsafeInputError

SWAT_BIN = Path(sys.executable).with_name("swat")


def swat(*args: str, cwd: Path | None = None, no_write_override: bool = False,
         env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed ``swat`` command. ``no_write_override``: as root, drop the capabilities that
    let root write into a directory whose mode forbids it (so permission tests mean something)."""
    cmd = [str(SWAT_BIN)] if SWAT_BIN.exists() else [sys.executable, "-m", "cli"]
    cmd += list(args)
    if no_write_override and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot make a directory unwritable")
        cmd = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *cmd]
    full_env = dict(os.environ, MPLBACKEND="Agg", SWAT_AUTOTUNE="0", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd)


def one_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(root: Path) -> dict:
    """Every file under ``root``: content hash and mode (symlinks: their target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), stat.S_IMODE(p.stat().st_mode))
    return out


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """lenet5 on digits, 2 epochs of 64 images, exported to ONNX and TorchScript (library calls)."""
    from swat_deploy.export import export_onnx, export_torchscript
    from training.config import TrainConfig
    from training.launch import train

    run = tmp_path_factory.mktemp("hardening") / "run"
    cfg = TrainConfig(model="lenet5", dataset="digits", sparsity=0.7, epochs=2, limit=64, batch_size=16, seed=0)
    train(cfg, run, log=lambda line: None, progress=False)
    export_onnx(run)
    export_torchscript(run)
    return run


@pytest.fixture
def run_copy(base_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst, symlinks=True)
    return dst


# ======================================================================================= security
def _external_model(location: str) -> onnx.ModelProto:
    """y = x + w, with w (4 floats) stored as external data at ``location``."""
    w = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", location
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.fixture
def hostile(tmp_path: Path) -> dict:
    """A model folder whose files point outside it in every way, next to a secret."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(np.array([7, 7, 7, 7], np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "ok.bin").write_bytes(np.ones(4, np.float32).tobytes())
    os.symlink(secret, folder / "link.bin")
    os.link(secret, folder / "hard.bin")
    (folder / "sub").mkdir()
    os.symlink("../ok.bin", folder / "sub" / "inner.bin")  # a link that stays inside is fine
    cases = {"ok": "ok.bin", "inner": "sub/inner.bin", "absolute": str(secret), "dotdot": "../outside/secret.bin",
             "symlink": "link.bin", "hardlink": "hard.bin", "hidden_dotdot": "sub/../../outside/secret.bin"}
    files = {}
    for name, location in cases.items():
        files[name] = folder / f"{name}.onnx"
        onnx.save(_external_model(location), str(files[name]))
    return {"folder": folder, "secret": secret, "files": files, "tmp": tmp_path}


REFUSED = ("absolute", "dotdot", "symlink", "hardlink", "hidden_dotdot")


def test_external_data_is_confined_to_the_model_folder_for_every_source(hostile: dict, monkeypatch) -> None:
    from swat_deploy.info import file_info
    from swat_deploy.ort import ort_session
    from swat_deploy.session import Session

    x = np.zeros(4, np.float32)
    for name in ("ok", "inner"):
        path = hostile["files"][name]
        assert Session(str(path)).run(None, {"x": x})[0].tolist() == [1.0] * 4
        assert ort_session(path).run(None, {"x": x})[0].tolist() == [1.0] * 4
    for name in REFUSED:
        path = hostile["files"][name]
        for load in (lambda p: Session(str(p)), lambda p: Session(Path(p)), art.load_onnx, file_info,
                     lambda p: ort_session(p)):
            with pytest.raises(UnsafeInputError, match="^refused: .*inside the model's folder"):
                load(path)
    # bytes and a ModelProto have no folder: any external data is refused, even one that would
    # resolve against the current directory (the reported attack: location etc/hostname, cwd /)
    monkeypatch.chdir(hostile["tmp"])
    sneaky = _external_model("outside/secret.bin")
    for source in (sneaky, sneaky.SerializeToString(), hostile["files"]["ok"].read_bytes()):
        with pytest.raises(UnsafeInputError, match="no folder to confine it to"):
            Session(source)
    with pytest.raises(UnsafeInputError):
        ort_session(sneaky.SerializeToString())


def test_info_refuses_a_symlink_out_of_the_folder_as_a_refusal(hostile: dict) -> None:
    before = snapshot(hostile["tmp"])
    proc = swat("info", str(hostile["files"]["symlink"]))
    line = one_line(proc, 2, "refused", "link.bin")
    assert "truncated" not in line and "re-export" not in line
    assert snapshot(hostile["tmp"]) == before


def test_minimum_onnx_enforces_confinement_too() -> None:
    text = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    spec = next(line for line in text.splitlines() if line.strip().startswith('"onnx>='))
    version = tuple(int(v) for v in spec.split(">=")[1].split('"')[0].split("."))
    assert version >= (1, 21), spec  # 1.21 fixed symlink / hard link escapes (CVE-2026-27489)


def test_weights_hash_is_of_tensors_not_of_file_bytes(tmp_path: Path, base_run: Path) -> None:
    from safetensors.torch import save

    from training.fileio import HASH_SCHEME, load_tensors, sha256_tensors

    t = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.uint8)}
    # safetensors writes its header from a hash map: key order (so the file's bytes) may differ
    # between processes; the tensors' hash cannot
    one = tmp_path / "one.safetensors"
    one.write_bytes(save(t, metadata={"producer": "swat", "model": "x"}))
    reordered = bytearray(one.read_bytes())
    header = json.loads(reordered[8:8 + int.from_bytes(reordered[:8], "little")])
    text = json.dumps(dict(reversed(list(header.items()))), separators=(",", ":")).encode()
    reordered[8:8 + len(text)] = text  # same length: only the order changed
    two = tmp_path / "two.safetensors"
    two.write_bytes(bytes(reordered))
    assert one.read_bytes() != two.read_bytes()
    assert sha256_tensors(load_tensors(one)[0]) == sha256_tensors(load_tensors(two)[0]) == sha256_tensors(t)
    for changed in ({"a": t["a"].double(), "b": t["b"]}, {"a": t["a"].view(3, 2), "b": t["b"]},
                    {"c": t["a"], "b": t["b"]}, {"a": t["a"] + 1e-6, "b": t["b"]}):
        assert sha256_tensors(changed) != sha256_tensors(t)
    meta = json.loads((base_run / "run.json").read_text())
    assert meta["weights_hash"] == HASH_SCHEME
    assert meta["weights_sha256"] == sha256_tensors(load_tensors(base_run / "model.safetensors")[0])


def _forge_hash(model: onnx.ModelProto) -> None:
    for p in model.metadata_props:
        if p.key == "swat.weights_sha256":
            p.value = art.onnx_weights_sha256(model)


EXACT = "weights = run's pruned weights (exact)"
CLAIMS = "metadata claims vs run.json"


def _failed(report) -> set[str]:
    return {c.check for c in report.checks if not c.passed}


def test_verify_catches_a_tiny_weight_change_with_a_forged_hash(run_copy: Path, tmp_path: Path) -> None:
    from swat_deploy.verify import verify

    model = onnx.load(str(run_copy / "model.onnx"))
    values = next(t for t in model.graph.initializer if t.name == onnx_compact.VALUES)
    v = numpy_helper.to_array(values).copy()
    i = int(np.argmax(np.abs(v)))
    v[i] += np.float32(1e-4)  # moves the logits by far less than the 1e-3 threshold
    values.CopyFrom(numpy_helper.from_array(v, values.name))
    _forge_hash(model)
    path = tmp_path / "forged.onnx"
    onnx.save(model, str(path))
    report = verify(run_copy, path, limit=60, backend=False)
    assert _failed(report) == {EXACT}, _failed(report)
    row = next(c for c in report.checks if c.check == EXACT)
    assert "max diff" in str(row.value)


def test_verify_catches_a_tiny_torchscript_bias_change(run_copy: Path, tmp_path: Path) -> None:
    from swat_deploy.verify import verify

    module, meta = art.load_torchscript(run_copy / "model.pt")
    bias = dict(module.named_parameters())["net.classifier.2.bias"]
    with torch.no_grad():
        bias[0] += 1e-4
    meta["weights_sha256"] = art.torchscript_weights_sha256(module)
    path = tmp_path / "forged.pt"
    torch.jit.save(module, str(path), _extra_files={art.TS_META_FILE: json.dumps(meta)})
    report = verify(run_copy, path, limit=60)
    assert EXACT in _failed(report)
    assert "integrity (weights hash vs metadata)" not in _failed(report)


@pytest.mark.parametrize("key,value", [("class_names", '["a", "b"]'), ("normalization", '{"mean": [0.5], "std": [1]}'),
                                       ("epochs", "99"), ("seed", "7")])
def test_verify_checks_the_deploy_metadata(run_copy: Path, tmp_path: Path, key: str, value: str) -> None:
    from swat_deploy.verify import verify

    model = onnx.load(str(run_copy / "model.onnx"))
    for p in model.metadata_props:
        if p.key == "swat." + key:
            p.value = value
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    report = verify(run_copy, path, limit=30, backend=False)
    assert _failed(report) == {CLAIMS}
    assert key in next(c.value for c in report.checks if c.check == CLAIMS)


def test_info_escapes_control_characters(run_copy: Path, tmp_path: Path) -> None:
    from swat_deploy.info import file_info, format_info

    model = onnx.load(str(run_copy / "model.onnx"))
    for key, value in (("note", "\x1b[2J\x1b]0;pwned\x07 hidden\u202etxt.exe"), ("\x1b[31mkey", "v\x9bx")):
        p = model.metadata_props.add()
        p.key, p.value = key, value
    path = tmp_path / "escapes.onnx"
    onnx.save(model, str(path))
    text = format_info([file_info(path)])
    assert "\\x1b[2J" in text and "\\u202e" in text and "\\x9b" in text
    proc = swat("info", str(path))
    assert proc.returncode == 0, proc.stderr
    assert not any(ord(c) < 0x20 and c != "\n" or 0x7f <= ord(c) < 0xa0 or c == "\u202e" for c in proc.stdout)
    assert "\\x1b]0;pwned\\x07" in proc.stdout


def test_written_files_follow_the_umask(tmp_path: Path, base_run: Path) -> None:
    from training.fileio import atomic_write_bytes, atomic_write_json

    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "new.bin", b"x")
        assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o640
        private = tmp_path / "private.json"
        private.write_text("{}")
        private.chmod(0o600)
        atomic_write_json(private, {"a": 1})  # an existing file keeps the mode its owner gave it
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    want = 0o666 & ~old
    for name in ("run.json", "model.safetensors", "checkpoint.safetensors", "model.onnx", "model.pt", "exports.json"):
        assert stat.S_IMODE((base_run / name).stat().st_mode) == want, name


# ==================================================================================== nothing lost
def test_verify_fails_when_an_export_is_missing_unless_allowed(run_copy: Path) -> None:
    (run_copy / "model.onnx").unlink()
    proc = swat("verify", str(run_copy), "--limit", "40")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "model.onnx" in proc.stdout and "missing" in proc.stdout and "FAILED" in proc.stdout
    assert f"checked: {run_copy / 'model.pt'}" in proc.stdout
    from swat_deploy.verify import format_report, verify  # what `--allow-missing` calls

    report = verify(run_copy, limit=40, allow_missing=True)
    assert report.passed and report.missing == ["model.onnx"]
    assert report.to_json()["checked_files"] == [str(run_copy / "model.pt")]
    assert "not checked (--allow-missing)" in format_report(report)


@pytest.mark.slow  # several `swat` runs in subprocesses (5-8 s)
def test_train_force_leaves_no_stale_artefacts(run_copy: Path) -> None:
    (run_copy / "sparse.safetensors").write_bytes(b"old")
    (run_copy / "notes.txt").write_text("mine")
    proc = swat("train", "--model", "lenet5", "--epochs", "1", "--limit", "32", "--batch-size", "16",
                "--out", str(run_copy), "--force")
    assert proc.returncode == 0, proc.stderr
    for stale in ("model.onnx", "model.pt", "exports.json", "sparse.safetensors"):
        assert not (run_copy / stale).exists(), stale
    assert (run_copy / "notes.txt").read_text() == "mine"  # not ours: left alone
    assert json.loads((run_copy / "run.json").read_text())["epochs"] == 1


def test_resume_refuses_changed_settings_in_one_line_without_touching_the_run(run_copy: Path) -> None:
    before = snapshot(run_copy)
    one_line(swat("train", "--resume", str(run_copy), "--sparsity", "0.9"), 2, "--sparsity 0.9", "differs")
    one_line(swat("train", "--resume", str(run_copy), "--epochs", "1"), 2, "--epochs 1", "already trained")
    one_line(swat("train", "--resume", str(run_copy), "--force"), 2, "--force")
    assert snapshot(run_copy) == before


@pytest.mark.slow  # several `swat` runs in subprocesses (5-8 s)
def test_resume_with_more_epochs_extends_the_run_and_records_it(run_copy: Path) -> None:
    old = json.loads((run_copy / "run.json").read_text())
    proc = swat("train", "--resume", str(run_copy), "--epochs", "3", "--seed", "0")  # --seed: same as the run's
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((run_copy / "run.json").read_text())
    assert meta["epochs"] == 3 and meta["config"]["epochs"] == 3
    assert meta["epoch_changes"] == [{"after_epoch": 2, "from": 2, "to": 3}]
    assert meta["train_seconds"] > old["train_seconds"]
    rows = [json.loads(l) for l in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_resuming_a_finished_run_keeps_its_hash_and_exports_valid(run_copy: Path) -> None:
    from swat_deploy.verify import verify
    from training.launch import resume

    old = json.loads((run_copy / "run.json").read_text())
    resume(run_copy, log=lambda line: None, progress=False)
    meta = json.loads((run_copy / "run.json").read_text())
    assert meta["weights_sha256"] == old["weights_sha256"]
    assert meta["train_seconds"] >= old["train_seconds"]  # not reset to 0
    report = verify(run_copy, run_copy / "model.pt", limit=40)
    assert report.passed, _failed(report)


@pytest.mark.slow  # several `swat` runs in subprocesses (5-8 s)
def test_torn_first_metrics_line_keeps_the_valid_rows_on_resume(run_copy: Path) -> None:
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    (run_copy / "metrics.jsonl").write_text(lines[0][:25] + "\n" + "\n".join(lines[1:]) + "\n")
    proc = swat("train", "--resume", str(run_copy))
    assert proc.returncode == 0, proc.stderr
    assert "line(s) 1" in proc.stdout
    rows = [json.loads(l) for l in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [2]
    assert rows[0] == json.loads(lines[1])


def test_extreme_sparsity_claims_what_the_minimum_kept_count_leaves(tmp_path: Path) -> None:
    from swat_deploy.prune import prune
    from training.config import TrainConfig
    from training.rundir import read_run
    from training.launch import train

    s = 0.999999
    train(TrainConfig(model="lenet5", dataset="digits", sparsity=s, epochs=1, limit=32, batch_size=16),
          tmp_path / "run", log=lambda line: None, progress=False)
    run = read_run(tmp_path / "run")
    claimed = {l["name"]: l["sparsity"] for l in run.layers}
    assert claimed["features.0"] == pytest.approx(1 - 1 / 150)  # at least one weight survives
    assert all(l["train_sparsity"] == s for l in run.layers)
    for layer in prune(run).layers:  # what every export stores (verify checks exports against prune)
        assert layer.measured_sparsity == pytest.approx(claimed[layer.name], abs=1e-12), layer.name


def test_nan_loss_message_says_nothing_was_saved(tmp_path: Path) -> None:
    out = tmp_path / "nan"
    proc = swat("train", "--model", "lenet5", "--epochs", "1", "--limit", "64", "--batch-size", "16",
                "--lr", "1e30", "--out", str(out))
    line = one_line(proc, 1, "loss became", "no checkpoint was written")
    assert "are kept" not in line
    assert not out.exists()  # nothing was written: no empty run dir either


# ============================================================================ one line, no traceback
def test_unknown_model_is_one_line_and_leaves_no_run_dir(tmp_path: Path) -> None:
    out = tmp_path / "new"
    one_line(swat("train", "--model", "nope", "--out", str(out)), 2, "invalid model 'nope'", "lenet5")
    assert not out.exists()


@pytest.mark.parametrize("edit", [
    lambda m: [],
    lambda m: {**m, "config": 5},
    lambda m: {k: v for k, v in m.items() if k != "layers"},
    lambda m: {**m, "layers": [{"name": 1}]},
    lambda m: {**m, "num_classes": "ten"},
    lambda m: {**m, "format_version": "x"},
    lambda m: {**m, "config": {**m["config"], "epochs": "x"}},
    lambda m: {**m, "config": {**m["config"], "model": "nope"}},
    lambda m: {**m, "normalization": {"mean": "x"}},
    lambda m: {**m, "image_size": [8]},
], ids=["list", "config-int", "no-layers", "layer-shape", "num-classes-str", "version-str", "epochs-str",
        "unknown-model", "normalization", "image-size"])
def test_run_json_of_the_wrong_shape_is_one_error(run_copy: Path, edit) -> None:
    from swat_deploy.info import info
    from training.rundir import read_run

    meta = json.loads((run_copy / "run.json").read_text())
    (run_copy / "run.json").write_text(json.dumps(edit(meta)))
    with pytest.raises(SwatError, match="run.json"):
        read_run(run_copy)
    with pytest.raises(SwatError):
        info(run_copy)


def test_run_json_of_the_wrong_shape_cli(run_copy: Path) -> None:
    meta = json.loads((run_copy / "run.json").read_text())
    (run_copy / "run.json").write_text(json.dumps({**meta, "layers": {"a": 1}}))
    before = snapshot(run_copy)
    one_line(swat("export", str(run_copy), "--format", "onnx", "--force"), 2, "run.json", "'layers'")
    assert snapshot(run_copy) == before


def test_truncated_and_empty_onnx_are_one_line(run_copy: Path, tmp_path: Path) -> None:
    from swat_deploy.session import Session

    data = (run_copy / "model.onnx").read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 3])
    (tmp_path / "empty.onnx").write_bytes(b"")
    before = snapshot(tmp_path)
    one_line(swat("bench", str(tmp_path / "trunc.onnx")), 2, "trunc.onnx")
    for bad in ("trunc.onnx", "empty.onnx"):
        with pytest.raises(SwatError):  # at construction, not at the first run()
            Session(str(tmp_path / bad))
    with pytest.raises(SwatError, match="empty"):
        Session(b"")
    assert snapshot(tmp_path) == before


def test_directory_named_like_a_model_is_not_called_missing(run_copy: Path) -> None:
    (run_copy / "dir.onnx").mkdir()
    one_line(swat("verify", str(run_copy), "--model", str(run_copy / "dir.onnx")), 2, "is a directory")


@pytest.mark.slow  # several `swat` runs in subprocesses (5-8 s)
def test_export_and_resume_into_an_unwritable_dir_fail_before_any_work(run_copy: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    import importlib

    export_mod = importlib.import_module("swat_deploy.export")  # the module: swat_deploy.export is the function

    # library: the check comes before pruning (seconds of work on a big model)
    def no_prune(*a, **k):
        raise AssertionError("pruned before checking the output directory")
    monkeypatch.setattr(export_mod, "prune", no_prune)
    blocker = tmp_path / "file.txt"  # a file where the output directory should be
    blocker.write_text("x")
    with pytest.raises(SwatError, match="cannot write to output directory"):
        export_mod.export(run_copy, "onnx", blocker / "model.onnx")
    # CLI, with the run dir read-only (root: capabilities dropped, so the mode bits hold)
    public = tmp_path / "public"
    shutil.copytree(run_copy, public / "run")
    for p in [public, *public.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    (public / "run").chmod(0o555)
    try:
        before = snapshot(public)
        one_line(swat("export", str(public / "run"), "--format", "onnx", "--force", no_write_override=True),
                 2, "cannot write to output directory")
        one_line(swat("train", "--resume", str(public / "run"), no_write_override=True), 2, "cannot write to run dir")
        assert snapshot(public) == before
    finally:
        (public / "run").chmod(0o755)


# ========================================================================= the autotune cache file
def test_bad_autotune_cache_is_ignored_with_one_warning_and_rewritten(tmp_path: Path, monkeypatch,
                                                                      base_run: Path) -> None:
    from swat_deploy import autotune
    from swat_deploy.session import Session

    cache = tmp_path / "autotune.json"
    monkeypatch.setenv("SWAT_AUTOTUNE_CACHE", str(cache))
    monkeypatch.setenv("SWAT_AUTOTUNE", "1")
    monkeypatch.setenv("SWAT_AUTOTUNE_BUDGET_MS", "1")
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    ref = Session(str(base_run / "model.onnx"), fallback=False, kernel="dense").run(None, {"input": x})[0]
    good = {"kernel": "dense", "serial": False, "times_us": {"dense": 1.0}}
    for content in (b"\xff\xfe not utf-8 \x80",
                    json.dumps({"version": autotune.CACHE_VERSION, "machines": {
                        "m": {"a": {"kernel": 5}, "b": {"kernel": "dense", "serial": "yes"}, "c": [], "ok": good},
                        "n": []}}).encode()):
        cache.write_bytes(content)
        autotune._warned.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = Session(str(base_run / "model.onnx"), fallback=False, threads=1).run(None, {"input": x})[0]
            autotune.load_cache()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
        about = [w for w in caught if "autotune cache" in str(w.message)]
        assert len(about) == 1, [str(w.message) for w in caught]
        data = json.loads(cache.read_text(encoding="utf-8"))  # rewritten: valid, bad entries gone
        assert autotune._clean(data)[1] == 0
        if b"machines" in content:
            assert data["machines"]["m"]["ok"] == good


def _writer(path: str, prefix: str, n: int) -> None:
    from swat_deploy import autotune

    for i in range(n):
        autotune._store("machine", f"{prefix}{i}", {"kernel": "dense", "serial": False}, Path(path))


def test_concurrent_cache_writers_keep_every_entry(tmp_path: Path) -> None:
    import multiprocessing as mp

    from swat_deploy import autotune

    path = tmp_path / "cache.json"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), p, 150)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(autotune.load_cache(path)["machines"]["machine"]) == 300


def test_cli_turns_any_error_into_one_escaped_line(capsys, monkeypatch) -> None:
    import typer

    from cli._app import handled

    monkeypatch.delenv("SWAT_TRACEBACK", raising=False)
    cases = ((PermissionError(13, "Permission denied", "/x/y"), 1, "cannot access /x/y (Permission denied)"),
             (KeyError("k"), 1, "internal error (KeyError"),
             (SwatError("bad\x1b[2J\nname"), 2, "bad\\x1b[2J name"))
    for exc, code, needle in cases:
        @handled
        def command(exc: BaseException = exc) -> None:
            raise exc
        with pytest.raises(typer.Exit) as raised:
            command()
        assert raised.value.exit_code == code
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err, err
