"""Proof that the SWAT training core does what the paper (sections 2-3, appendix A) says.

Every layer-level check compares against an *independent* reference: masks come from a
stable sort (not the kth-value / radix code under test), outputs and gradients from masked
dense ``F.conv2d`` / ``F.linear`` and ``torch.nn.grad.conv2d_input`` / ``conv2d_weight``.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

import models
from training import memory
from training.budget import layer_sparsities
from training.batchnorm import SwatBatchNorm2d
from training.memory import SwatMaxPool2d, SwatReLU, saved_bytes, saved_tensors
from training.swatify import (SwatConv2d, SwatLinear, layer_stats, load_swat_state_dict, output_layer,
                              swat_layers, swat_state_dict, swatify, unswatify)
from training.topk import keep_count, kth_magnitude, select_bits
from training.weight_topk import topk_weight


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------ references
def ref_k(n: int, s: float) -> int:
    return min(n, max(1, int(math.floor((1 - s) * n + 0.5)))) if n else 0


def ref_groups(shape: tuple[int, ...], topk: str) -> int:
    if topk == "nchw" or len(shape) < 2:
        return 1
    if topk == "chw" or len(shape) == 2:
        return shape[0]
    return shape[0] * shape[1]


def ref_counts(a: torch.Tensor, s: float, topk: str, ndim: int) -> list[int]:
    """Per-group kept counts of the (G, m) magnitudes ``a``; hw on 3+-dim tensors keeps the
    layer's total count: b = max(1, K // G) each, the rest to the largest (b+1)-th magnitudes."""
    G, m = a.shape
    k, total = ref_k(m, s), ref_k(G * m, s)
    if topk != "hw" or ndim < 3 or abs(G * k - total) <= 0.005 * total:
        return [k] * G
    base = min(m, max(1, total // G))
    extra = max(0, min(G, total - base * G)) if base < m else 0
    nxt = [sorted(a[g].tolist(), reverse=True)[base] if base < m else 0.0 for g in range(G)]
    winners = set(sorted(range(G), key=lambda g: (-nxt[g], g))[:extra])
    return [base + (g in winners) for g in range(G)]


def ref_mask(x: torch.Tensor, s: float, topk: str, drop_zeros: bool = False) -> torch.Tensor:
    """Stable sort by descending magnitude; ties go to the lowest flat index."""
    G = ref_groups(tuple(x.shape), topk)
    a = x.detach().abs().reshape(G, -1)
    counts = ref_counts(a, s, topk, x.dim())
    order = torch.sort(a, dim=1, descending=True, stable=True).indices
    m = torch.zeros_like(a, dtype=torch.bool)
    for g, k in enumerate(counts):
        m[g, order[g, :k]] = True
    m = m.view(x.shape)
    return m & (x != 0) if drop_zeros else m


def ref_kth(x: torch.Tensor, s: float, topk: str) -> torch.Tensor:
    """Each group's smallest kept magnitude (the threshold), flat over groups."""
    G = ref_groups(tuple(x.shape), topk)
    a = x.detach().abs().reshape(G, -1)
    vals = torch.sort(a, 1, descending=True).values
    return torch.stack([vals[g, k - 1] for g, k in enumerate(ref_counts(a, s, topk, x.dim()))])


def _backends():
    return (["native"] if memory.packing.native_available() else []) + ["numba", "torch"]


CONV_CASES = [
    # (cin, cout, kernel, stride, padding, dilation, groups, bias)
    (4, 6, 3, 2, 1, 1, 1, True),
    (4, 6, 3, 1, 2, 2, 2, False),
    (4, 8, (3, 1), (2, 1), (0, 1), 1, 4, True),
]


# ------------------------------------------------------------------------ Top-K
def test_keep_count_rounds_half_up_and_keeps_one():
    assert keep_count(10, 0.7) == 3
    assert keep_count(5, 0.5) == 3          # 2.5 -> 3 (half up, not banker's)
    assert keep_count(3, 0.9) == 1          # never a dead group
    assert keep_count(0, 0.5) == 0
    assert keep_count(7, 0.0) == 7
    with pytest.raises(ValueError, match="sparsity"):
        keep_count(10, 1.5)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("topk", ["nchw", "chw", "hw"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 10), (2, 3, 40, 40)])
def test_topk_keeps_exactly_k_per_group_with_lowest_index_ties(backend, topk, shape):
    g = torch.Generator().manual_seed(1)
    # few distinct magnitudes (many ties) and both signs; the 40x40 case exercises the radix path
    x = torch.randint(-4, 5, shape, generator=g).float() * 0.25
    for s in (0.3, 0.7, 0.9):
        with memory.use_backend(backend):
            sel = select_bits(x, s, topk)
            mask = sel.mask
        ref = ref_mask(x, s, topk)
        assert torch.equal(mask, ref), (topk, s)
        G = ref_groups(shape, topk)
        per_group = mask.reshape(G, -1).sum(1)
        counts = ref_counts(x.abs().reshape(G, -1), s, topk, x.dim())
        assert per_group.tolist() == counts
        if topk == "hw" and x.dim() >= 3 and ref_k(x.numel(), s) >= G:  # balanced: the layer's count
            assert sel.count == ref_k(x.numel(), s)
        assert sel.count == int(ref.sum())


@pytest.mark.parametrize("backend", _backends())
def test_drop_zeros_never_keeps_zeros_and_thresholds_are_kth(backend):
    x = torch.relu(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)))
    with memory.use_backend(backend):
        sel = select_bits(x, 0.3, "chw", drop_zeros=True)   # keeps 70% > the ~50% non-zeros
        assert torch.equal(sel.mask, ref_mask(x, 0.3, "chw", drop_zeros=True))
        assert sel.count == int((x != 0).sum())
        big = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(3))
        thr = kth_magnitude(big, 0.6, "hw")
    assert torch.equal(thr, ref_kth(big, 0.6, "hw").view(3, 4))


def test_every_backend_agrees_on_compact_storage():
    x = torch.randn(3, 5, 7, 9, generator=torch.Generator().manual_seed(4))
    out = {}
    for b in _backends():
        with memory.use_backend(b):
            sel = select_bits(x, 0.7, "hw")
            vals = memory.compact(x, sel.bits, sel.count)
            dense = memory.expand(vals, sel.bits, x.shape)
            g = memory.masked_grad(x * 2, sel.bits)
        out[b] = (sel.bits, vals, dense, g)
        assert torch.equal(dense, torch.where(ref_mask(x, 0.7, "hw"), x, 0.0))
        assert torch.equal(g, torch.where(ref_mask(x, 0.7, "hw"), 2 * x, 0.0))
    for name in out:
        for a, b in zip(out[name], out["torch"]):
            assert torch.equal(a, b), name


def test_topk_weight_uses_the_training_tie_rule():
    w = torch.randint(-3, 4, (8, 4, 3, 3), generator=torch.Generator().manual_seed(5)).float()
    for topk in ("nchw", "chw", "hw"):
        assert torch.equal(topk_weight(w, 0.7, topk), torch.where(ref_mask(w, 0.7, topk), w, 0.0))
    # random: weights fall back to magnitude nchw (a random weight mask cannot be pruned to)
    assert torch.equal(topk_weight(w, 0.7, "random"), topk_weight(w, 0.7, "nchw"))
    # the layer's forward weight is the same tensor pruning reproduces
    conv = swatify(nn.Sequential(nn.Conv2d(4, 8, 3)), 0.7, topk="chw")[0]
    with torch.no_grad():
        conv.weight.copy_(w)
    conv.train()
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    assert torch.allclose(conv(x), F.conv2d(x, topk_weight(w, 0.7, "chw"), conv.bias), atol=1e-5)


def test_random_keeps_same_count_and_is_reproducible():
    x = torch.randn(4, 6, 5, 5)
    a = select_bits(x, 0.7, "random", generator=torch.Generator().manual_seed(0))
    b = select_bits(x, 0.7, "random", generator=torch.Generator().manual_seed(0))
    c = select_bits(x, 0.7, "random", generator=torch.Generator().manual_seed(1))
    assert a.count == ref_k(x.numel(), 0.7) == int(a.mask.sum())
    assert torch.equal(a.mask, b.mask) and not torch.equal(a.mask, c.mask)
    assert not torch.equal(a.mask, ref_mask(x, 0.7, "nchw"))  # not magnitude
    per = select_bits(x, 0.7, "random", generator=torch.Generator().manual_seed(0), group="chw")
    assert torch.all(per.mask.reshape(4, -1).sum(1) == ref_k(150, 0.7))
    with pytest.raises(ValueError, match="nchw, chw or hw"):
        kth_magnitude(x, 0.7, "random")


# ------------------------------------------------------------------------ layer numerics
def _step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    out.backward(g)
    gb = layer.bias.grad if layer.bias is not None else None
    return out.detach(), x.grad, layer.weight.grad, gb


def _conv_ref(mode, topk, s, x, w, b, g, geo):
    stride, padding, dilation, groups = geo
    wt = "nchw" if topk == "random" else topk
    w_s = torch.where(ref_mask(w, s, wt), w, 0.0)
    if mode == "meprop":
        grp = "hw" if topk == "hw" else "chw"
        gs = torch.where(ref_mask(g, s, grp), g, 0.0)
        out = F.conv2d(x, w, b, stride, padding, dilation, groups)
        gi = conv2d_input(x.shape, w, gs, stride, padding, dilation, groups)
        gw = conv2d_weight(x, w.shape, gs, stride, padding, dilation, groups)
        return out, gi, gw, gs.sum((0, 2, 3))
    x_s = torch.where(ref_mask(x, s, topk, drop_zeros=True), x, 0.0)
    out = F.conv2d(x, w_s if mode == "swat" else w, b, stride, padding, dilation, groups)
    gi = conv2d_input(x.shape, w_s, g, stride, padding, dilation, groups)
    gw = conv2d_weight(x_s, w.shape, g, stride, padding, dilation, groups)
    return out, gi, gw, g.sum((0, 2, 3))


def _close(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (what, (a - b).abs().max())


@pytest.mark.parametrize("mode", ["swat", "saw", "meprop"])
@pytest.mark.parametrize("topk", ["nchw", "chw", "hw"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matches_reference(mode, topk, case):
    cin, cout, k, stride, padding, dilation, groups, bias = case
    torch.manual_seed(6)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias)
    ref_w, ref_b = conv.weight.detach().clone(), (conv.bias.detach().clone() if bias else None)
    # a one-layer net: its only layer is the output layer, which meProp otherwise keeps dense
    net = swatify(nn.Sequential(conv), 0.6, mode, topk, dense_output=False).train()
    layer = net[0]
    assert isinstance(layer, SwatConv2d)
    x = torch.randn(3, cin, 9, 8)
    out_shape = F.conv2d(x, ref_w, ref_b, stride, padding, dilation, groups).shape
    g = torch.randn(out_shape)
    got = _step(layer, x, g)
    want = _conv_ref(mode, topk, 0.6, x, ref_w, ref_b, g, (stride, padding, dilation, groups))
    for name, a, b in zip(("out", "grad_input", "grad_weight", "grad_bias"), got, want if bias else want[:3] + (None,)):
        _close(a, b, (mode, topk, name))


@pytest.mark.parametrize("mode", ["swat", "saw", "meprop"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_reference(mode, bias):
    torch.manual_seed(7)
    lin = nn.Linear(12, 5, bias=bias)
    w, b = lin.weight.detach().clone(), (lin.bias.detach().clone() if bias else None)
    layer = swatify(nn.Sequential(lin), 0.7, mode, "chw", dense_output=False)[0].train()
    assert isinstance(layer, SwatLinear)
    x = torch.randn(6, 12)
    g = torch.randn(6, 5)
    got = _step(layer, x, g)
    w_s = torch.where(ref_mask(w, 0.7, "chw"), w, 0.0)
    if mode == "meprop":
        gs = torch.where(ref_mask(g, 0.7, "chw"), g, 0.0)
        want = (F.linear(x, w, b), gs @ w, gs.t() @ x, gs.sum(0))
    else:
        x_s = torch.where(ref_mask(x, 0.7, "chw", drop_zeros=True), x, 0.0)
        want = (F.linear(x, w_s if mode == "swat" else w, b), g @ w_s, g.t() @ x_s, g.sum(0))
    for name, a, r in zip(("out", "grad_input", "grad_weight", "grad_bias"), got, want if bias else want[:3] + (None,)):
        _close(a, r, (mode, name))


def test_linear_with_leading_dims_and_float64_torch_path():
    torch.manual_seed(8)
    lin = nn.Linear(6, 4).double()
    w = lin.weight.detach().clone()
    layer = swatify(nn.Sequential(lin), 0.5, "swat", "nchw")[0].train()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    g = torch.randn(2, 3, 4, dtype=torch.float64)
    out, gi, gw, gb = _step(layer, x, g)
    w_s = torch.where(ref_mask(w, 0.5, "nchw"), w, 0.0)
    x_s = torch.where(ref_mask(x, 0.5, "nchw", drop_zeros=True), x, 0.0)
    _close(out, F.linear(x, w_s, lin.bias.detach()), "out")
    _close(gi, g @ w_s, "gi")
    _close(gw, g.reshape(-1, 4).t() @ x_s.reshape(-1, 6), "gw")
    _close(gb, g.reshape(-1, 4).sum(0), "gb")


@pytest.mark.parametrize("mode", ["swat", "saw"])
def test_random_draws_weights_and_activations_among_all_entries(mode):
    torch.manual_seed(9)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    w = conv.weight.detach().clone()
    layer = swatify(nn.Sequential(conv), 0.7, mode, "random")[0].train()
    x = torch.relu(torch.randn(2, 3, 6, 6))  # ~half zeros: the draw must not favour the non-zeros
    g = torch.randn(2, 4, 6, 6)
    out, gi, gw, _ = _step(layer, x, g)
    st = layer_stats(nn.Sequential(layer))["0"]
    # the weight mask is a random k-subset: same count as Top-K, not the magnitude one
    assert st["weight_sparsity_train_mean"] == pytest.approx(1 - ref_k(w.numel(), 0.7) / w.numel())
    w_mag = torch.where(ref_mask(w, 0.7, "nchw"), w, 0.0)
    assert not torch.allclose(gi, conv2d_input(x.shape, w_mag, g, padding=1))
    # k of all entries drawn, zeros among them not stored: about (1 - s) of the non-zeros survive
    nz = int((x != 0).sum())
    kept = (1 - st["act_sparsity"]) * x.numel()
    assert 0.1 * nz < kept < 0.55 * nz
    assert not torch.allclose(gw, conv2d_weight(x, w.shape, g, padding=1))
    x_mag = torch.where(ref_mask(x, 0.7, "nchw", drop_zeros=True), x, 0.0)
    assert not torch.allclose(gw, conv2d_weight(x_mag, w.shape, g, padding=1))
    # the eval / pruned form stays the magnitude Top-K (a per-step random mask has none)
    layer.eval()
    if mode == "swat":
        torch.testing.assert_close(layer(x), F.conv2d(x, w_mag, conv.bias, padding=1))


def test_eval_mode_is_topk_weight_forward_without_activation_work():
    torch.manual_seed(10)
    net = swatify(nn.Sequential(nn.Conv2d(3, 4, 3)), 0.7, "swat", "hw").eval()
    x = torch.randn(2, 3, 6, 6)
    expect = F.conv2d(x, topk_weight(net[0].weight, 0.7, "hw"), net[0].bias)
    assert torch.allclose(net(x), expect, atol=1e-6)
    assert net[0].swat_step == 0 and net[0].swat_threshold is None
    saw = swatify(nn.Sequential(nn.Conv2d(3, 4, 3)), 0.7, "saw").eval()
    assert torch.allclose(saw(x), F.conv2d(x, saw[0].weight, saw[0].bias), atol=1e-6)


# ------------------------------------------------------------------------ threshold caching
@pytest.mark.parametrize("topk", ["nchw", "chw", "hw"])
def test_refresh_every_reuses_threshold_and_records_density(topk):
    torch.manual_seed(11)
    s, N = 0.7, 3
    conv = nn.Conv2d(4, 5, 3, padding=1, bias=False)
    w = conv.weight.detach().clone()
    layer = swatify(nn.Sequential(conv), s, "saw", topk, refresh_every=N)[0].train()
    exact = swatify(nn.Sequential(copy.deepcopy(conv)), s, "saw", topk, refresh_every=1)[0].train()
    thr = None
    densities = []
    for step in range(7):
        x = torch.randn(3, 4, 6, 6) * (1 + 0.3 * step)   # scale drifts: cached density must drift
        g = torch.randn(3, 5, 6, 6)
        _, _, gw, _ = _step(layer, x, g)
        _, _, gw_exact, _ = _step(exact, x, g)
        exact_x = torch.where(ref_mask(x, s, topk, drop_zeros=True), x, 0.0)
        _close(gw_exact, conv2d_weight(exact_x, w.shape, g, padding=1), "refresh_every=1 is exact Top-K")
        if step % N == 0:
            mask = ref_mask(x, s, topk, drop_zeros=True)
            kth = ref_kth(x, s, topk)
            thr = kth.view(3, 4).mean(0) if topk == "hw" else kth.mean()
            assert torch.allclose(layer.swat_threshold, thr)
            _close(gw, gw_exact, "refresh step equals exact")
        else:
            t = thr.view(1, -1, 1, 1) if topk == "hw" else thr
            mask = (x.abs() >= t) & (x != 0)
            assert not torch.allclose(gw, gw_exact)   # the cache really was used
        _close(gw, conv2d_weight(torch.where(mask, x, 0.0), w.shape, g, padding=1), f"step {step}")
        st = layer_stats(nn.Sequential(layer))["0"]
        assert st["act_sparsity"] == pytest.approx(1 - mask.float().mean().item())
        densities.append(1 - st["act_sparsity"])
    assert max(densities) - min(densities) > 0.05          # drift is visible in the records
    assert exact.swat_step == layer.swat_step == 7


def test_cached_threshold_keeps_the_kth_entry_itself():
    # |x| >= t, not > t: on the very input it was computed from, the cache reproduces Top-K
    torch.manual_seed(20)
    x = torch.randn(2, 3, 5, 5)
    for backend in _backends():
        with memory.use_backend(backend):
            exact = select_bits(x, 0.7, "nchw")
            cached = select_bits(x, 0.7, "nchw", threshold=exact.thresholds)
        assert torch.equal(cached.mask, ref_mask(x, 0.7, "nchw")), backend
        assert cached.count == ref_k(x.numel(), 0.7)


def test_post_relu_input_does_not_keep_everything():
    torch.manual_seed(12)
    layer = swatify(nn.Sequential(nn.Conv2d(3, 2, 1, bias=False)), 0.2, "swat", "nchw", refresh_every=4)[0].train()
    w = layer.weight.detach().clone()
    for step in range(3):
        x = torch.relu(torch.randn(4, 3, 5, 5))          # ~50% zeros > the 20% dropped: K-th value is 0
        g = torch.randn(4, 2, 5, 5)
        _, _, gw, _ = _step(layer, x, g)
        nz = x != 0
        _close(gw, conv2d_weight(torch.where(nz, x, 0.0), w.shape, g), "kept = non-zeros")
        st = layer_stats(nn.Sequential(layer))["0"]
        assert st["act_sparsity"] == pytest.approx(1 - nz.float().mean().item())   # not 0.0
        assert float(layer.swat_threshold) == 0.0


# ------------------------------------------------------------------------ state
class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = self.pool(self.relu(self.bn(self.conv1(x))))
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


@pytest.mark.parametrize("topk", ["hw", "random"])
def test_swat_state_round_trips_through_safetensors(tmp_path, topk):
    from safetensors.torch import load_file, save_file
    torch.manual_seed(13)
    a = swatify(_Small(), 0.7, "swat", topk, refresh_every=5).train()
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(a(torch.rand(4, 3, 8, 8)), torch.randint(0, 5, (4,))).backward()
        opt.step()
    save_file(swat_state_dict(a), str(tmp_path / "s.safetensors"))
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(tmp_path / "w.safetensors"))
    b = swatify(_Small(), 0.7, "swat", topk, refresh_every=5).train()
    b.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    load_swat_state_dict(b, load_file(str(tmp_path / "s.safetensors")))
    fresh = swatify(copy.deepcopy(b), 0.7, "swat", topk, refresh_every=5).train()  # no SWAT state
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 5, (4,))
    grads = []
    for net in (a, b, fresh):
        net.zero_grad()
        out = net(x)
        F.cross_entropy(out, y).backward()
        grads.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(p, q) for p, q in zip(grads[0][1], grads[1][1]))
    # without the state the step differs (cached threshold / RNG), so the test can fail
    assert not all(torch.equal(p, q) for p, q in zip(grads[0][1], grads[2][1]))
    with pytest.raises(ValueError, match="does not fit"):
        load_swat_state_dict(b, {"nope.swat_step": torch.tensor(1)})


# ------------------------------------------------------------------------ gradcheck
def _with_weight(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Call ``layer`` with ``w`` as its weight so gradcheck can differentiate w.r.t. it."""
    saved = layer._parameters["weight"]
    layer._parameters["weight"] = w          # a non-leaf stand-in for the parameter
    try:
        return layer(x)
    finally:
        layer._parameters["weight"] = saved


def test_gradcheck_swat_input_and_bias():
    # swat: forward conv(x, TopK(W)); backward grad_input from TopK(W) is the exact derivative
    torch.manual_seed(14)
    conv = swatify(nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1).double()), 0.6, "swat")[0].train()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_: conv(x_), (x,))
    b = conv.bias.detach().clone().requires_grad_(True)

    def with_bias(b_):
        saved = conv._parameters["bias"]
        conv._parameters["bias"] = b_
        try:
            return conv(x.detach())
        finally:
            conv._parameters["bias"] = saved
    assert torch.autograd.gradcheck(with_bias, (b,))


@pytest.mark.parametrize("cls", ["conv", "linear"])
def test_gradcheck_saw_on_presparsified_tensors(cls):
    # TopK of an already s-sparse tensor is the identity, so SAW's gradients are exact
    torch.manual_seed(15)
    if cls == "conv":
        m = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2).double()
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    else:
        m = nn.Linear(6, 3).double()
        x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        m.weight.mul_(ref_mask(m.weight, 0.5, "nchw"))
        x.mul_(ref_mask(x, 0.5, "nchw"))
    layer = swatify(nn.Sequential(m), 0.5, "saw")[0].train()
    w = m.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_, w_: _with_weight(layer, x_, w_), (x.requires_grad_(True), w))


@pytest.mark.parametrize("mode", ["swat", "saw", "meprop"])
def test_gradcheck_every_mode_at_sparsity_zero(mode):
    torch.manual_seed(16)
    layer = swatify(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1).double()), 0.0, mode, dense_output=False)[0].train()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x_, w_: _with_weight(layer, x_, w_), (x, w))


@pytest.mark.parametrize("inplace", [False, True])
def test_gradcheck_mask_saving_relu_and_maxpool(inplace):
    relu, pool = SwatReLU(inplace=inplace), SwatMaxPool2d(3, stride=2, padding=1)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_: pool(relu(x_ * 1.0)), (x,))
    pool2 = SwatMaxPool2d(2, dilation=2, ceil_mode=True)
    assert torch.autograd.gradcheck(lambda x_: pool2(relu(x_ * 1.0)), (x,))


# ------------------------------------------------------------------------ swatify surgery
def test_swatify_keeps_types_keys_and_unswatify_restores():
    torch.manual_seed(17)
    net = _Small()
    keys = list(net.state_dict().keys())
    swatify(net, 0.7, "swat", "chw", refresh_every=2)
    assert isinstance(net.conv1, nn.Conv2d) and isinstance(net.conv1, SwatConv2d)
    assert isinstance(net.fc, nn.Linear) and isinstance(net.fc, SwatLinear)
    assert isinstance(net.relu, SwatReLU) and isinstance(net.pool, SwatMaxPool2d)
    assert isinstance(net.bn, nn.BatchNorm2d) and isinstance(net.bn, SwatBatchNorm2d)  # dense, compiled passes
    assert list(net.state_dict().keys()) == keys
    assert [n for n, _ in swat_layers(net)] == ["conv1", "conv2", "fc"]
    net.train()(torch.rand(2, 3, 8, 8)).sum().backward()
    unswatify(net)
    assert {type(m) for m in net.modules()} == {_Small, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Linear}
    assert not any(k.startswith("_swat") or k.startswith("swat") for m in net.modules() for k in vars(m))
    assert list(net.state_dict().keys()) == keys


def test_exclude_globs_and_per_layer():
    net = swatify(models.build("resnet20"), 0.7, exclude=["conv1", "layer3.*"], per_layer={"fc": 0.5})
    names = dict(swat_layers(net))
    assert "conv1" not in names and type(net.conv1) is nn.Conv2d
    assert not any(n.startswith("layer3.") for n in names)
    assert names["fc"].swat_sparsity == 0.5 and names["layer1.0.conv1"].swat_sparsity == 0.7
    with pytest.raises(ValueError, match="matches no module"):
        swatify(models.build("resnet20"), 0.7, exclude=["nonexistent*"])
    with pytest.raises(ValueError, match="excluded"):
        swatify(models.build("resnet20"), 0.7, exclude=["fc"], per_layer={"fc": 0.5})


@pytest.mark.parametrize("kwargs, words", [
    (dict(mode="sparse"), ["dense", "swat", "saw", "meprop"]),
    (dict(topk="cw"), ["nchw", "chw", "hw", "random"]),
    (dict(budget="magic"), ["uniform", "erk"]),
    (dict(sparsity=1.0), ["sparsity", "[0, 1)"]),
    (dict(sparsity=-0.1), ["sparsity"]),
    (dict(refresh_every=0), ["refresh_every", ">= 1"]),
])
def test_invalid_arguments_raise_value_error_naming_choices(kwargs, words):
    net = _Small()
    keys = {k: type(m) for k, m in net.named_modules()}
    args = dict(sparsity=0.7) | kwargs
    with pytest.raises(ValueError) as err:
        swatify(net, **args)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert {k: type(m) for k, m in net.named_modules()} == keys   # a bad call changes nothing


def test_dense_mode_takes_the_stock_path():
    net = swatify(_Small(), 0.7, "dense").train()
    assert type(net.relu) is nn.ReLU
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = net.conv1(x)
    assert type(out.grad_fn).__name__ == "ConvolutionBackward0"     # no Python autograd Function
    assert type(net.fc(torch.rand(2, 32, requires_grad=True)).grad_fn).__name__ == "AddmmBackward0"
    assert net.conv1.swat_step == 0



# ------------------------------------------------------------------------ meProp's output layer
def test_meprop_keeps_the_output_layer_dense_so_logit_grads_are_exact():
    """Softmax-CE's logit gradient sums to 0 over classes; Top-K of it does not (the divergence
    cause, see training.swatify).  With the output layer dense, its grads equal the dense model's."""
    torch.manual_seed(21)
    base = models.build("lenet5", num_classes=10, in_channels=1).train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    grads = {}
    for tag, net in (("dense", copy.deepcopy(base)), ("meprop", swatify(copy.deepcopy(base), 0.7, "meprop"))):
        F.cross_entropy(net(x), y).backward()
        grads[tag] = {n: p.grad.clone() for n, p in net.named_parameters()}
        if tag == "meprop":
            assert type(net.classifier[2]) is nn.Linear                       # plain, not converted
            assert [n for n, _ in swat_layers(net)] == ["features.0", "features.4", "features.8", "classifier.0"]
    d, m = grads["dense"], grads["meprop"]
    assert abs(float(m["classifier.2.bias"].sum())) < 1e-5                     # sum_c (p_c - onehot_c) = 0
    _close(m["classifier.2.weight"], d["classifier.2.weight"], "output W grad")
    _close(m["classifier.2.bias"], d["classifier.2.bias"], "output b grad")
    assert not torch.allclose(m["classifier.0.weight"], d["classifier.0.weight"])  # hidden layers: meProp'd


def test_dense_output_option_and_its_errors():
    net = models.build("lenet5", num_classes=10, in_channels=1)
    assert "classifier.2" in dict(swat_layers(swatify(net, 0.7, "meprop", dense_output=False)))
    assert "classifier.2" in dict(swat_layers(swatify(net, 0.7, "swat")))        # swat / saw: unchanged
    assert "classifier.2" not in dict(swat_layers(swatify(net, 0.7, "saw", dense_output=True)))
    with pytest.raises(ValueError, match="dense_output=False"):
        swatify(net, 0.7, "meprop", per_layer={"classifier.2": 0.5})
    with pytest.raises(ValueError, match="dense_output"):
        swatify(net, 0.7, "meprop", dense_output="yes")


@pytest.mark.parametrize("name", models.names())
def test_output_layer_is_what_the_model_returns(name):
    with torch.device("meta"):  # shapes only: no weights, no arithmetic
        net = models.build(name, num_classes=10, in_channels=3, **models.small_input_cfg(name)).eval()
    seen = {}
    dict(net.named_modules())[output_layer(net)].register_forward_hook(lambda _m, _i, o: seen.setdefault("o", o))
    assert net(torch.empty(2, 3, 32, 32, device="meta")) is seen["o"]


def test_meprop_70_learns_digits_well_above_chance(tmp_path):
    """Before the output layer was kept dense this run stayed near chance (0.27 here; 0.075 at 5 epochs)."""
    from training.config import TrainConfig
    from training.launch import train

    cfg = TrainConfig(dataset="digits", model="lenet5", mode="meprop", sparsity=0.7, epochs=3, seed=0)
    res = train(cfg, tmp_path / "run", log=lambda line: None, progress=False)
    assert res.test_accuracy >= 0.8, res.test_accuracy


# ------------------------------------------------------------------------ budget
def test_erk_budget_matches_target_and_spares_small_layers():
    net = models.build("resnet20")
    for s in (0.5, 0.7, 0.9):
        plan = layer_sparsities(net, s, "erk")
        params = dict(net.named_modules())
        numel = {n: params[n].weight.numel() for n in plan}
        overall = sum(plan[n] * numel[n] for n in plan) / sum(numel.values())
        assert overall == pytest.approx(s, abs=1e-6)
        big = max(plan, key=numel.get)
        assert plan["conv1"] < plan[big] and plan["fc"] < plan[big]
        assert all(0.0 <= v < 1.0 for v in plan.values())
    uni = layer_sparsities(net, 0.7, "uniform")
    assert set(uni.values()) == {0.7}
    sw = swatify(models.build("resnet20"), 0.9, budget="erk")
    assert dict(swat_layers(sw))["conv1"].swat_sparsity == pytest.approx(layer_sparsities(net, 0.9, "erk")["conv1"])


# ------------------------------------------------------------------------ memory
class _Block(nn.Module):
    """Conv-BN-ReLU x2 + max-pool: the shape of block whose memory the issue asks about."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.body(x)


def test_relu_and_maxpool_save_compact_state_and_match_plain_numerics():
    torch.manual_seed(18)
    plain = _Block().train()
    # saw at sparsity 0: the conv numerics are the plain ones, so any difference is ReLU / pool
    sw = swatify(copy.deepcopy(plain), 0.0, "saw").train()
    assert sum(isinstance(m, SwatReLU) for m in sw.modules()) == 3
    x, y = torch.rand(4, 3, 12, 12), torch.randint(0, 10, (4,))
    for net in (plain, sw):
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
    for (n, p), q in zip(plain.named_parameters(), sw.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n
    # what the ReLUs and the pool keep: 1 bit / element and 1 byte / pooled output
    relu_only = nn.Sequential(SwatReLU()).train()
    recs = saved_tensors(relu_only, torch.randn(2, 4, 6, 6, requires_grad=True), lambda o: o.sum())
    assert [(r.dtype, r.nbytes) for r in recs] == [(torch.uint8, 2 * 4 * 6 * 6 // 8)]
    pool_only = nn.Sequential(SwatMaxPool2d(2)).train()
    recs = saved_tensors(pool_only, torch.randn(2, 4, 6, 6, requires_grad=True), lambda o: o.sum())
    assert [(r.dtype, r.nbytes) for r in recs] == [(torch.uint8, 2 * 4 * 3 * 3)]


def test_saved_bytes_of_block_and_resnet20_at_70_percent():
    torch.manual_seed(19)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    block = _Block()
    ratio_block = saved_bytes(swatify(copy.deepcopy(block), 0.7), x, y) / saved_bytes(block, x, y)
    assert ratio_block <= 0.70, ratio_block
    net = models.build("resnet20")
    x = torch.rand(8, 3, 32, 32)
    dense = saved_bytes(net, x, y)
    ratio = saved_bytes(swatify(copy.deepcopy(net), 0.7), x, y) / dense
    assert ratio <= 0.70, ratio
    # meProp keeps dense activations: no saving (the paper's point)
    assert saved_bytes(swatify(copy.deepcopy(net), 0.7, "meprop"), x, y) / dense == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("inplace", [False, True])
def test_mask_relu_matches_torch_relu_including_nan(backend, inplace):
    base = torch.cat([torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf")]), torch.randn(1000)])
    g = torch.randn(base.numel())
    ref_in = base.clone().requires_grad_(True)
    ref_out = torch.relu(ref_in * 1.0)
    ref_out.backward(g)
    x = base.clone().requires_grad_(True)
    with memory.use_backend(backend):
        out = SwatReLU(inplace=inplace).train()(x * 1.0)
        out.backward(g)
    assert torch.equal(out.detach().nan_to_num(7.0), ref_out.detach().nan_to_num(7.0))
    assert torch.equal(x.grad, ref_in.grad)
