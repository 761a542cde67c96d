"""int8 QDQ export (`swat export --int8`), its compact storage, verify's int8 rows, the Session on QDQ.

One short SWAT-70 lenet5 run on digits (3 epochs, ~8 s) is trained for the module, so int8
accuracy is judged on a model that has learnt something; one torch export serves every file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from swat_deploy import artifact as art
from swat_deploy import qdq
from swat_deploy.export import torch_to_onnx, write_onnx
from swat_deploy.prune import prune
from swat_deploy.quantize import calibration_images, quantize_qdq, random_images, write_onnx_int8
from swat_deploy.verify import verify
from training import data as datasets
from training.errors import SwatError

INT8_ZEROS = "int8 zeros"


pytestmark = pytest.mark.usefixtures("isolated_caches")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    from training.config import TrainConfig
    from training.launch import train

    root = tmp_path_factory.mktemp("int8")
    run = root / "run"
    train(TrainConfig(model="lenet5", dataset="digits", mode="swat", sparsity=0.7, epochs=3, seed=0), run,
          log=lambda *a, **k: None, progress=False)
    sm = prune(run)
    base = torch_to_onnx(sm)
    write_onnx(base, sm, run / "model.onnx")
    images = calibration_images(run, 256, 0)
    write_onnx_int8(base, sm, run / "model.int8.onnx", images)
    write_onnx_int8(base, sm, root / "plain.int8.onnx", images, weights="dense")
    return {"run": run, "sm": sm, "root": root, "images": images}


def _ort(path: Path | bytes, exact: bool = False) -> ort.InferenceSession:
    """Stock onnxruntime; ``exact``: with its graph optimisations off, so a QDQ model runs as
    written (Q, DQ, float ops) instead of on fused int8 kernels. On x86 CPUs without VNNI those
    kernels multiply u8 x s8 pairs into saturating int16 sums (onnxruntime's quantization docs),
    which moves results; the exact run is the file's own semantics."""
    src = str(path) if isinstance(path, Path) else path
    so = ort.SessionOptions()
    if exact:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _has_vnni() -> bool:
    from swat_deploy.cpu import cpu_info

    return cpu_info()["int8_dot"] is not None


def _test_split() -> tuple[np.ndarray, np.ndarray]:
    from training.evaluation import iterate_batches

    ds = datasets.load("digits", "test")
    x, y = next(iterate_batches(ds, torch.arange(len(ds)), len(ds)))  # [0, 1] images, as exports take
    return x.numpy(), y.numpy()


def _accuracy(sess: ort.InferenceSession, x: np.ndarray, y: np.ndarray) -> float:
    return float((sess.run(None, {"input": x})[0].argmax(1) == y).mean())


def _optimized_ops(path: Path, tmp: Path) -> list[str]:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp / (path.stem + ".opt.onnx"))
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def test_calibration_images_are_a_seeded_sample_of_the_training_split(trained: dict) -> None:
    x = trained["images"]
    assert x.shape == (256, 1, 8, 8) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(x[:8], calibration_images(trained["run"], 8, 0))  # same seed, same sample
    assert not np.array_equal(x[:8], calibration_images(trained["run"], 8, 1))
    with pytest.raises(SwatError, match="calib"):  # the option is spelled by whoever shows the message
        calibration_images(trained["run"], 0)


def test_int8_export_is_qdq_in_stock_onnxruntime_keeps_zeros_and_accuracy(trained: dict) -> None:
    run = trained["run"]
    model = onnx.load(str(run / "model.int8.onnx"))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops and all(n.domain == "" for n in model.graph.node)
    # int8 symmetric per-channel weights: zero point 0, one scale per output channel
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in qdq.int8_weight_names(model):
        dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == name)
        assert not inits[dq.input[2]].any() and inits[dq.input[2]].dtype == np.int8
        assert inits[dq.input[1]].shape == (inits[dq.input[2]].size,) and inits[dq.input[1]].size > 1
    # every zero of the pruned float32 weights is an int8 zero, and no nonzero became one here
    stored = art.onnx_layer_weights(model)
    floats = {k: v.numpy() for k, v in trained["sm"].weights().items()}
    assert stored.keys() == floats.keys()
    for name, w in stored.items():
        assert w.dtype == np.int8
        np.testing.assert_array_equal(w == 0, floats[name] == 0, err_msg=name)
    # activations are uint8
    q_outs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q_outs and all(inits[n.input[2]].dtype == np.uint8 for n in q_outs)
    # int8 accuracy (the file as written) within 1 pt of the float32 export; stock onnxruntime's
    # fused int8 kernels match that on CPUs with an int8 dot product (VNNI), and lose up to ~2 pt
    # to their int16 saturation on plain AVX2
    x, y = _test_split()
    acc32 = _accuracy(_ort(run / "model.onnx"), x, y)
    acc8 = _accuracy(_ort(run / "model.int8.onnx", exact=True), x, y)
    stock8 = _accuracy(_ort(run / "model.int8.onnx"), x, y)
    assert acc32 > 0.8 and abs(acc8 - acc32) <= 0.01, (acc32, acc8)
    assert abs(stock8 - acc32) <= (0.01 if _has_vnni() else 0.025), (acc32, stock8)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["swat.int8"] == "true" and '"calibration_images": 256' in meta["swat.quantization"]
    assert meta["swat.weights_sha256"] == art.onnx_weights_sha256(model)


def test_compact_int8_is_smaller_and_runs_as_the_same_int8_graph(trained: dict, tmp_path: Path) -> None:
    compact, plain = trained["run"] / "model.int8.onnx", trained["root"] / "plain.int8.onnx"
    assert compact.stat().st_size < 0.8 * plain.stat().st_size
    formats = {sw.format for sw in qdq.decode_int8_weights(onnx.load(str(compact))).values()}
    assert "bitmask-int8" in formats
    # onnxruntime folds the stream, then fuses DQ -> Conv -> Q into QLinearConv as for the plain file:
    # the optimised graphs are the same, so the speed is too (timed in test_compact_int8_is_as_fast)
    ops_c, ops_p = _optimized_ops(compact, tmp_path), _optimized_ops(plain, tmp_path)
    assert ops_c == ops_p and "QLinearConv" in ops_c
    x = random_images((1, 8, 8), 32, 3)
    np.testing.assert_array_equal(_ort(compact).run(None, {"input": x})[0], _ort(plain).run(None, {"input": x})[0])


@pytest.mark.slow  # real timing
def test_compact_int8_is_as_fast_as_plain_qdq(trained: dict) -> None:
    from swat_deploy.ort import ort_session
    from swat_deploy.timing import time_interleaved

    sc = ort_session(trained["run"] / "model.int8.onnx", 1)
    sp = ort_session(trained["root"] / "plain.int8.onnx", 1)
    x = random_images((1, 8, 8), 64, 0)
    t = time_interleaved({"c": lambda: sc.run(None, {"input": x}), "p": lambda: sp.run(None, {"input": x})}, 40)
    assert 0.8 < t["c"][0] / t["p"][0] < 1.25


def test_a_foreign_cnn_quantises_with_random_calibration_and_keeps_its_zeros(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        for m in net:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight[torch.rand_like(m.weight) < 0.8] = 0.0
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(net, (torch.rand(1, 3, 10, 10),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "b"}})
    q = quantize_qdq(path, random_images((3, 10, 10), 16, 0))
    ws = qdq.decode_int8_weights(q)
    assert len(ws) == 3
    # BN is folded into the conv by pre-processing: a per-channel scale, zeros stay zeros
    want = [net[0].weight, net[3].weight, net[7].weight]
    for w8, w in zip(ws.values(), want):
        np.testing.assert_array_equal(w8.value == 0, (w == 0).numpy())
    x = random_images((3, 10, 10), 8, 1)
    got = _ort(q.SerializeToString()).run(None, {"input": x})[0]
    ref = net(torch.from_numpy(x)).detach().numpy()
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()  # int8 rounding, not a different function
    with pytest.raises(SwatError, match="already quantised"):
        quantize_qdq(q, x)


def test_session_hands_qdq_graphs_to_onnxruntime(trained: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from swat_deploy.session import Session

    monkeypatch.setenv("SWAT_INT8", "0")  # the delegation path; our int8 kernels: tests/test_int8_kernels.py

    for src in (trained["run"] / "model.int8.onnx", (trained["root"] / "plain.int8.onnx").read_bytes()):
        sess = Session(src, threads=1, fallback=False)
        assert sess.delegated
        x = random_images((1, 8, 8), 5, 0)
        want = _ort(src).run(None, {"input": x})[0]
        np.testing.assert_array_equal(sess.run(None, {"input": x})[0], want)
        assert [p["engine"] for p in sess.plans()] == ["onnxruntime"]
        with pytest.raises(SwatError, match="unknown output"):
            sess.run(["nope"], {"input": x})
    assert not Session(trained["run"] / "model.onnx", threads=1).delegated  # float32: our kernels


def test_verify_int8_rows_pass(trained: dict) -> None:
    report = verify(trained["run"], limit=200)
    assert report.passed, [c for c in report.checks if not c.passed]
    rows = {c.check for c in report.checks if c.artifact == "onnxruntime int8"}
    assert {"integrity (weights hash vs metadata)", "metadata claims vs run.json",
            "accuracy vs float32 export"} <= rows
    assert sum(r.startswith(INT8_ZEROS) for r in rows) == 5
    int8 = next(a for a in report.artifacts if a.name == "onnxruntime int8")
    assert int8.accuracy_diff_pt is not None and abs(int8.accuracy_diff_pt) <= 1.0
    ours = [c for c in report.checks if c.artifact == "swat Session int8"]
    assert all(c.passed for c in ours), ours  # our int8 kernels agree with onnxruntime's int8


def _tampered(src: Path, dst: Path, edit, fix_hash: bool) -> Path:
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    edit(inits)
    if fix_hash:
        for p in model.metadata_props:
            if p.key == "swat.weights_sha256":
                p.value = art.onnx_weights_sha256(model)
    onnx.save(model, str(dst))
    return dst


def _mark_extra_nonzeros(inits: dict) -> None:
    """More mask bits than stored values: neither our decoder nor onnxruntime's Gather accepts it."""
    bits = numpy_helper.to_array(inits[qdq.BITS]).copy()
    bits[int(np.flatnonzero(bits != 0xFF)[0])] = 0xFF
    inits[qdq.BITS].CopyFrom(numpy_helper.from_array(bits, qdq.BITS))


def _move_one_zero(inits: dict) -> None:
    """Same number of zeros, one in another place: a tolerance on the count would not see it."""
    bits = np.unpackbits(numpy_helper.to_array(inits[qdq.BITS]))
    bits[int(np.flatnonzero(bits == 1)[0])] = 0
    bits[int(np.flatnonzero(bits == 0)[0])] = 1
    inits[qdq.BITS].CopyFrom(numpy_helper.from_array(np.packbits(bits), qdq.BITS))


def _negate_weight_scales(inits: dict) -> None:
    for name, t in inits.items():
        if name.endswith("_scale") and "weight" in name:
            t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), name))  # flips every weight's sign


@pytest.mark.parametrize("edit, fix_hash, expect", [
    (_mark_extra_nonzeros, False, {"integrity (weights hash vs metadata)", "stored weights decode"}),
    (_move_one_zero, False, {"integrity (weights hash vs metadata)", INT8_ZEROS}),
    (_move_one_zero, True, {INT8_ZEROS}),
    (_negate_weight_scales, True, {"accuracy vs float32 export"}),
])
def test_verify_int8_rows_fail_when_tampered(trained: dict, tmp_path: Path, edit, fix_hash, expect) -> None:
    bad = _tampered(trained["run"] / "model.int8.onnx", tmp_path / "model.int8.onnx", edit, fix_hash)
    report = verify(trained["run"], bad, limit=200, backend=False)
    failed = {c.check for c in report.checks if not c.passed}
    failed = {INT8_ZEROS if f.startswith(INT8_ZEROS) else f for f in failed}
    assert not report.passed and expect <= failed, failed
    if fix_hash:
        assert "integrity (weights hash vs metadata)" not in failed


def test_cli_export_int8_options(trained: dict, tmp_path: Path) -> None:
    from test_verify import swat

    out = tmp_path / "m.int8.onnx"
    ok = swat("export", str(trained["run"]), "--int8", "--calib", "32", "--out", str(out))
    assert ok.returncode == 0 and out.is_file() and "wrote" in ok.stdout, ok.stderr
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert '"calibration_images": 32' in meta["swat.quantization"]
    again = swat("export", str(trained["run"]), "--int8", "--out", str(out))
    assert again.returncode == 2 and "--force" in again.stderr
    for args in (["--int8", "--fp16"], ["--int8", "--format", "torchscript"], ["--calib", "8"],
                 ["--int8", "--calib", "0"]):
        r = swat("export", str(trained["run"]), *args, "--out", str(tmp_path / "x.onnx"))
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)


def test_cpu_info_names_the_model_and_isa() -> None:
    from swat_deploy.cpu import cpu_info, describe

    info = cpu_info()
    assert {"model", "isa", "int8_dot", "flags", "cores", "machine"} <= info.keys()
    assert info["model"] and info["model"] in describe(info)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if " avx512f" in flags:
        assert "avx512f" in info["flags"] and info["isa"] in ("avx512f", "avx512_vnni")
    if " avx512_vnni" in flags:
        assert info["int8_dot"] in ("amx_int8", "avx512_vnni")


def test_onnxruntime_quantization_leaves_sys_path_alone() -> None:
    """onnxruntime's import appends its transformers folder (with a package named ``models``)
    to sys.path; spawned processes then imported that instead of this project's models."""
    import sys

    from swat_deploy.quantize import _ort_quantization

    before = list(sys.path)
    _ort_quantization()
    assert sys.path == before
