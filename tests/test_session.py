"""swat_deploy.Session against stock onnxruntime on the same ONNX file.

onnxruntime is the independent reference: every test runs both on identical inputs and
compares outputs (1e-4), for torch-exported pruned CNNs (batch 1 and 3 on a dynamic batch
axis) and for hand-built graphs with the ops torch does not emit, including the exporter's
values + packed-bitmask weight expansion that the Session must constant-fold.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from swat_deploy.kernels import get_kernel, kernel_names
from swat_deploy.onnx_ops import Graph, Node, ValueInfo
from swat_deploy.session import Session
from training.errors import SwatError

SPARSITY = 0.8


@pytest.fixture(autouse=True)
def _deterministic_kernels(monkeypatch, tmp_path):
    # No timing-based kernel choice in unit tests, and no writes to ~/.cache.
    monkeypatch.setenv("SWAT_AUTOTUNE", "0")
    monkeypatch.setenv("SWAT_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))


# ------------------------------------------------------------------------------- helpers

def _prune_(model: nn.Module, sparsity: float = SPARSITY) -> nn.Module:
    """Magnitude-prune every conv / linear weight in place to `sparsity` zeros."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                k = int(round(w.numel() * sparsity))
                if k:
                    thresh = w.abs().flatten().kthvalue(k).values
                    w[w.abs() <= thresh] = 0.0
    return model


def _randomise_bn_(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so folding BN is actually tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _export(model: nn.Module, path: Path, shape: tuple[int, ...], dynamo: bool = False) -> Path:
    model.eval()
    x = torch.rand(2, *shape[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["input"],
                              output_names=["logits"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                              verbose=False)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def _ort(model: Path | onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _assert_matches_ort(model: Path | onnx.ModelProto, feeds: list[dict], **session_kw) -> Session:
    session_kw.setdefault("fallback", False)  # compare our kernels, never onnxruntime with itself
    ours, ref = Session(model, **session_kw), _ort(model)
    for feed in feeds:
        got, want = ours.run(None, feed), ref.run(None, feed)
        assert len(got) == len(want)
        for name, a, b in zip([o.name for o in ref.get_outputs()], got, want):
            assert a.shape == b.shape, f"{name}: {a.shape} vs onnxruntime {b.shape}"
            assert a.dtype == b.dtype, f"{name}: {a.dtype} vs onnxruntime {b.dtype}"
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)
    return ours


def _images(shape: tuple[int, ...], batches=(1, 3), seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.random((b, *shape[1:]), dtype=np.float32)} for b in batches]


def _model(nodes, inputs, outputs, inits, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _sparse(rng: np.random.Generator, shape: tuple[int, ...], sparsity: float = SPARSITY) -> np.ndarray:
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < sparsity] = 0.0
    return w


# ------------------------------------------------------------------ torch-exported CNNs

class ResCat(nn.Module):
    """Conv-BN-ReLU-MaxPool stem, a residual block, a concat branch (1x1 + depthwise), a
    grouped conv, AvgPool, Flatten and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(3, stride=2, padding=1))
        self.res = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1))
        self.b1 = nn.Conv2d(16, 8, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(24, 32, 3, stride=2, padding=1, groups=4)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = F.relu(y + self.res(y))
        y = torch.cat([self.b1(y), self.dw(y)[:, :16]], dim=1)
        y = self.pool(F.relu(self.grouped(y)))
        return self.fc(torch.flatten(y, 1))


class ViewSoftmax(nn.Module):
    """Strided conv without bias, ReLU6 (Clip), global average pool, ``x.view(x.size(0), -1)``
    (Shape/Gather/Unsqueeze/Concat/Reshape at run time), two Linear layers and Softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 12, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(12),
                                  nn.ReLU6(), nn.Conv2d(12, 24, 3, padding=1), nn.Sigmoid())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(24, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gap(self.conv(x))
        y = y.view(y.size(0), -1)
        return torch.softmax(self.fc2(F.relu(self.fc1(y))), dim=-1)


RESCAT_SHAPE = (1, 3, 16, 16)
VIEW_SHAPE = (1, 1, 12, 12)


@pytest.fixture(scope="module")
def rescat_onnx(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = _prune_(_randomise_bn_(ResCat())).eval()
    return _export(model, tmp_path_factory.mktemp("rescat") / "rescat.onnx", RESCAT_SHAPE)


@pytest.mark.parametrize("kernel", [None, *kernel_names()])
def test_pruned_cnn_matches_onnxruntime(rescat_onnx: Path, kernel: str | None) -> None:
    sess = _assert_matches_ort(rescat_onnx, _images(RESCAT_SHAPE), kernel=kernel)
    layers = sess.layers()
    assert [entry["op"] for entry in layers] == ["Conv"] * 6 + ["Gemm"]
    for entry, layer in zip(layers, sess._ctx.layers):
        assert entry["sparsity"] == pytest.approx(SPARSITY, abs=0.02)  # BN folding kept the zeros
        assert entry["kernel"] in kernel_names()
        if kernel is not None:  # forced, unless the kernel cannot run this layer
            assert (entry["kernel"] == kernel) == get_kernel(kernel).supports(layer._last.spec)
        assert entry["bytes"] > 0
    if kernel is not None:
        assert any(entry["kernel"] == kernel for entry in layers)
    grouped = next(e for e in layers if e["weight_shape"] == (32, 6, 3, 3))
    assert grouped["op"] == "Conv"


def test_view_softmax_cnn_matches_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(1)
    path = _export(_prune_(_randomise_bn_(ViewSoftmax())), tmp_path / "view.onnx", VIEW_SHAPE)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Shape", "Gather", "Reshape", "Softmax", "GlobalAveragePool", "Clip"} <= ops  # what we meant to test
    _assert_matches_ort(path, _images(VIEW_SHAPE))


def test_dynamo_export_matches_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(2)
    path = _export(_prune_(_randomise_bn_(ResCat())), tmp_path / "dynamo.onnx", RESCAT_SHAPE, dynamo=True)
    sess = _assert_matches_ort(path, _images(RESCAT_SHAPE, seed=1))
    assert sess.get_inputs()[0].shape[1:] == [3, 16, 16]


def test_inputs_outputs_metadata(rescat_onnx: Path) -> None:
    model = onnx.load(str(rescat_onnx))
    helper.set_model_props(model, {"swat.sparsity": "0.8", "swat.model": "rescat"})
    sess = Session(model)
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.type) == ("input", "tensor(float)")
    assert inp.shape == ["batch", 3, 16, 16]  # the dynamic batch axis shows as its name
    (out,) = sess.get_outputs()
    assert (out.name, out.shape, out.type) == ("logits", ["batch", 10], "tensor(float)")
    assert sess.metadata == {"swat.sparsity": "0.8", "swat.model": "rescat"}
    ref = _ort(rescat_onnx)
    assert [i.shape for i in ref.get_inputs()] == [inp.shape]


def test_threads_are_scoped_and_reach_the_kernels(rescat_onnx: Path) -> None:
    before = torch.get_num_threads()
    sess = Session(rescat_onnx, threads=1, fallback=False)
    feed = _images(RESCAT_SHAPE, batches=(2,))[0]
    out = sess.run(["logits"], feed)[0]
    assert torch.get_num_threads() == before
    np.testing.assert_allclose(out, _ort(rescat_onnx).run(None, feed)[0], rtol=1e-4, atol=1e-4)
    assert all(layer._last.threads == 1 for layer in sess._ctx.layers)


def test_bad_feeds_give_one_line_errors(rescat_onnx: Path) -> None:
    sess = Session(rescat_onnx, kernel="dense")
    x = np.zeros((1, 3, 16, 16), np.float32)
    cases = [
        ({"input": x.astype(np.float64)}, "astype(np.float32)"),
        ({"input": x[0]}, "rank 4"),
        ({"input": np.zeros((1, 3, 15, 16), np.float32)}, "dim 2 must be 16"),
        ({}, "missing input 'input'"),
        ({"input": x, "other": x}, "unknown input"),
    ]
    for feed, text in cases:
        with pytest.raises(SwatError) as info:
            sess.run(None, feed)
        assert text in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SwatError, match="unknown output 'nope'"):
        sess.run(["nope"], {"input": x})
    with pytest.raises(SwatError, match="unknown kernel"):
        Session(rescat_onnx, kernel="no-such-kernel")
    with pytest.raises(SwatError, match="not found"):
        Session(rescat_onnx.parent / "missing.onnx")


# -------------------------------------------------------------------- hand-built graphs

def _op_zoo(opset: int) -> tuple[onnx.ModelProto, list[dict]]:
    """Ops and attribute forms torch does not emit: auto_pad, Clip with inputs, Sub/Div,
    ceil_mode, count_include_pad, Pad, Squeeze/Unsqueeze (attrs < 13, inputs >= 13), Gemm
    with transA/alpha/beta, MatMul with a constant weight, Cast, Split, Slice, ReduceMean."""
    rng = np.random.default_rng(opset)
    f = TP.FLOAT
    inits = [
        _init("w_same", _sparse(rng, (8, 3, 3, 3))), _init("b_same", rng.standard_normal(8).astype(np.float32)),
        _init("w_lower", _sparse(rng, (4, 3, 2, 2))),
        _init("w_valid", _sparse(rng, (4, 3, 3, 3))),
        _init("w_pad", _sparse(rng, (6, 3, 3, 3))),
        _init("lo", np.array(-0.5, np.float32)), _init("hi", np.array(1.5, np.float32)),
        _init("shift", np.array(0.25, np.float32)), _init("scale", rng.random((1, 8, 1, 1)).astype(np.float32) + 0.5),
        _init("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)), _init("pad_value", np.array(0.5, np.float32)),
        _init("w_mm", _sparse(rng, (26, 7))),
        _init("w_gemm", _sparse(rng, (26, 5))), _init("c_gemm", rng.standard_normal((1, 5)).astype(np.float32)),
        _init("ten", np.array(10.0, np.float32)), _init("three", np.array(3, np.int64)),
        _init("ax0", np.array([0], np.int64)),
        _init("starts", np.array([1], np.int64)), _init("ends", np.array([100], np.int64)),
        _init("axes_slice", np.array([1], np.int64)), _init("split_sizes", np.array([3, 4], np.int64)),
    ]
    axes_attr = {"axes": [0]} if opset < 13 else {}
    axes_in = [] if opset < 13 else ["ax0"]
    split_attr = {"split": [3, 4]} if opset < 13 else {}
    split_in = [] if opset < 13 else ["split_sizes"]
    n = helper.make_node
    nodes = [
        n("Conv", ["input", "w_same", "b_same"], ["c_same"], auto_pad="SAME_UPPER", strides=[2, 2]),
        n("Clip", ["c_same", "lo", "hi"], ["clipped"]),
        n("Clip", ["c_same", "", "hi"], ["clipped_hi"]),
        n("Sub", ["clipped", "shift"], ["sub"]),
        n("Div", ["sub", "scale"], ["div"]),
        n("Add", ["div", "clipped_hi"], ["sum"]),
        n("MaxPool", ["sum"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 0, 1], ceil_mode=1),
        # 5x6 map: along W the last ceil_mode window would start in the end padding -> dropped
        n("MaxPool", ["sum"], ["mp2"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1),
        n("Conv", ["input", "w_lower"], ["c_lower"], auto_pad="SAME_LOWER"),
        n("AveragePool", ["c_lower"], ["ap_inc"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
          ceil_mode=1, count_include_pad=1),
        n("AveragePool", ["c_lower"], ["ap_exc"], kernel_shape=[2, 3], strides=[2, 2], pads=[0, 1, 0, 1],
          ceil_mode=1, count_include_pad=0),
        n("Conv", ["input", "w_valid"], ["c_valid"], auto_pad="VALID", dilations=[2, 2]),
        n("Pad", ["input", "pads", "pad_value"], ["padded"], mode="constant"),
        n("Conv", ["padded", "w_pad"], ["c_pad"], strides=[2, 1]),
        n("Sigmoid", ["c_pad"], ["sig"]),
        n("GlobalAveragePool", ["mp"], ["g1"]),
        n("GlobalAveragePool", ["ap_inc"], ["g2"]),
        n("GlobalAveragePool", ["ap_exc"], ["g3"]),
        n("GlobalAveragePool", ["c_valid"], ["g4"]),
        n("GlobalAveragePool", ["sig"], ["g5"]),
        n("Concat", ["g1", "g2", "g3", "g4", "g5"], ["gcat"], axis=1),
        n("Flatten", ["gcat"], ["feat"], axis=1),  # (N, 26)
        n("Unsqueeze", ["feat", *axes_in], ["feat_u"], **axes_attr),
        n("Squeeze", ["feat_u", *axes_in], ["feat_s"], **axes_attr),
        n("MatMul", ["feat_s", "w_mm"], ["mm"]),  # constant weight -> linear kernel
        n("Split", ["mm", *split_in], ["mm_a", "mm_b"], axis=1, **split_attr),
        n("Slice", ["mm_b", "starts", "ends", "axes_slice"], ["mm_b1"]),
        n("Transpose", ["feat_s"], ["feat_t"], perm=[1, 0]),
        n("Gemm", ["feat_t", "w_gemm", "c_gemm"], ["gemm"], transA=1, alpha=0.5, beta=2.0),
        n("Mul", ["gemm", "ten"], ["gemm10"]),
        n("Cast", ["gemm10"], ["gemm_int"], to=TP.INT64),  # truncation toward zero
        n("Div", ["gemm_int", "three"], ["gemm_div"]),  # integer Div truncates toward zero
        n("Cast", ["gemm_div"], ["gemm_trunc"], to=TP.FLOAT),
        n("ReduceMean", ["mm_a"], ["mm_mean"], axes=[1], keepdims=1),
        n("Concat", ["gemm_trunc", "mm_mean", "mm_b1"], ["head"], axis=1),
        n("Softmax", ["head"], ["probs"], axis=1),
    ]
    inputs = [helper.make_tensor_value_info("input", f, ["N", 3, 9, 11])]
    outputs = [helper.make_tensor_value_info(name, f, None) for name in ("probs", "gemm", "mp", "ap_inc", "ap_exc", "mp2")]
    feeds = [{"input": (np.random.default_rng(b).standard_normal((b, 3, 9, 11)) * 2).astype(np.float32)}
             for b in (1, 3)]
    return _model(nodes, inputs, outputs, inits, opset), feeds


@pytest.mark.parametrize("opset", [11, 17])
def test_hand_built_op_zoo_matches_onnxruntime(opset: int) -> None:
    model, feeds = _op_zoo(opset)
    sess = _assert_matches_ort(model, feeds)
    assert [e["op"] for e in sess.layers()].count("Conv") == 4
    assert {e["op"] for e in sess.layers()} == {"Conv", "MatMul", "Gemm"}
    # Asking for a subset of the outputs, in another order, gives the same arrays.
    full = sess.run(None, feeds[1])
    part = sess.run(["mp", "probs"], feeds[1])
    np.testing.assert_array_equal(part[0], full[2])
    np.testing.assert_array_equal(part[1], full[0])


def test_old_opset_attribute_forms_match_onnxruntime() -> None:
    """Opset 9: Clip's bounds, Pad's pads/value and Slice's starts/ends are attributes, and
    Softmax normalises over all dims from ``axis`` on."""
    rng = np.random.default_rng(9)
    n = helper.make_node
    nodes = [
        n("Pad", ["input"], ["padded"], pads=[0, 0, 1, 1, 0, 0, 1, 1], value=0.25),
        n("Conv", ["padded", "w"], ["c"], pads=[0, 1, 1, 0]),
        n("Clip", ["c"], ["clipped"], min=-0.3, max=0.6),
        n("Slice", ["clipped"], ["sliced"], starts=[1, -5], ends=[1000, -1], axes=[1, 3]),
        n("Unsqueeze", ["sliced"], ["u"], axes=[0]),
        n("Squeeze", ["u"], ["squeezed"], axes=[0]),
        n("Softmax", ["squeezed"], ["logits"], axis=1),  # before opset 13: over dims 1.. flattened
    ]
    model = _model(nodes, [helper.make_tensor_value_info("input", TP.FLOAT, ["N", 2, 8, 8])],
                   [helper.make_tensor_value_info("logits", TP.FLOAT, None)],
                   [_init("w", _sparse(rng, (5, 2, 3, 3)))], opset=9)
    _assert_matches_ort(model, [{"input": rng.standard_normal((b, 2, 8, 8)).astype(np.float32)} for b in (1, 3)])


def test_conv_bn_is_folded_and_other_bn_runs() -> None:
    rng = np.random.default_rng(3)
    c = 6
    bn = {f"{k}{i}": v for i in (1, 2) for k, v in (
        ("gamma", rng.random(c).astype(np.float32) + 0.5), ("beta", rng.standard_normal(c).astype(np.float32)),
        ("mean", rng.standard_normal(c).astype(np.float32)), ("var", rng.random(c).astype(np.float32) + 0.1))}
    n = helper.make_node
    nodes = [
        n("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["c", "gamma1", "beta1", "mean1", "var1"], ["bn1"], epsilon=1e-3),
        n("Relu", ["bn1"], ["r"]),
        n("Add", ["r", "input6"], ["s"]),
        n("BatchNormalization", ["s", "gamma2", "beta2", "mean2", "var2"], ["logits"]),  # not after a conv
    ]
    inits = [_init(k, v) for k, v in bn.items()] + [
        _init("w", _sparse(rng, (c, 3, 3, 3))), _init("b", rng.standard_normal(c).astype(np.float32)),
        _init("input6", rng.standard_normal((1, c, 1, 1)).astype(np.float32))]
    model = _model(nodes, [helper.make_tensor_value_info("input", TP.FLOAT, ["N", 3, 7, 7])],
                   [helper.make_tensor_value_info("logits", TP.FLOAT, None)], inits, opset=15)
    sess = _assert_matches_ort(model, [{"input": rng.standard_normal((b, 3, 7, 7)).astype(np.float32)}
                                       for b in (1, 3)])
    ops = [node.op_type for node in sess.graph.nodes]
    assert ops == ["Conv", "Add", "BatchNormalization"]  # the Relu runs inside the fused Conv; a constant Add stays
    assert sess.graph.nodes[0].attrs["swat.relu"] == 1 and sess.graph.nodes[0].attrs["swat.residual"] == 0
    (layer,) = sess.layers()
    expected = float((numpy_helper.to_array(inits[-3]) == 0).mean())
    assert layer["sparsity"] == pytest.approx(expected)


def _bitmask_nodes(prefix: str, values: str, packed: str, n: int, shape: list[int], via_scatter: bool) -> tuple:
    """The exporter's weight expansion: packed uint8 bits (LSB first) + nonzero values -> dense."""
    p = prefix
    node = helper.make_node
    common = [
        node("Reshape", [packed, "col_shape"], [p + "packed_col"]),
        node("BitShift", [p + "packed_col", "bit_shifts"], [p + "shifted"], direction="RIGHT"),
        node("BitwiseAnd", [p + "shifted", "one_u8"], [p + "bits2d"]),
        node("Reshape", [p + "bits2d", "flat_shape"], [p + "bits"]),
        node("Slice", [p + "bits", "zero_i64", p + "n"], [p + "bits_n"]),
        node("Equal", [p + "bits_n", "one_u8"], [p + "mask"]),
    ]
    inits = [_init(p + "n", np.array([n], np.int64)), _init(p + "shape", np.array(shape, np.int64))]
    if via_scatter:
        expand = [
            node("NonZero", [p + "mask"], [p + "nz"]),
            node("Transpose", [p + "nz"], [p + "nz_t"], perm=[1, 0]),
            node("ConstantOfShape", [p + "n"], [p + "zeros"],
                 value=helper.make_tensor("v", TP.FLOAT, [1], [0.0])),
            node("ScatterND", [p + "zeros", p + "nz_t", values], [p + "dense"]),
        ]
    else:
        expand = [
            node("Cast", [p + "bits_n"], [p + "bits_i64"], to=TP.INT64),
            node("CumSum", [p + "bits_i64", "zero_i64"], [p + "cum"]),
            node("Sub", [p + "cum", "one_i64"], [p + "pos"]),
            node("Where", [p + "mask", p + "pos", "zero_i64"], [p + "pos0"]),
            node("Gather", [values, p + "pos0"], [p + "picked"], axis=0),
            node("Where", [p + "mask", p + "picked", "zero_f32"], [p + "dense"]),
        ]
    reshape = [node("Reshape", [p + "dense", p + "shape"], [p + "weight"])]
    return common + expand + reshape, inits


def test_bitmask_weight_expansion_is_folded() -> None:
    rng = np.random.default_rng(4)
    w_conv, w_fc = _sparse(rng, (8, 3, 3, 3)), _sparse(rng, (5, 8 * 3 * 3))
    nodes, inits = [], [
        _init("col_shape", np.array([-1, 1], np.int64)), _init("flat_shape", np.array([-1], np.int64)),
        _init("bit_shifts", np.arange(8, dtype=np.uint8)), _init("one_u8", np.array(1, np.uint8)),
        _init("zero_i64", np.array([0], np.int64)), _init("one_i64", np.array(1, np.int64)),
        _init("zero_f32", np.array(0.0, np.float32)),
    ]
    for prefix, w, scatter in (("conv_", w_conv, False), ("fc_", w_fc, True)):
        flat = w.reshape(-1)
        inits += [_init(prefix + "values", flat[flat != 0]),
                  _init(prefix + "packed", np.packbits(flat != 0, bitorder="little"))]
        more_nodes, more_inits = _bitmask_nodes(prefix, prefix + "values", prefix + "packed", flat.size,
                                                list(w.shape), via_scatter=scatter)
        nodes += more_nodes
        inits += more_inits
    node = helper.make_node
    nodes += [
        node("Conv", ["input", "conv_weight"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        node("Relu", ["c"], ["r"]),
        node("Flatten", ["r"], ["f"]),
        node("Gemm", ["f", "fc_weight"], ["logits"], transB=1),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("input", TP.FLOAT, ["N", 3, 6, 6])],
                   [helper.make_tensor_value_info("logits", TP.FLOAT, ["N", 5])], inits, opset=18)
    sess = _assert_matches_ort(model, [{"input": rng.random((b, 3, 6, 6), dtype=np.float32)} for b in (1, 3)])
    assert [n.op_type for n in sess.graph.nodes] == ["Conv", "Flatten", "Gemm"]  # expansion folded, Relu fused
    conv, fc = sess.layers()
    assert conv["weight_shape"] == (8, 3, 3, 3) and fc["weight_shape"] == (5, 72)
    assert conv["sparsity"] == pytest.approx(float((w_conv == 0).mean()))
    assert fc["sparsity"] == pytest.approx(float((w_fc == 0).mean()))
    # The folded weights are exactly the original dense ones.
    folded = {tuple(v.shape): v for v in sess.graph.constants.values()}
    np.testing.assert_array_equal(folded[(8, 3, 3, 3)], w_conv)
    np.testing.assert_array_equal(folded[(5, 72)], w_fc)


def test_unsupported_op_is_one_line_error() -> None:
    nodes = [helper.make_node("Relu", ["input"], ["r"], name="n1"),
             helper.make_node("Foo", ["r"], ["logits"], name="n3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TP.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("logits", TP.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(SwatError) as info:
        Session(model)
    msg = str(info.value)
    assert msg.startswith("unsupported ONNX op 'Foo' (node 'n3'); supported: ")
    assert "\n" not in msg and "Conv" in msg and "BitShift" in msg


def test_session_from_graph_without_onnx() -> None:
    """A Graph built in Python (no ONNX file) runs; compared with torch directly."""
    rng = np.random.default_rng(5)
    w, b = _sparse(rng, (4, 2, 3, 3)), rng.standard_normal(4).astype(np.float32)
    graph = Graph(
        nodes=[Node("Conv", ["x", "w", "b"], ["c"], {"pads": [1, 1, 1, 1]}, name="conv"),
               Node("Relu", ["c"], ["y"], name="relu")],
        constants={"w": w, "b": b},
        inputs=[ValueInfo("x", ["N", 2, 5, 5])], outputs=[ValueInfo("y", ["N", 4, 5, 5])])
    sess = Session(graph)
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    want = F.relu(F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding=1)).numpy()
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-5)
    assert sess.layers()[0]["name"] == "conv"


def _misc_case_nodes(src: str, t: str) -> tuple[list, list[str]]:
    """Less common ops applied to tensor `src`; names suffixed with `t`."""
    n = helper.make_node
    nodes = [
        n("Slice", [src, "s_start", "s_end", "s_axes", "s_step"], ["slice_neg" + t]),
        n("Slice", [src, "c_start", "c_end", "c_axes"], ["slice_clamp" + t]),
        n("Slice", [src, "b_start", "s_end", "b_axes", "b_step"], ["slice_below" + t]),  # start < -dim
        n("ReduceMean", [src, "ax1"], ["mean1" + t], keepdims=1),
        n("Expand", ["mean1" + t, "exp_shape"], ["expand" + t]),
        n("Tile", [src, "reps"], ["tile" + t]),
        n("Pad", [src, "pads_pos"], ["pad_reflect" + t], mode="reflect"),
        n("Pad", [src, "pads_pos"], ["pad_edge" + t], mode="edge"),
        n("Pad", [src, "pads_neg", "pad_value"], ["pad_crop" + t]),
        n("CumSum", [src, "ax3"], ["cumsum" + t], exclusive=1, reverse=1),
        n("Mul", [src, "ten"], ["x10" + t]),
        n("Cast", ["x10" + t], ["xi" + t], to=TP.INT64),
        n("Mod", ["xi" + t, "three"], ["mod" + t]),
        n("Mod", ["xi" + t, "three"], ["fmod" + t], fmod=1),
        n("Abs", ["x10" + t], ["abs" + t]),
        n("Cast", ["abs" + t], ["xu8" + t], to=TP.UINT8),
        n("BitShift", ["xu8" + t, "one_u8"], ["shl" + t], direction="LEFT"),
        n("Pow", [src, "two"], ["pow" + t]),
        n("Greater", [src, "zero_f"], ["pos" + t]),
        n("Neg", [src], ["neg" + t]),
        n("Where", ["pos" + t, src, "neg" + t], ["where" + t]),
        n("Max", [src, "neg" + t, "pow" + t], ["max3" + t]),
        n("ReduceMax", [src, "ax13"], ["rmax" + t], keepdims=0),
        n("ReduceSum", [src, "ax13"], ["rsum" + t], keepdims=1),
        n("ReduceL2", [src, "ax1"], ["rl2" + t], keepdims=0),
        n("ArgMax", [src], ["argmax" + t], axis=1, keepdims=0),
        n("ArgMin", [src], ["argmin_last" + t], axis=3, select_last_index=1),
        n("LeakyRelu", [src], ["leaky" + t], alpha=0.2),
        n("HardSigmoid", [src], ["hsig" + t]),
        n("HardSwish", [src], ["hswish" + t]),
        n("Elu", [src], ["elu" + t]),
        n("Tanh", [src], ["tanh" + t]),
        n("Erf", [src], ["erf" + t]),
        n("LogSoftmax", [src], ["logsm" + t], axis=2),
        n("Split", [src], ["sp_a" + t, "sp_b" + t], axis=3, num_outputs=2),
        n("Transpose", [src], ["tr" + t], perm=[0, 2, 3, 1]),
        n("Range", ["r_start", "r_limit", "r_delta"], ["range" + t]),
        n("Softplus", [src], ["softplus" + t]),
        n("Round", ["x10" + t], ["round" + t]),
        n("Floor", [src], ["floor" + t]),
        n("Ceil", [src], ["ceil" + t]),
        n("Sign", [src], ["sign" + t]),
        n("Reciprocal", ["pow" + t], ["recip" + t]),
        n("Exp", [src], ["exp" + t]),
        n("Log", ["abs" + t], ["log" + t]),
        n("Sqrt", ["abs" + t], ["sqrt" + t]),
        n("Less", [src, "zero_f"], ["neg_mask" + t]),
        n("Not", ["pos" + t], ["not" + t]),
        n("And", ["pos" + t, "neg_mask" + t], ["and" + t]),
        n("Or", ["pos" + t, "neg_mask" + t], ["or" + t]),
        n("Xor", ["pos" + t, "not" + t], ["xor" + t]),
        n("ReduceMin", [src, "ax1"], ["rmin" + t]),
        n("ReduceProd", [src, "ax13"], ["rprod" + t]),
        n("ReduceSumSquare", [src, "ax1"], ["rss" + t]),
        n("Sum", [src, "pow" + t, "neg" + t], ["sum3" + t]),
        n("Mean", [src, "pow" + t], ["mean2" + t]),
        n("Min", [src, "neg" + t], ["min2" + t]),
        n("Identity", [src], ["ident" + t]),
        n("Dropout", [src], ["drop" + t]),
        n("CastLike", ["xi" + t, src], ["castlike" + t]),
        n("GatherElements", [src, "ge_idx"], ["gather_el" + t], axis=3),
        n("ScatterElements", [src, "ge_idx", "se_upd"], ["scatter_el" + t], axis=3),
    ]
    outs = [o for node in nodes for o in node.output if not o.startswith(("x10", "xi", "abs", "xu8", "pos"))]
    return nodes, outs


def test_misc_ops_run_and_fold_like_onnxruntime() -> None:
    """Each op twice: on the graph input (torch at run time) and on a constant (numpy folding)."""
    rng = np.random.default_rng(6)
    inits = [
        _init("x_const", (rng.standard_normal((2, 3, 4, 5)) * 0.8).astype(np.float32)),
        _init("s_start", np.array([-1], np.int64)), _init("s_end", np.array([-1000], np.int64)),
        _init("s_axes", np.array([3], np.int64)), _init("s_step", np.array([-2], np.int64)),
        _init("c_start", np.array([-100, 1], np.int64)), _init("c_end", np.array([100, -1], np.int64)),
        _init("c_axes", np.array([2, -1], np.int64)),
        _init("b_start", np.array([-10], np.int64)), _init("b_axes", np.array([2], np.int64)),
        _init("b_step", np.array([-1], np.int64)),
        _init("ax1", np.array([1], np.int64)), _init("ax3", np.array(3, np.int64)),
        _init("ax13", np.array([1, 3], np.int64)), _init("exp_shape", np.array([1, 3, 1, 1], np.int64)),
        _init("reps", np.array([1, 2, 1, 1], np.int64)),
        _init("pads_pos", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)),
        _init("pads_neg", np.array([0, 1, -1, 0, 0, 0, 0, -2], np.int64)),
        _init("pad_value", np.array(0.5, np.float32)),
        _init("ten", np.array(10.0, np.float32)), _init("three", np.array(3, np.int64)),
        _init("one_u8", np.array(1, np.uint8)), _init("two", np.array(2.0, np.float32)),
        _init("zero_f", np.array(0.0, np.float32)),
        _init("r_start", np.array(2, np.int64)), _init("r_limit", np.array(-7, np.int64)),
        _init("r_delta", np.array(-3, np.int64)),
        _init("ge_idx", np.stack([rng.permutation(5)[:2] for _ in range(12)]).reshape(1, 3, 4, 2) - 2),
        _init("se_upd", rng.standard_normal((1, 3, 4, 2)).astype(np.float32)),
    ]
    run_nodes, run_outs = _misc_case_nodes("input", "_run")
    fold_nodes, fold_outs = _misc_case_nodes("x_const", "_fold")
    types = {"mod": TP.INT64, "fmod": TP.INT64, "argmax": TP.INT64, "argmin_last": TP.INT64,
             "range": TP.INT64, "shl": TP.UINT8, "neg_mask": TP.BOOL, "not": TP.BOOL, "and": TP.BOOL,
             "or": TP.BOOL, "xor": TP.BOOL}
    outputs = [helper.make_tensor_value_info(o, types.get(o.rsplit("_", 1)[0], TP.FLOAT), None)
               for o in run_outs + fold_outs]
    model = _model(run_nodes + fold_nodes, [helper.make_tensor_value_info("input", TP.FLOAT, ["N", 3, 4, 5])],
                   outputs, inits, opset=18)
    sess = _assert_matches_ort(model, [{"input": (rng.standard_normal((b, 3, 4, 5)) * 0.8).astype(np.float32)}
                                       for b in (1, 3)])
    assert all(o in sess.graph.constants for o in fold_outs)  # every constant-only op was folded


def test_thread_cap_is_measured_once_per_shape_and_restored(rescat_onnx: Path, monkeypatch) -> None:  # noqa: ANN001
    before = torch.get_num_threads()
    sess = Session(rescat_onnx, threads=2, fallback=False)
    feed = _images(RESCAT_SHAPE, batches=(2,))[0]
    ref = _ort(rescat_onnx).run(None, feed)[0]
    np.testing.assert_allclose(sess.run(None, feed)[0], ref, rtol=1e-4, atol=1e-4)
    (plan,) = sess.plans()  # one timed decision for this input shape
    assert plan["engine"] == "swat" and plan["threads"] in (1, 2) and set(plan["ms"]) == {"swat/2", "swat/1"}
    assert plan["inputs"] == {"input": [2, 3, 16, 16]}
    np.testing.assert_allclose(sess.run(None, feed)[0], ref, rtol=1e-4, atol=1e-4)
    assert len(sess.plans()) == 1 and torch.get_num_threads() == before
    monkeypatch.setenv("SWAT_SESSION_TUNE_THREADS", "0")
    fixed = Session(rescat_onnx, threads=2, fallback=False)
    np.testing.assert_allclose(fixed.run(None, feed)[0], ref, rtol=1e-4, atol=1e-4)
    assert fixed.plans()[0] == {**fixed.plans()[0], "engine": "swat", "threads": 2, "ms": {}}


def _fake_timing(winner: str):  # noqa: ANN202
    """A `_time_candidates` that runs every candidate once and declares `winner` fastest."""
    def timing(runs: dict) -> dict:
        for fn in runs.values():
            fn()
        return {k: (1.0 if k == winner else 10.0) for k in runs}
    return timing


def test_whole_graph_falls_back_to_onnxruntime_when_that_is_faster(rescat_onnx: Path, monkeypatch) -> None:  # noqa: ANN001
    import swat_deploy.session as session_mod

    feeds = _images(RESCAT_SHAPE, batches=(2, 3))
    ref = _ort(rescat_onnx)
    monkeypatch.setattr(session_mod, "_time_candidates", _fake_timing("onnxruntime"))
    sess = Session(rescat_onnx, threads=2)
    for feed in feeds:
        np.testing.assert_allclose(sess.run(None, feed)[0], ref.run(None, feed)[0], rtol=1e-5, atol=1e-5)
    assert [p["engine"] for p in sess.plans()] == ["onnxruntime", "onnxruntime"]
    assert "swat/2" in sess.plans()[0]["ms"] and "swat/1" in sess.plans()[0]["ms"]
    # an intermediate value is not an onnxruntime output: those runs stay on our kernels
    inner = next(n.outputs[0] for n in sess.graph.nodes if n.op_type == "Conv")
    sess.run([inner], feeds[0])
    assert sess.plans()[-1]["engine"] == "swat" and "onnxruntime" not in sess.plans()[-1]["ms"]

    monkeypatch.setattr(session_mod, "_time_candidates", _fake_timing("swat/2"))
    ours = Session(rescat_onnx, threads=2)
    ours.run(None, feeds[0])
    assert ours.plans()[0]["engine"] == "swat" and "onnxruntime" in ours.plans()[0]["ms"]
    assert ours._ort is None  # no plan uses it: its dense weights are freed
    # no fallback when asked not to, or when one kernel is forced (benchmarks of that kernel)
    for kw in ({"fallback": False}, {"kernel": "dense"}):
        monkeypatch.setattr(session_mod, "_time_candidates", _fake_timing("onnxruntime"))
        s = Session(rescat_onnx, threads=2, **kw)
        s.run(None, feeds[0])
        assert s.plans()[0]["engine"] == "swat" and "onnxruntime" not in s.plans()[0]["ms"]


def test_a_plan_contradicted_by_its_real_runs_is_made_once_more(rescat_onnx: Path, monkeypatch) -> None:  # noqa: ANN001
    """A burst of load during the planning second must not fix the slower engine for good."""
    import swat_deploy.session as session_mod

    calls = []

    def timing(first: dict):  # noqa: ANN202
        def fake(runs: dict) -> dict:
            calls.append(sorted(runs))
            for fn in runs.values():
                fn()
            return dict(first) if len(calls) == 1 else {"swat/2": 1.0, "swat/1": 5.0, "onnxruntime": 9.0}
        return fake

    # onnxruntime "timed" at 10 ns: every real run is far slower, and swat/2 was timed below them
    monkeypatch.setattr(session_mod, "_time_candidates", timing({"swat/2": 1e-4, "swat/1": 5.0, "onnxruntime": 1e-5}))
    sess = Session(rescat_onnx, threads=2)
    feed = _images(RESCAT_SHAPE, batches=(2,))[0]
    want = _ort(rescat_onnx).run(None, feed)[0]
    sess.run(None, feed)
    assert sess.plans()[0]["engine"] == "onnxruntime"
    for _ in range(session_mod.CHECK_RUNS + 20):
        np.testing.assert_allclose(sess.run(None, feed)[0], want, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2  # planned once more, and only once
    assert sess.plans()[0]["engine"] == "swat" and sess.plans()[0]["threads"] == 2


def test_a_later_process_keeps_an_earlier_plan_on_a_near_tie_only(rescat_onnx: Path, monkeypatch) -> None:  # noqa: ANN001
    import swat_deploy.session as session_mod

    monkeypatch.setenv("SWAT_AUTOTUNE", "1")  # the plan cache is part of autotuning
    monkeypatch.setenv("SWAT_SESSION_TUNE_THREADS", "0")
    feed = _images(RESCAT_SHAPE, batches=(2,))[0]

    def planned(swat_ms: float, ort_ms: float) -> str:
        def fake(runs: dict) -> dict:
            for fn in runs.values():
                fn()
            return {"swat/2": swat_ms, "onnxruntime": ort_ms}
        monkeypatch.setattr(session_mod, "_time_candidates", fake)
        sess = Session(rescat_onnx, threads=2)  # a new Session: what a new process does
        sess.run(None, feed)
        return sess.plans()[0]["engine"]

    assert planned(10.0, 1.0) == "onnxruntime"
    assert planned(1.0, 1.0 * (session_mod.STICKY - 0.01)) == "onnxruntime"  # near tie: kept
    assert planned(1.0, 1.0 * (session_mod.STICKY + 0.05)) == "swat"  # clearly slower now: changed
    assert planned(1.0, 0.99) == "swat"  # onnxruntime 1 % faster is not worth the switch
    assert planned(1.0, 0.90) == "onnxruntime"


def test_plan_check_rule() -> None:
    from swat_deploy.session import CHECK_RUNS, Plan, _plan_looks_wrong

    ours = Plan("swat", 2, {"swat/2": 5.0, "swat/1": 9.0, "onnxruntime": 8.0})
    assert _plan_looks_wrong(ours, [0.014] * CHECK_RUNS)  # ran 14 ms, onnxruntime was timed at 8
    assert not _plan_looks_wrong(ours, [0.014] * (CHECK_RUNS - 1))  # too few runs to say
    assert not _plan_looks_wrong(ours, [0.0055] * CHECK_RUNS)  # as expected, within noise
    assert not _plan_looks_wrong(Plan("swat", 2, {"swat/2": 5.0, "onnxruntime": 9.0}), [0.008] * CHECK_RUNS)
    assert not _plan_looks_wrong(Plan("swat", 2, {}), [1.0] * CHECK_RUNS)  # nothing was timed
    assert _plan_looks_wrong(Plan("onnxruntime", 2, {"swat/2": 5.0, "onnxruntime": 3.0}), [0.008] * CHECK_RUNS)


def test_fallback_is_skipped_when_onnxruntime_cannot_load_the_model(rescat_onnx: Path, monkeypatch) -> None:  # noqa: ANN001
    import swat_deploy.ort as ort_mod
    import swat_deploy.session as session_mod

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("onnxruntime refuses this model")

    monkeypatch.setattr(ort_mod, "ort_session", broken)
    monkeypatch.setattr(session_mod, "_time_candidates", _fake_timing("onnxruntime"))
    sess = Session(rescat_onnx, threads=2)
    feed = _images(RESCAT_SHAPE, batches=(2,))[0]
    np.testing.assert_allclose(sess.run(None, feed)[0], _ort(rescat_onnx).run(None, feed)[0], rtol=1e-4, atol=1e-4)
    assert sess.plans()[0]["engine"] == "swat"


def test_residual_add_and_relu_fuse_into_the_conv() -> None:
    rng = np.random.default_rng(7)
    n = helper.make_node
    nodes = [n("Conv", ["input", "w1"], ["a"], pads=[1, 1, 1, 1]), n("Relu", ["a"], ["r"]),
             n("Conv", ["r", "w2"], ["c"], pads=[1, 1, 1, 1]), n("Add", ["input", "c"], ["s"]),
             n("Relu", ["s"], ["logits"])]
    inits = [_init("w1", _sparse(rng, (4, 4, 3, 3))), _init("w2", _sparse(rng, (4, 4, 3, 3)))]
    model = _model(nodes, [helper.make_tensor_value_info("input", TP.FLOAT, ["N", 4, 5, 5])],
                   [helper.make_tensor_value_info("logits", TP.FLOAT, None)], inits, opset=17)
    sess = _assert_matches_ort(model, [{"input": rng.standard_normal((b, 4, 5, 5)).astype(np.float32)}
                                       for b in (1, 2)])
    assert [(m.op_type, m.attrs.get("swat.residual"), m.attrs.get("swat.relu")) for m in sess.graph.nodes] == \
        [("Conv", 0, 1), ("Conv", 1, 1)]
    assert sess.graph.nodes[1].inputs[3] == "input"


def test_plan_timing_uses_the_median_for_long_runs_and_the_lower_quartile_for_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: an engine whose long calls spread (83-134 ms) must not beat a steady 101 ms
    one by its lucky calls; short runs still see through bursts of other load."""
    import itertools

    from swat_deploy import session as session_mod
    from swat_deploy import timing

    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def engine(costs: list[float]):
        it = itertools.cycle(costs)
        return lambda: clock.__setitem__(0, clock[0] + next(it))

    ms = session_mod._time_candidates({"spread": engine([0.083, 0.134, 0.090, 0.120, 0.118, 0.094, 0.117]),
                                       "steady": engine([0.101])})
    assert ms["spread"] > ms["steady"] == pytest.approx(101.0)
    ms = session_mod._time_candidates({"bursty": engine([0.001, 0.001, 0.001, 0.005]),
                                       "steady": engine([0.0015])})
    assert ms["bursty"] < ms["steady"]


@pytest.mark.parametrize("kernel,stride,dilation", [((3, 3), (2, 2), (1, 1)), ((2, 3), (1, 2), (1, 1)),
                                                    ((3, 2), (2, 1), (2, 1)), ((1, 1), (2, 2), (1, 1)),
                                                    ((4, 4), (3, 3), (1, 2))])
def test_strided_view_max_pool_matches_torch_including_nan(kernel, stride, dilation) -> None:  # noqa: ANN001
    """The MaxPool op's separable max (swat_deploy/onnx_ops/pool.py) is exact vs torch's pool."""
    from swat_deploy.onnx_ops.pool import _max_pool2d

    x = torch.randn(2, 3, 13, 11, generator=torch.Generator().manual_seed(0))
    x[0, 0, 2, 3], x[1, 2, 7, 7], x[0, 1, 0, 0] = float("nan"), float("inf"), float("-inf")
    ref = F.max_pool2d(x, kernel, stride, 0, dilation)
    got = _max_pool2d(x, list(kernel), list(stride), list(dilation))
    assert got.shape == ref.shape and got.is_contiguous()
    assert torch.equal(got.nan_to_num(7.0), ref.nan_to_num(7.0))
    assert torch.equal(got.isnan(), ref.isnan())
