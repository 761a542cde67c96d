"""The sparse int8 conv (swat_native/csrc/int8_conv.c) and the Session's QDQ path.

Tolerances: a fused conv is compared bit-exactly with the QLinearConv formula (int32 sums,
float32 requantisation, round half to even), on every ISA path this CPU has. The whole QDQ
graph against onnxruntime on the same file: every logit within 2 quantisation steps of the
output (float ops between Q/DQ, i.e. the residual add and the input quantisation, may round to
the neighbouring step; one step at a conv's output moves a logit by a fraction of a step).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from swat_native import int8 as native

pytestmark = pytest.mark.skipif(not native.available(), reason="compiled int8 kernels not built")

from swat_deploy.kernels.int8_direct import PreparedQConv, QConvSpec, reference_qconv  # noqa: E402

ISAS = [i for i in ("generic", "avx2", "avx512") if i in native.cpu_isas()]

CASES = [  # n, c, o, h, w, k, stride, pad, sparsity, relu
    (1, 3, 8, 7, 9, 3, 1, 1, 0.0, False),       # C not a multiple of 4, tail tile
    (2, 16, 24, 8, 8, 3, 1, 1, 0.5, True),      # tiles of several images in one group
    (3, 13, 17, 9, 11, 3, 2, 1, 0.7, True),     # stride 2, odd sizes
    (2, 32, 16, 8, 8, 1, 2, 0, 0.3, False),     # 1x1 stride-2 downsample
    (9, 8, 8, 4, 4, 3, 1, 1, 0.9, False),       # 4x4 maps: one tile per image, > 8 images
    (1, 16, 32, 20, 20, 3, 1, 1, 0.95, False),  # rows with no block at all
    (2, 12, 8, 6, 6, 1, 1, 0, 0.5, True),       # 1x1 stride 1: the packer's whole-plane copy
    (1, 8, 8, 1, 1, 3, 1, 1, 0.0, False),       # 1x1 map: every tap but the centre is padding
    (2, 7, 9, 9, 9, 5, 1, 2, 0.5, False),       # 5x5 pad 2: copies shifted by two columns
    (1, 8, 8, 5, 7, 3, 1, 0, 0.3, False),       # no padding: w_out != W, row by row
]


def _layer(rng: np.random.Generator, c: int, o: int, k: int, s: int, p: int, sparsity: float, relu: bool):
    w = rng.integers(-128, 128, (o, c, k, k)).astype(np.int8)  # -128 too: the AVX2 path must not saturate
    w[rng.random(w.shape) < sparsity] = 0
    ws = rng.uniform(0.001, 0.01, o).astype(np.float32)
    b = rng.integers(-5000, 5000, o).astype(np.int32)
    spec = QConvSpec((o, c, k, k), (s, s), (p, p, p, p), x_scale=0.02, x_zero=int(rng.integers(0, 40)),
                     y_scale=0.05 * c * k * k / 16, y_zero=int(rng.integers(0, 128)), relu=relu)
    return w, ws, b, spec


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES)
def test_qconv_exact(isa: str, case: tuple) -> None:
    n, c, o, h, w_, k, s, p, sparsity, relu = case
    rng = np.random.default_rng(hash(case) % 2**32)
    w, ws, b, spec = _layer(rng, c, o, k, s, p, sparsity, relu)
    x = rng.integers(0, 256, (n, c, h, w_)).astype(np.uint8)
    want = reference_qconv(x, w, ws, b, spec)
    assert 0.05 < ((want > 0) & (want < 255)).mean()  # not all saturated: the test sees the arithmetic
    op = PreparedQConv(w, ws, b, spec, isa=isa)
    for threads in (1, 2, 3):  # serial, and both ways of splitting (tiles, rows)
        got = op(torch.from_numpy(x), threads).numpy()
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4], (20, 16, 8, 4, 4, 3, 1, 1, 0.7, True),
                                  (5, 8, 12, 6, 6, 1, 1, 0, 0.5, False)])
def test_qconv_fused_chunks_exact(isa: str, case: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """Packing and multiplying per chunk of images (the batch path) gives the same bytes as the
    two phases over the whole batch, residual included, with a last chunk that is partial."""
    from swat_deploy.kernels import int8_direct
    from swat_deploy.kernels.int8_direct import reference_qadd

    monkeypatch.setattr(int8_direct, "_FUSED", 1)
    n, c, o, h, w_, k, s, p, sparsity, relu = case
    rng = np.random.default_rng(hash(case) % 2**32 + 11)
    w, ws, b, spec = _layer(rng, c, o, k, s, p, sparsity, relu)
    x = rng.integers(0, 256, (n, c, h, w_)).astype(np.uint8)
    plane = reference_qconv(x[:1], w, ws, b, spec).shape[2:]
    assert int8_direct.fused_chunk(n, plane[0] * plane[1], 2) > 0
    want = reference_qconv(x, w, ws, b, spec)
    op = PreparedQConv(w, ws, b, spec, isa=isa)
    for threads in (1, 2, 3):
        np.testing.assert_array_equal(op(torch.from_numpy(x), threads).numpy(), want)
    res = rng.integers(0, 256, want.shape).astype(np.uint8)
    ra, rb, cc = np.float32(0.61), np.float32(0.43), np.float32(3.0)
    op = PreparedQConv(w, ws, b, spec, isa=isa)
    op.fuse_residual(ra, rb, cc, 0)
    np.testing.assert_array_equal(op(torch.from_numpy(x), 2, torch.from_numpy(res)).numpy(),
                                  reference_qadd(want, res, ra, rb, cc, 0))


def test_fused_chunk_rule() -> None:
    """Batch 1 keeps the split over rows; a large batch of small maps packs per chunk of at least
    8 tiles (the multiply's register block)."""
    from swat_deploy.kernels import int8_direct

    if int8_direct._FUSED is not None:
        pytest.skip("SWAT_INT8_FUSED is set")
    assert int8_direct.fused_chunk(1, 32 * 32, 2) == 0
    assert int8_direct.fused_chunk(64, 8 * 8, 2) == 2      # 4 tiles per image -> 2 images
    assert int8_direct.fused_chunk(64, 32 * 32, 2) == 1    # 64 tiles per image
    assert int8_direct.fused_chunk(3, 4 * 4, 2) == 0       # fewer than 2 chunks per thread


@pytest.mark.parametrize("isa", ISAS)
def test_qconv_blocks_skip_zeros(isa: str) -> None:
    """Weights pruned in 4-channel blocks store only the kept blocks."""
    rng = np.random.default_rng(1)
    w, ws, b, spec = _layer(rng, 32, 16, 3, 1, 1, 0.0, False)
    keep = rng.random((16, 8, 1, 3, 3)) >= 0.75
    w = (w.reshape(16, 8, 4, 3, 3) * keep).reshape(w.shape).astype(np.int8)
    op = PreparedQConv(w, ws, b, spec, isa=isa)
    assert op.nnz_blocks == int(keep.sum())
    x = rng.integers(0, 256, (2, 32, 6, 6)).astype(np.uint8)
    np.testing.assert_array_equal(op(torch.from_numpy(x), 2).numpy(), reference_qconv(x, w, ws, b, spec))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4], CASES[6]])
def test_qconv_fused_residual_equals_conv_then_qadd(isa: str, case: tuple) -> None:
    """The residual QLinearAdd in the conv's output loop gives the bytes of the conv followed by
    onnxruntime's QLinearAdd formula (float32, round half to even): bit-exact, tails and ReLU
    floor included, on the one-call layer and the two-call path."""
    from swat_deploy.kernels import int8_direct
    from swat_deploy.kernels.int8_direct import reference_qadd

    n, c, o, h, w_, k, s, p, sparsity, relu = case
    rng = np.random.default_rng(hash(case) % 2**32 + 7)
    w, ws, b, spec = _layer(rng, c, o, k, s, p, sparsity, relu)
    x = rng.integers(0, 256, (n, c, h, w_)).astype(np.uint8)
    y = reference_qconv(x, w, ws, b, spec)
    res = rng.integers(0, 256, y.shape).astype(np.uint8)
    ra, rb = np.float32(0.61), np.float32(0.43)
    cc = np.float32(9.0) - np.float32(spec.y_zero) * ra - np.float32(17) * rb
    want = reference_qadd(y, res, ra, rb, cc, 9)
    assert 0.05 < ((want > 9) & (want < 255)).mean()
    for one_call in (True, False):
        int8_direct._LAYER_CALL = one_call
        try:
            op = PreparedQConv(w, ws, b, spec, isa=isa)
            op.fuse_residual(ra, rb, cc, 9)
            for threads in (1, 2, 3):
                got = op(torch.from_numpy(x), threads, torch.from_numpy(res)).numpy()
                np.testing.assert_array_equal(got, want)
        finally:
            int8_direct._LAYER_CALL = True


def test_qconv_rejects_wrong_input() -> None:
    rng = np.random.default_rng(2)
    w, ws, b, spec = _layer(rng, 8, 8, 3, 1, 1, 0.5, False)
    op = PreparedQConv(w, ws, b, spec)
    with pytest.raises(ValueError, match="uint8 NCHW"):
        op(torch.zeros(1, 8, 5, 5))


@pytest.mark.parametrize("isa", ISAS)
def test_qadd_matches_formula(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from swat_deploy.kernels.int8_qdq import _qadd
    from swat_deploy.onnx_ops.base import Node

    monkeypatch.setenv("SWAT_ISA", isa)
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (2, 8, 33, 17)).astype(np.uint8)
    b = rng.integers(0, 256, a.shape).astype(np.uint8)
    ra, rb = np.float32(0.6), np.float32(0.45)
    c = np.float32(7.0) - np.float32(3) * ra - np.float32(11) * rb
    node = Node("SwatQLinearAdd", ["a", "b"], ["y"], {"ra": float(ra), "rb": float(rb), "c": float(c), "lo": 7})
    got = _qadd(node, [torch.from_numpy(a), torch.from_numpy(b)])[0].numpy()
    v = a.astype(np.float32) * ra + b.astype(np.float32) * rb + c
    want = np.rint(np.clip(v, 7, 255)).astype(np.uint8)
    assert np.abs(got.astype(int) - want).max() <= 1  # float32 evaluation order may differ by an ulp
    assert (got == want).mean() > 0.999


# ----------------------------------------------------------------------- the Session's QDQ path
def _qdq_model(rng: np.random.Generator) -> tuple[bytes, float]:
    """input -> Q -> DQ -> conv(3->16) -> Q -> DQ -> conv(16->16, 4-blocks pruned) -> Q -> DQ -> + -> Q
    -> DQ -> GlobalAveragePool -> Q -> DQ -> Flatten -> Q -> DQ -> Gemm(int8 weight) -> Q -> DQ: what
    onnxruntime's quantize_static writes for a residual block and a classifier head (Relus folded
    into the Q ranges). Returns the model and the output scale."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes = [], []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def q(x: str, s: float, z: int, out: str) -> str:
        nodes.append(helper.make_node("QuantizeLinear", [x, const(out + "_s", np.array(s, np.float32)),
                                                         const(out + "_z", np.array(z, np.uint8))], [out]))
        nodes.append(helper.make_node("DequantizeLinear", [out, out + "_s", out + "_z"], [out + "_dq"]))
        return out + "_dq"

    def conv(x: str, sx: float, c: int, o: int, out: str, prune: float) -> str:
        w = rng.integers(-127, 128, (o, c, 3, 3)).astype(np.int8)
        if prune:
            keep = rng.random((o, -(-c // 4), 1, 3, 3)) >= prune
            w = (w.reshape(o, c // 4, 4, 3, 3) * keep).reshape(w.shape).astype(np.int8)
        ws = rng.uniform(0.002, 0.01, o).astype(np.float32)
        nodes.append(helper.make_node("DequantizeLinear", [const(out + "_w", w), const(out + "_ws", ws),
                                                           const(out + "_wz", np.zeros(o, np.int8))],
                                      [out + "_wdq"], axis=0))
        b = rng.integers(-2000, 2000, o).astype(np.int32)
        nodes.append(helper.make_node("DequantizeLinear", [const(out + "_b", b),
                                                           const(out + "_bs", (np.float32(sx) * ws).astype(np.float32)),
                                                           const(out + "_bz", np.zeros(o, np.int32))],
                                      [out + "_bdq"], axis=0))
        nodes.append(helper.make_node("Conv", [x, out + "_wdq", out + "_bdq"], [out], pads=[1, 1, 1, 1]))
        return out

    x0 = q("input", 1 / 255, 0, "xq")
    c1 = conv(x0, 1 / 255, 3, 16, "c1", 0.0)
    a1 = q(c1, 0.05, 0, "a1q")
    c2 = conv(a1, 0.05, 16, 16, "c2", 0.6)
    a2 = q(c2, 0.08, 120, "a2q")
    nodes.append(helper.make_node("Add", [a2, a1], ["sum"]))
    s1 = q("sum", 0.07, 0, "sq")
    nodes.append(helper.make_node("GlobalAveragePool", [s1], ["gap"]))
    g1 = q("gap", 0.03, 2, "gq")
    nodes.append(helper.make_node("Flatten", [g1], ["flat"]))
    f1 = q("flat", 0.03, 2, "fq")  # the quantiser repeats the input's (scale, zero point) after a Flatten
    w = rng.integers(-127, 128, (10, 16)).astype(np.int8)
    w[:, ::3] = 0
    fws = rng.uniform(0.005, 0.02, 10).astype(np.float32)
    nodes.append(helper.make_node("DequantizeLinear", [const("fc_w", w), const("fc_ws", fws),
                                                       const("fc_wz", np.zeros(10, np.int8))], ["fc_wdq"], axis=0))
    nodes.append(helper.make_node("DequantizeLinear", [const("fc_b", rng.integers(-500, 500, 10).astype(np.int32)),
                                                       const("fc_bs", (np.float32(0.03) * fws).astype(np.float32)),
                                                       const("fc_bz", np.zeros(10, np.int32))], ["fc_bdq"], axis=0))
    nodes.append(helper.make_node("Gemm", [f1, "fc_wdq", "fc_bdq"], ["fc"], transB=1))
    nodes.append(helper.make_node("QuantizeLinear", ["fc", const("o_s", np.array(0.02, np.float32)),
                                                     const("o_z", np.array(128, np.uint8))], ["oq"]))
    nodes.append(helper.make_node("DequantizeLinear", ["oq", "o_s", "o_z"], ["logits"]))
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                          ["batch", 3, 12, 12])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString(), 0.02


@pytest.mark.parametrize("chain", [True, False])
@pytest.mark.parametrize("isa", ISAS)
def test_session_runs_qdq_on_int8_kernels(isa: str, chain: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    from swat_deploy import Session

    monkeypatch.setenv("SWAT_ISA", isa)
    monkeypatch.setenv("SWAT_INT8_CHAIN", "1" if chain else "0")
    monkeypatch.setenv("SWAT_AUTOTUNE", "0")
    model, step = _qdq_model(np.random.default_rng(4))
    sess = Session(model, threads=2, fallback=False)
    assert not sess.delegated
    kernels = [layer["kernel"] for layer in sess.layers()]
    assert kernels == ["int8-direct", "int8-direct"]
    ops = [n.op_type for n in sess.graph.nodes]
    convs = ["SwatQLinearConvChain"] if chain else ["SwatQLinearConv", "SwatQLinearConv"]
    # the residual add runs in c2's output loop; the head on uint8: no float GlobalAveragePool /
    # Gemm, one Q (the input) and one DQ (the logits)
    assert ops == ["QuantizeLinear", *convs, "SwatQLinearGlobalAveragePool", "Flatten", "SwatQLinearGemm",
                   "DequantizeLinear"]
    members = sess.graph.nodes[1].attrs["members"] if chain else sess.graph.nodes[1:3]
    assert [len(n.inputs) for n in members] == [4, 5]
    # the reference: onnxruntime with its graph optimisations off runs the QDQ file as written
    # (its fused u8 x s8 kernels saturate int16 sums on CPUs without VNNI: 0.36 off on a Zen 3)
    so = onnxruntime.SessionOptions()
    so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort = onnxruntime.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    for n in (1, 5, 1):  # shape classes, and a plan reused with new contents
        x = np.random.default_rng(n + 10 * len(sess.plans())).random((n, 3, 12, 12), dtype=np.float32)
        got = sess.run(None, {"input": x})[0]
        want = ort.run(None, {"input": x})[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 2 * step + 1e-6


def test_session_int8_off_delegates(monkeypatch: pytest.MonkeyPatch) -> None:
    from swat_deploy import Session

    monkeypatch.setenv("SWAT_INT8", "0")
    model, _ = _qdq_model(np.random.default_rng(4))
    assert Session(model, threads=1).delegated
