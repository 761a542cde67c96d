"""Block sparsity end to end: B consecutive output channels share one weight zero pattern.

Selection against a hand-written reference, layer gradients against a masked-dense reference,
every registered model, pruning to BSR, the compact ONNX export, `swat verify`'s block rows,
`block_size_of`, and `swat train --block` on digits.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

import models
from swat_deploy import onnx_compact
from swat_deploy.formats import block_pattern_violations, block_size_of, choose_format, load_state, to_format
from training import blocks
from training.swatify import layer_stats, layer_table, swat_layers, swatify
from training.topk import SwatValueError, keep_count, select_bits
from training.weight_topk import topk_weight

from conftest import invoke_swat


pytestmark = pytest.mark.usefixtures("one_torch_thread", "isolated_caches")


def _nonzero_randn(*shape: int) -> torch.Tensor:
    """randn can return an exact 0.0, which would break a block's shared pattern by chance."""
    w = torch.randn(*shape)
    return torch.where(w == 0, torch.full_like(w, 0.5), w)


# ------------------------------------------------------------------------ reference selection
def ref_block_mask(w: torch.Tensor, s: float, topk: str, b: int) -> torch.Tensor:
    """Loops, not the library: score = sum of squares over each b x 1 group; Top-K over scores
    per group of the variant (nchw: all; chw: per block row), ties to the lowest flat index."""
    o = w.shape[0]
    rest = w[0].numel()
    flat = w.reshape(o, rest).tolist()
    scores = [[sum(flat[j * b + r][p] ** 2 for r in range(b)) for p in range(rest)] for j in range(o // b)]
    groups = [sum(scores, [])] if topk == "nchw" else scores
    keep_flat = []
    for g in groups:
        k = keep_count(len(g), s)
        order = sorted(range(len(g)), key=lambda i: (-g[i], i))
        kept = set(order[:k])
        keep_flat += [i in kept for i in range(len(g))]
    grid = torch.tensor(keep_flat).view(o // b, rest)
    return grid.repeat_interleave(b, 0).view(w.shape)


@pytest.mark.parametrize("topk", ["nchw", "chw"])
@pytest.mark.parametrize("shape, b", [((8, 3, 3, 3), 4), ((12, 10), 4), ((16, 2, 3, 3), 8), ((6, 4, 2, 2), 2)])
def test_block_selection_matches_hand_reference(topk, shape, b):
    torch.manual_seed(1)
    w = _nonzero_randn(*shape)
    w.view(-1)[:6] = 0.25  # ties inside groups and between groups
    sel = blocks.select_block(w, 0.7, topk, b)
    want = ref_block_mask(w.double(), 0.7, topk, b)
    assert torch.equal(sel.mask, want)
    assert sel.count == int(want.sum())
    assert torch.equal(topk_weight(w, 0.7, topk, b), torch.where(want, w, 0.0))


def test_hw_blocks_are_hw_topk_of_the_scores():
    torch.manual_seed(2)
    w = _nonzero_randn(8, 3, 3, 3)
    scores = (w.view(2, 4, 3, 3, 3) ** 2).sum(1)
    want = select_bits(scores, 0.7, "hw").mask.repeat_interleave(4, 0)
    assert torch.equal(blocks.select_block(w, 0.7, "hw", 4).mask, want)


def test_scores_are_a_fixed_order_sum_of_squares():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5], [0.0, 1.0], [2.0, 2.0]])
    assert torch.equal(blocks.block_scores(w, 2), torch.tensor([[10.0, 4.25], [4.0, 5.0]]))
    with pytest.raises(SwatValueError, match="does not divide"):
        blocks.block_scores(w, 3)


def test_layer_block_and_validation():
    assert [blocks.layer_block(o, 4) for o in (6, 10, 3, 64, 84)] == [2, 2, 1, 4, 4]
    assert blocks.layer_block(48, 16) == 16 and blocks.layer_block(40, 16) == 8
    for bad in (0, 3, 6, -4, True, 2.0):
        with pytest.raises(SwatValueError, match="power of two"):
            blocks.check_block(bad)  # type: ignore[arg-type]
    net = nn.Sequential(nn.Linear(4, 8))
    for kwargs, words in (({"mode": "meprop"}, "swat and saw"), ({"mode": "dense"}, "swat and saw"),
                          ({"topk": "random"}, "random"), ({"block": 3}, "power of two")):
        with pytest.raises(SwatValueError, match=words):
            swatify(net, 0.5, **{"block": 4, **kwargs})
    assert type(net[0]) is nn.Linear, "a refused call leaves the model untouched"


def test_block_one_is_the_unstructured_path_bit_for_bit():
    torch.manual_seed(3)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10))
    nets = [swatify(_copy(base), 0.7), swatify(_copy(base), 0.7, block=1)]
    x, y = torch.randn(4, 3, 4, 4), torch.tensor([1, 2, 3, 4])
    for net in nets:
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
    assert [r["block"] for r in layer_table(nets[1])] == [1, 1]
    assert layer_table(nets[0]) == layer_table(nets[1])


def _copy(m: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(m)


# ------------------------------------------------------------------------ layer numerics
def _step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    out.backward(g)
    return out.detach(), x.grad, layer.weight.grad


def _close(a: torch.Tensor, b: torch.Tensor, what) -> None:
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (what, (a - b).abs().max())


@pytest.mark.parametrize("mode", ["swat", "saw"])
@pytest.mark.parametrize("topk", ["nchw", "chw", "hw"])
@pytest.mark.parametrize("case", [(4, 8, 3, 1, 1, 1), (4, 8, 3, 2, 1, 2), (8, 8, 3, 1, 1, 8), (3, 16, 1, 1, 0, 1)])
def test_conv_gradients_match_masked_dense_reference(mode, topk, case):
    cin, cout, k, stride, pad, groups = case
    torch.manual_seed(4)
    conv = nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False)
    with torch.no_grad():
        conv.weight.copy_(_nonzero_randn(*conv.weight.shape))
    w = conv.weight.detach().clone()
    layer = swatify(nn.Sequential(conv), 0.6, mode, topk, block=4)[0].train()
    x = torch.randn(2, cin, 7, 6)
    g = torch.randn(F.conv2d(x, w, None, stride, pad, 1, groups).shape)
    got = _step(layer, x, g)
    w_s = torch.where(ref_block_mask(w.double(), 0.6, topk, 4), w, 0.0) if topk != "hw" else \
        topk_weight(w, 0.6, "hw", 4)
    x_s = torch.where(select_bits(x, 0.6, topk, drop_zeros=True).mask, x, 0.0)
    want = (F.conv2d(x, w_s if mode == "swat" else w, None, stride, pad, 1, groups),
            conv2d_input(x.shape, w_s, g, stride, pad, 1, groups),
            conv2d_weight(x_s, w.shape, g, stride, pad, 1, groups))
    for name, a, b in zip(("out", "grad_input", "grad_weight"), got, want):
        _close(a, b, (mode, topk, case, name))


@pytest.mark.parametrize("mode", ["swat", "saw"])
def test_linear_blocks_over_output_features(mode):
    torch.manual_seed(5)
    lin = nn.Linear(12, 8)
    with torch.no_grad():
        lin.weight.copy_(_nonzero_randn(8, 12))
    w = lin.weight.detach().clone()
    layer = swatify(nn.Sequential(lin), 0.7, mode, "chw", block=4, dense_output=False)[0].train()
    x, g = torch.randn(5, 12), torch.randn(5, 8)
    got = _step(layer, x, g)
    w_s = torch.where(ref_block_mask(w.double(), 0.7, "chw", 4), w, 0.0)
    x_s = torch.where(select_bits(x, 0.7, "chw", drop_zeros=True).mask, x, 0.0)
    want = (F.linear(x, w_s if mode == "swat" else w, lin.bias), g @ w_s, g.t() @ x_s)
    for name, a, b in zip(("out", "grad_input", "grad_weight"), got, want):
        _close(a, b, (mode, name))
    layer.eval()
    with torch.no_grad():
        expect = F.linear(x, w_s, lin.bias) if mode == "swat" else F.linear(x, w, lin.bias)
        _close(layer(x), expect, "eval")


def test_cached_weight_threshold_uses_block_scores():
    torch.manual_seed(6)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    layer = swatify(nn.Sequential(conv), 0.7, "swat", "chw", refresh_every=3, block=4,
                    cache_weight_threshold=True)[0].train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(2, 4, 5, 5)
    for step in range(5):
        sel = layer._swat_block_selection()
        scores = blocks.block_scores(layer.weight, 4)
        if step % 3 == 0:  # refresh: exact, thresholds are per block row on the score scale
            assert torch.equal(sel.mask, blocks.select_block(layer.weight, 0.7, "chw", 4).mask)
            assert layer.swat_weight_threshold.shape == (2,)
        else:
            t = layer.swat_weight_threshold.view(2, 1, 1, 1)
            assert torch.equal(sel.mask, ((scores >= t) & (scores != 0)).repeat_interleave(4, 0))
        assert block_pattern_violations(sel.mask, 4) == 0 and sel.count == int(sel.mask.sum())
        opt.zero_grad()
        layer(x).square().sum().backward()  # the step itself consumes a selection and advances the counter
        opt.step()


def test_activation_refresh_with_blocks_trains():
    torch.manual_seed(7)
    net = swatify(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4)), 0.7,
                  refresh_every=4, block=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    stats = layer_stats(net)
    assert all(st["weight_sparsity"] == pytest.approx(0.7, abs=0.02) for st in stats.values())
    assert net[0].swat_threshold is not None  # the activation threshold is cached, element-wise as before


# ------------------------------------------------------------------------ every model, budgets
@pytest.mark.parametrize("name", models.names())
def test_every_model_swatifies_with_block_4(name):
    torch.manual_seed(8)
    net = models.build(name, num_classes=10, in_channels=1, **models.small_input_cfg(name))
    swatify(net, 0.7, "swat", block=4)
    x = torch.rand(2, 1, 8, 8)
    net.train()
    F.cross_entropy(net(x), torch.tensor([1, 2])).backward()
    net.eval()
    with torch.no_grad():
        net(x)
    rows = {r["name"]: r for r in layer_table(net)}
    for lname, m in swat_layers(net):
        b = rows[lname]["block"]
        assert b == math.gcd(m.weight.shape[0], 4)
        mask = blocks.select_block(m.weight, m.swat_sparsity, m.swat_topk, b).mask if b > 1 else None
        if mask is None:
            continue
        assert block_pattern_violations(mask, b) == 0, lname
        assert rows[lname]["sparsity"] == 1.0 - int(mask.sum()) / mask.numel(), lname
        assert abs(rows[lname]["sparsity"] - 0.7) <= 0.5 * b / m.weight.numel() + 1e-12, lname


def test_erk_and_per_layer_overrides_claim_what_blocks_realise():
    torch.manual_seed(9)
    net = models.build("lenet5", num_classes=10, in_channels=1)
    swatify(net, 0.8, "swat", budget="erk", per_layer={"features.4": 0.5}, block=4)
    rows = {r["name"]: r for r in layer_table(net)}
    assert rows["features.4"]["train_sparsity"] == 0.5
    assert len({r["train_sparsity"] for r in rows.values()}) > 2  # ERK spreads the budget
    for lname, m in swat_layers(net):
        r = rows[lname]
        w = topk_weight(m.weight, r["train_sparsity"], "nchw", r["block"])
        assert r["sparsity"] == 1.0 - int((w != 0).sum()) / w.numel()  # claimed == realised, exactly
        assert block_pattern_violations(w, r["block"]) == 0
    conv1 = rows["features.0"]  # 6 outputs at block 4: blocks of 2, sparsity on the block grid
    assert conv1["block"] == 2
    rows_s = 6 // 2 * 25
    assert conv1["sparsity"] == 1.0 - keep_count(rows_s, conv1["train_sparsity"]) / rows_s


# ------------------------------------------------------------------------ formats
def test_block_size_of():
    torch.manual_seed(10)
    w = _nonzero_randn(32, 8, 3, 3)
    for b in (2, 4, 8, 16):
        assert block_size_of(topk_weight(w, 0.8, "nchw", b)) == b
        assert block_size_of(topk_weight(w, 0.8, "nchw", b).numpy()) == b
    assert block_size_of(topk_weight(w, 0.8, "nchw")) == 1  # unstructured
    assert block_size_of(w) == 1 and block_size_of(torch.zeros(8, 4)) == 1  # nothing to exploit
    wb = topk_weight(w, 0.8, "nchw", 4)
    assert block_size_of(wb[:31]) == 1  # 31 channels: no B divides them
    assert block_size_of(wb.reshape(32, -1).t().contiguous(), axis=1) == 4  # MatMul (I, O) layout
    broken = wb.clone()
    zero = (broken[0] == 0).nonzero()[0]
    broken[0][tuple(zero)] = 1.0
    assert block_size_of(broken) == 1 and block_pattern_violations(broken, 4) == 1


def test_prune_format_bsr_round_trip():
    torch.manual_seed(11)
    w = topk_weight(_nonzero_randn(64, 16, 3, 3), 0.7, "nchw", 4)
    fmt = choose_format(w)
    assert fmt == "bsr4x1"
    stored = to_format(w, fmt)
    tensors, header = stored.to_state("layer")
    assert header["block"] == [4, 1] and stored.nbytes < to_format(w, "csr").nbytes
    assert torch.equal(load_state(tensors, header, "layer").to_dense(), w)


# ------------------------------------------------------------------------ compact ONNX
def _conv_model(w: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["input", "W"], ["logits"], pads=[1, 1, 1, 1])
    shape = [None, w.shape[1], 6, 6]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, w.shape[0], 6, 6])],
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("fp16", [False, True])
def test_compact_export_of_blocks_is_smaller_and_exact(fp16):
    import onnxruntime as ort

    torch.manual_seed(12)
    dense = _nonzero_randn(256, 64, 3, 3)
    unstructured = topk_weight(dense, 0.7, "nchw").numpy()
    block = topk_weight(dense, 0.7, "nchw", 4).numpy()
    assert abs(np.count_nonzero(unstructured) - np.count_nonzero(block)) <= 4  # same sparsity
    sizes, x = {}, np.random.default_rng(0).random((2, 64, 6, 6), dtype=np.float32)
    for name, w in (("unstructured", unstructured), ("block", block)):
        model = _conv_model(w)
        ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        chosen = onnx_compact.encode(model, fp16=fp16)
        assert chosen["W"].startswith("blockmask" if name == "block" else "bitmask")
        onnx.checker.check_model(model, full_check=True)
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-2 if fp16 else 1e-6, atol=1e-2 if fp16 else 1e-5)
        decoded = onnx_compact.decode_weights(model)["W"]
        want = w.astype(np.float16).astype(np.float32) if fp16 else w
        assert decoded.format == chosen["W"] and np.array_equal(decoded.value, want)
        sizes[name] = model.ByteSize()
    mask_bytes = dense.numel() // 8
    assert sizes["block"] < sizes["unstructured"] - 0.7 * mask_bytes  # 1 bit per 4 entries instead of 1 each


def test_decode_follows_the_graph_when_a_block_bit_is_flipped():
    import onnxruntime as ort

    torch.manual_seed(13)
    w = topk_weight(_nonzero_randn(64, 16, 3, 3), 0.5, "nchw", 4).numpy()
    model = _conv_model(w)
    assert onnx_compact.encode(model)["W"] == "blockmask"
    inits = {t.name: t for t in model.graph.initializer}
    bits = numpy_helper.to_array(inits[onnx_compact.BLK_BITS]).copy()
    first = int(np.flatnonzero(np.unpackbits(bits))[0])
    bits[first // 8] ^= np.uint8(0x80 >> (first % 8))  # a kept group dropped, values not touched
    inits[onnx_compact.BLK_BITS].CopyFrom(numpy_helper.from_array(bits, onnx_compact.BLK_BITS))
    decoded = onnx_compact.decode_weights(model)["W"].value
    assert not np.array_equal(decoded, w) and block_size_of(decoded) == 4
    x = np.random.default_rng(1).random((1, 16, 6, 6), dtype=np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(decoded), padding=1).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)  # the decoder computes what the graph does


# ------------------------------------------------------------------------ CLI, prune, verify
swat = invoke_swat  # the real command, in process


@pytest.fixture(scope="module")
def block_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("block") / "b4"
    r = swat("train", "--model", "lenet5", "--dataset", "digits", "--mode", "swat", "--sparsity", "0.7",
             "--epochs", "2", "--seed", "0", "--block", "4", "--out", str(run))
    assert r.returncode == 0, r.stdout + r.stderr
    return run


def test_cli_block_run_json_and_resume(block_run: Path):
    meta = json.loads((block_run / "run.json").read_text())
    assert meta["block"] == 4 and meta["config"]["block"] == 4
    assert {l["name"]: l["block"] for l in meta["layers"]} == {
        "features.0": 2, "features.4": 4, "features.8": 4, "classifier.0": 4, "classifier.2": 2}
    assert meta["layers"][0]["sparsity"] == pytest.approx(1 - 23 / 75)  # 6x1x5x5 in blocks of 2
    r = swat("train", "--resume", str(block_run), "--block", "2")
    assert r.returncode == 2 and "--block 4" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Example:" in swat("train", "--help").stdout and "--block" in swat("train", "--help").stdout


def test_cli_bad_block_is_one_line(tmp_path: Path):
    r = swat("train", "--block", "3", "--epochs", "1", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "power of two" in r.stderr and "Traceback" not in r.stderr
    r = swat("train", "--block", "4", "--mode", "meprop", "--epochs", "1", "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "--block 1" in r.stderr


def test_prune_stores_bsr_and_export_verify_pass(block_run: Path):
    from swat_deploy.prune import load_sparse, prune

    r = swat("prune", str(block_run))
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[0].split()
    assert "block" in header
    table = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:6]}
    assert table["features.8"][3] == "4" and table["features.8"][4] == "bsr4x1"
    assert table["features.0"][3] == "2" and table["features.0"][4] == "bsr2x1"
    sm, back = prune(block_run), load_sparse(block_run / "sparse.safetensors")
    for name, w in sm.weights().items():
        assert torch.equal(back.weights()[name], w)
    assert swat("export", str(block_run), "--format", "onnx").returncode == 0
    r = swat("verify", str(block_run), "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["passed"], [c for c in report["checks"] if not c["passed"]]
    assert report["block"] == 4
    assert {l["name"]: l["block"] for l in report["layers"]}["features.8"] == 4
    rows = [c for c in report["checks"] if c["check"].startswith("block ")]
    assert len(rows) >= 5 and all(c["passed"] for c in rows)


def test_verify_fails_when_one_weight_breaks_the_block_pattern(block_run: Path, tmp_path: Path):
    from swat_deploy.export import torch_to_onnx, write_onnx
    from swat_deploy.prune import prune
    from swat_deploy.verify import verify

    sm = prune(block_run)
    w = sm.module.net.get_submodule("features.8").weight
    with torch.no_grad():
        zero = (w[1] == 0).nonzero()[0]
        w[1][tuple(zero)] = 1e-3  # one weight of one group: the other 3 channels keep it zero
    path = write_onnx(torch_to_onnx(sm), sm, tmp_path / "broken.onnx")
    report = verify(block_run, path, backend=False)
    failed = [c.check for c in report.checks if not c.passed]
    assert "block 4x1 pattern features.8" in failed and not report.passed
    assert [c for c in failed if c.startswith(("block", "sparsity"))] == ["block 4x1 pattern features.8"]
