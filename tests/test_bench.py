"""`swat_deploy.bench` and `swat bench`: what is timed, how, and what comes back (no speed asserts)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from swat_deploy.bench import bench, magnitude_prune_onnx, time_interleaved
from training.errors import SwatError


pytestmark = pytest.mark.usefixtures("isolated_caches")


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory) -> Path:
    """A small CNN exported elsewhere with torch.onnx.export, 80 % magnitude-pruned."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    path = tmp_path_factory.mktemp("bench") / "cnn.onnx"
    torch.onnx.export(net, (torch.rand(1, 3, 12, 12),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "b"}})
    model = magnitude_prune_onnx(onnx.load(str(path)), 0.8)
    onnx.save(model, str(path))
    return path


def test_time_interleaved_alternates_order_in_turns_and_counts_rounds() -> None:
    calls: list[str] = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    out = time_interleaved(fns, repeats=4, per_turn=2)
    assert {n: r for n, (_, r) in out.items()} == {"a": 4, "b": 4, "c": 4}
    timed = calls[3:]  # after one warm-up call each
    assert len(timed) == 4 * 3 * 2
    assert timed[:6] == ["a", "a", "b", "b", "c", "c"] and timed[6:12] == ["c", "c", "b", "b", "a", "a"]
    assert all(t >= 0 for t, _ in out.values())


def test_time_interleaved_drops_the_first_call_of_each_turn(monkeypatch) -> None:  # noqa: ANN001
    from types import SimpleNamespace

    from swat_deploy import timing

    clock = {"now": 0.0}  # a fake clock: no real timing in the default suite
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    last = {"who": None}

    def engine(name: str) -> None:  # slow right after the other engine ran (cold cache), fast after
        clock["now"] += 0.02 if last["who"] != name else 0.001
        last["who"] = name

    fns = {n: (lambda n=n: engine(n)) for n in ("a", "b")}
    assert all(m == pytest.approx(0.001) for m, _ in time_interleaved(fns, repeats=3, per_turn=3).values())
    assert all(m == pytest.approx(0.02) for m, _ in time_interleaved(fns, repeats=3, per_turn=1).values())


def test_magnitude_prune_hits_the_sparsity_on_weights_only(cnn_onnx: Path) -> None:
    model = onnx.load(str(cnn_onnx))
    pruned = magnitude_prune_onnx(model, 0.9)
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for init in pruned.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim >= 2:
            assert abs(float((w == 0).mean()) - 0.9) < 0.01, init.name
            kept = w != 0  # the largest magnitudes are the ones kept
            assert np.abs(before[init.name][kept]).min() >= np.abs(before[init.name][~kept]).max() - 1e-7
        else:
            np.testing.assert_array_equal(w, before[init.name])  # biases untouched


def test_bench_onnx_file_reports_engines_layers_and_sweep(cnn_onnx: Path, tmp_path: Path) -> None:
    png = tmp_path / "sweep.png"
    report = bench(cnn_onnx, [1, 3], threads=1, repeats=3, layers=True, sweep=True,
                   sweep_sparsities=[0.5, 0.9], sweep_png=png)
    engines = {(r.engine, r.batch) for r in report.results}
    assert engines == {(e, b) for e in ("onnxruntime", "onnxruntime-int8", "swat") for b in (1, 3)}
    for r in report.results:
        assert r.median_ms > 0 and r.throughput == pytest.approx(r.batch / (r.median_ms / 1e3))
        if r.engine == "onnxruntime":
            assert r.vs_onnxruntime == pytest.approx(1.0)
    assert report.sparsity == pytest.approx(0.8, abs=0.01) and report.ideal == pytest.approx(5.0, rel=0.05)
    assert [l.op for l in report.layers] == ["Conv", "Conv", "Gemm"]
    assert [l.input_shape for l in report.layers][:2] == [[3, 3, 12, 12], [3, 16, 12, 12]]  # last run: batch 3
    assert all(l.dense_us > 0 and l.chosen_us > 0 for l in report.layers)
    assert [(p.sparsity, p.batch) for p in report.sweep] == [(0.5, 1), (0.5, 3), (0.9, 1), (0.9, 3)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".sweep.*"))  # no temp file left behind
    assert any("torch" in n for n in report.notes)  # an .onnx file has no torch model to time
    json.dumps(report.to_dict())


@pytest.mark.slow  # trains, exports and sweeps in subprocesses (7 s)
def test_sweep_of_a_run_dir_with_a_compact_export(tmp_path: Path) -> None:
    """The user's model.onnx stores weights as values + bitmask; the sweep re-prunes the plain model."""
    from swat_deploy.export import export
    from training.config import TrainConfig
    from training.launch import train

    run = tmp_path / "run"
    train(TrainConfig(model="lenet5", dataset="digits", sparsity=0.7, epochs=1, limit=64), run,
          log=lambda *a, **k: None, progress=False)
    export(run, "onnx")
    report = bench(run, [2], threads=1, repeats=3, sweep=True, sweep_sparsities=[0.85])
    assert [(p.sparsity, p.batch) for p in report.sweep] == [(0.85, 2)]
    assert report.sweep[0].ideal == pytest.approx(1 / 0.15, rel=0.05)  # pruned further than trained
    assert {r.engine for r in report.results} >= {"torch", "onnxruntime", "swat"}
    assert next(r for r in report.results if r.engine == "swat").plan is not None
    assert "onnxruntime-int8" in {r.engine for r in report.results} and "digits train" in report.int8_source


def test_bench_int8_calibrates_on_random_images_when_the_data_set_is_missing(tmp_path: Path, monkeypatch) -> None:
    from swat_deploy import quantize
    from test_export import make_run

    run = make_run(tmp_path / "run")

    def missing(*a, **k):
        raise quantize.CalibrationDataMissing("cannot calibrate int8: training split of 'digits' unavailable")

    monkeypatch.setattr(quantize, "calibration_images", missing)
    report = bench(run, [1], threads=1, repeats=3, engines=("onnxruntime", "onnxruntime-int8"))
    assert {r.engine for r in report.results} == {"onnxruntime", "onnxruntime-int8"}
    assert "random n=16" in report.int8_source and "data set is not here" in report.int8_source


def test_bench_rejects_bad_arguments(cnn_onnx: Path, tmp_path: Path) -> None:
    with pytest.raises(SwatError, match="`batch_sizes`"):
        bench(cnn_onnx, [0])
    with pytest.raises(SwatError, match="threads"):
        bench(cnn_onnx, [1], threads=0)
    with pytest.raises(SwatError, match="not found"):
        bench(tmp_path / "nope.onnx")


@pytest.mark.slow  # three `swat` subprocesses (~7 s)
def test_swat_bench_cli_json_and_errors(cnn_onnx: Path) -> None:
    env = dict(os.environ, MPLBACKEND="Agg", SWAT_AUTOTUNE="0")
    base = [sys.executable, "-m", "cli", "bench", str(cnn_onnx), "--threads", "1", "--repeats", "3"]
    ok = subprocess.run(base + ["--json"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert {r["engine"] for r in data["results"]} == {"onnxruntime", "onnxruntime-int8", "swat"}
    assert data["threads"] == 1 and data["cpu"]["model"] and data["int8_source"]
    table = subprocess.run(base + ["--layers"], capture_output=True, text=True, env=env)
    assert table.returncode == 0 and "vs ORT" in table.stdout and "kernel" in table.stdout
    assert "onnxruntime-int8" in table.stdout and "vs int8" in table.stdout and "CPU: " in table.stdout
    bad = subprocess.run(base + ["--batch-size", "1,x"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--batch-size" in bad.stderr and "Traceback" not in bad.stderr


def test_lower_quartile_sees_through_bursts() -> None:
    from swat_deploy.timing import lower_quartile

    assert lower_quartile([1.0, 1.0, 1.0, 9.0, 9.0]) == 1.0  # two of five runs hit by a burst
    assert lower_quartile([4.0, 1.0, 3.0, 2.0, 5.0]) == 2.0
    assert lower_quartile([7.0]) == 7.0
    (got, _), = time_interleaved({"e": lambda: None}, repeats=3, per_turn=1, stat=lambda v: -len(v)).values()
    assert got == -3  # the statistic sees every timed call


def test_bench_times_onnxruntime_int8_next_to_float32_and_caches_the_quantised_model(
        cnn_onnx: Path, tmp_path: Path, monkeypatch) -> None:
    from swat_deploy import quantize
    from swat_deploy.cpu import cpu_info

    calls = []
    real = quantize.quantize_qdq
    monkeypatch.setattr(quantize, "quantize_qdq", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = bench(cnn_onnx, [2], threads=1, repeats=3, engines=("onnxruntime", "onnxruntime-int8"))
    rows = {r.engine: r for r in first.results}
    assert set(rows) == {"onnxruntime", "onnxruntime-int8"} and calls == [1]
    assert rows["onnxruntime-int8"].vs_onnxruntime_int8 == pytest.approx(1.0)
    assert rows["onnxruntime"].vs_onnxruntime_int8 == pytest.approx(
        rows["onnxruntime-int8"].median_ms / rows["onnxruntime"].median_ms)
    assert rows["onnxruntime-int8"].vs_onnxruntime == pytest.approx(
        rows["onnxruntime"].median_ms / rows["onnxruntime-int8"].median_ms)
    assert "now cached" in first.int8_source and first.cpu == cpu_info()
    assert len(list((tmp_path / "int8").glob("*.onnx"))) == 1
    second = bench(cnn_onnx, [2], threads=1, repeats=3, engines=("onnxruntime-int8",))
    assert calls == [1] and "cached in" in second.int8_source and "now" not in second.int8_source
    data = json.loads(json.dumps(second.to_dict()))
    assert data["results"][0]["engine"] == "onnxruntime-int8" and data["cpu"]["isa"] == cpu_info()["isa"]


def test_bench_of_a_qdq_file_times_it_as_the_int8_engine(cnn_onnx: Path, tmp_path: Path) -> None:
    from swat_deploy.quantize import quantize_qdq, random_images

    qpath = tmp_path / "cnn.int8.onnx"
    onnx.save(quantize_qdq(cnn_onnx, random_images((3, 12, 12), 8)), str(qpath))
    report = bench(qpath, [1], threads=1, repeats=3)
    assert {r.engine for r in report.results} == {"onnxruntime-int8", "swat"}
    assert all(r.vs_onnxruntime is None and r.vs_onnxruntime_int8 > 0 for r in report.results)
    assert report.int8_source.startswith("the file itself") and report.sparsity == pytest.approx(0.8, abs=0.02)
    assert next(r for r in report.results if r.engine == "swat").plan == "onnxruntime fallback"
