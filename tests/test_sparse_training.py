"""SWAT's sparse-kernel training products (training.sparse_products, swat_native.train) match
the masked-dense reference: forward, input gradient, weight gradient, bias gradient, at every
ISA this CPU runs, for odd shapes, strides 2 and 3 (the phase-split input gradient), dilation,
groups, 1x1 and blocks; the sparse-vs-dense choice is kept per machine and pinned by checkpoints."""
from __future__ import annotations

import json
import os
from typing import Iterator
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import swat_native
from training import memory, sparse_choices, sparse_products as sp
from training.swatify import swatify
from training.topk import select_bits

pytestmark = pytest.mark.skipif(not swat_native.available(), reason="compiled kernels not built")

# (n, c, h, w, o, k, stride, pad, dil, groups, block)
SHAPES = [(3, 16, 16, 16, 16, 3, 1, 1, 1, 1, 1), (2, 16, 9, 11, 32, 3, 2, 1, 1, 1, 1),
          (3, 32, 8, 8, 32, 3, 1, 1, 1, 1, 1), (2, 8, 7, 9, 12, 3, 1, 1, 1, 2, 1),
          (2, 16, 9, 9, 32, 1, 2, 0, 1, 1, 1), (2, 16, 13, 11, 16, 3, 1, 2, 2, 1, 1),
          (2, 16, 16, 16, 32, 3, 1, 1, 1, 1, 4), (3, 16, 6, 6, 48, 1, 1, 0, 1, 1, 1),
          (2, 8, 7, 6, 16, 5, 2, 2, 1, 1, 1), (2, 16, 10, 7, 16, 3, 3, 1, 1, 2, 1),
          # even maps: the direct kernel (stride phases), the phase-wise direct input gradient and
          # the stride-2 weight-gradient loop; blocks of 2 and 4 on the direct kernel
          (2, 16, 16, 16, 32, 3, 2, 1, 1, 1, 1), (3, 32, 16, 16, 64, 1, 2, 0, 1, 1, 1),
          (3, 16, 8, 8, 16, 3, 1, 1, 1, 1, 2), (2, 16, 16, 16, 32, 3, 2, 1, 1, 1, 4),
          (2, 16, 12, 12, 16, 5, 1, 2, 1, 1, 1), (2, 16, 24, 24, 16, 3, 3, 1, 1, 1, 1),
          # Fashion-MNIST's maps: planes that end in a partial vector (784, 196, 49 floats)
          (3, 16, 28, 28, 16, 3, 1, 1, 1, 1, 1), (2, 16, 28, 28, 32, 3, 2, 1, 1, 1, 1),
          (2, 32, 14, 14, 64, 1, 2, 0, 1, 1, 1), (5, 32, 7, 7, 32, 3, 1, 1, 1, 1, 4)]


def _isas() -> list[str]:
    return list(swat_native.cpu_isas())


def _weight(o: int, cg: int, k: int, density: float, block: int) -> torch.Tensor:
    w = torch.randn(o, cg, k, k)
    keep = torch.rand(o // block, 1, cg, k, k) < density
    return w * keep.expand(o // block, block, cg, k, k).reshape(o, cg, k, k)


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("shape", SHAPES)
def test_products_match_dense(isa: str, shape: tuple[int, ...]) -> None:
    n, c, h, w, o, k, s, p, d, g, blk = shape
    torch.manual_seed(0)
    x = torch.relu(torch.randn(n, c, h, w))
    sel = select_bits(x, 0.7, "nchw", drop_zeros=True)
    vals = memory.compact(x, sel.bits, sel.count)
    xs = memory.expand(vals, sel.bits, x.shape)
    wt = _weight(o, c // g, k, 0.3, blk)
    b = torch.randn(o)
    geo = ((s, s), (p, p), (d, d))
    ref = F.conv2d(xs, wt, b, s, p, d, g)
    gy = torch.randn_like(ref)
    rgi, rgw, _ = torch.ops.aten.convolution_backward(gy, xs, wt, None, [s, s], [p, p], [d, d], False, [0, 0], g,
                                                      [True, True, False])
    with mock.patch.dict(os.environ, {"SWAT_ISA": isa}), sp.use_mode("force"):
        out = sp.conv_forward(xs, wt, b, *geo, g, 0.3, blk)
        gi = sp.conv_input_grad(gy, wt, x.shape, *geo, g, 0.3, lambda: rgi.clone())
        gw = sp.conv_weight_grad(gy, vals, sel.bits, x.shape, wt.shape, *geo, g, lambda: rgw.clone())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gi, rgi, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, rgw, rtol=1e-4, atol=1e-4)


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 1, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, 1, 1),
                               torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, 2, 1, groups=2), torch.nn.ReLU(),
                               torch.nn.Conv2d(32, 32, 1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(32 * 5 * 5, 10))


@pytest.mark.parametrize("mode,block", [("swat", 1), ("saw", 1), ("swat", 4), ("meprop", 1)])
def test_training_step_same_gradients(mode: str, block: int) -> None:
    """A whole SWAT / SAW / meProp step: every parameter gradient equals today's torch path."""
    torch.manual_seed(1)
    base = _net()
    x, y = torch.randn(4, 3, 9, 9), torch.randint(0, 10, (4,))
    grads = {}
    for m in ("off", "force"):
        torch.manual_seed(2)
        kw = {"block": block} if block > 1 else {}
        net = swatify(_copy(base), 0.7, mode, **kw).train()
        with sp.use_mode(m):
            loss = F.cross_entropy(net(x), y)
            loss.backward()
        grads[m] = {k: v.grad.clone() for k, v in net.named_parameters()}
    for k in grads["off"]:
        torch.testing.assert_close(grads["force"][k], grads["off"][k], rtol=1e-4, atol=1e-5)


def _copy(m: torch.nn.Module) -> torch.nn.Module:
    import copy
    return copy.deepcopy(m)


def test_off_switch_and_env() -> None:
    with mock.patch.dict(os.environ, {"SWAT_SPARSE_PRODUCTS": "0"}):
        assert sp.mode() == "off"
        assert not sp.enabled_for(torch.zeros(1))
    with mock.patch.dict(os.environ, {"SWAT_SPARSE_PRODUCTS": "force"}):
        assert sp.mode() == "force"
    with mock.patch.dict(os.environ, {"SWAT_SPARSE_PRODUCTS": "auto"}):
        assert sp.mode() == "auto"
    with mock.patch.dict(os.environ, {"SWAT_SPARSE_PRODUCTS": ""}):
        assert sp.mode() == "auto"  # default: the choice is kept per machine and in checkpoints
    with pytest.raises(ValueError, match="choose one of"):
        with sp.use_mode("fast"):
            pass
    assert not sp.enabled_for(torch.zeros(1, dtype=torch.float64))


class _Products:
    """A sparse and a dense 'product' that count their calls and return distinct results."""

    def __init__(self, sparse_faster: bool) -> None:
        self.calls = {"s": 0, "d": 0}
        self.sparse_faster = sparse_faster

    def sparse(self) -> torch.Tensor:
        self.calls["s"] += 1
        if not self.sparse_faster:
            import time
            time.sleep(0.002)
        return torch.ones(1)

    def dense(self) -> torch.Tensor:
        self.calls["d"] += 1
        if self.sparse_faster:
            import time
            time.sleep(0.002)
        return torch.zeros(1)


@pytest.fixture
def timed_choices(isolated_caches: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:  # noqa: ARG001
    """Timing on, the choice cache in the test's folder, no choices held in memory."""
    monkeypatch.setenv("SWAT_AUTOTUNE", "1")
    sparse_choices.forget()
    yield
    sparse_choices.forget()


@pytest.mark.usefixtures("timed_choices")
@pytest.mark.parametrize("sparse_faster", [True, False])
def test_choice_is_timed_once_and_returns_the_chosen_result(sparse_faster: bool) -> None:
    p = _Products(sparse_faster)
    with sp.use_mode("auto"):
        first = sp.choose(("test", 1), p.sparse, p.dense)
        calls = dict(p.calls)
        second = sp.choose(("test", 1), p.sparse, p.dense)
    assert float(first) == float(second) == (1.0 if sparse_faster else 0.0)  # the chosen product's result
    assert p.calls["s"] + p.calls["d"] == calls["s"] + calls["d"] + 1
    assert sp.choices() == {"test|1": sparse_faster}


@pytest.mark.usefixtures("timed_choices")
def test_choice_is_shared_through_the_cache_file() -> None:
    with sp.use_mode("auto"):
        sp.choose(("test", 2), *_pair(True))
    data = json.loads(sparse_choices.cache_path().read_text())
    (section,) = data["machines"].values()
    assert section["test|2"]["sparse"] is True and set(section["test|2"]["times_us"]) == {"sparse", "dense"}
    sparse_choices.forget()  # a new process: reads the file, times nothing, even if dense is faster now
    p = _Products(sparse_faster=False)
    with sp.use_mode("auto"):
        assert float(sp.choose(("test", 2), p.sparse, p.dense)) == 1.0
    assert p.calls == {"s": 1, "d": 0}


@pytest.mark.usefixtures("timed_choices")
def test_first_writer_wins_and_checkpoint_pins_win() -> None:
    assert sparse_choices.decide("k", True) is True
    sparse_choices.forget()
    assert sparse_choices.decide("k", False) is True  # another process wrote it first
    sparse_choices.forget()
    sparse_choices.pin({"k": False, "bad": "yes", 3: True})
    assert sparse_choices.lookup("k") is False  # the resumed run's own choice, not the file's
    assert sparse_choices.lookup("bad") is None
    assert sparse_choices.used() == {"k": False}


@pytest.mark.usefixtures("timed_choices")
def test_damaged_cache_file_is_replaced() -> None:
    path = sparse_choices.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    assert sparse_choices.lookup("k") is None
    assert sparse_choices.decide("k", True) is True
    assert json.loads(path.read_text())["version"] == sparse_choices.VERSION


@pytest.mark.usefixtures("isolated_caches")
def test_without_timing_the_rule_decides_and_nothing_is_written() -> None:
    sparse_choices.forget()
    p = _Products(sparse_faster=False)
    with sp.use_mode("auto"):
        assert float(sp.choose(("test", 3), p.sparse, p.dense, rule=True)) == 1.0
        assert float(sp.choose(("test", 4), p.sparse, p.dense, rule=False)) == 0.0
    assert p.calls == {"s": 1, "d": 1}
    assert not sparse_choices.cache_path().exists()
    assert sp._rule(0.3, 256) and not sp._rule(0.35, 256) and not sp._rule(0.1, 64)
    sparse_choices.forget()


def _pair(sparse_faster: bool) -> tuple:
    p = _Products(sparse_faster)
    return p.sparse, p.dense


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: object, names: list[str]) -> dict[str, int]:
    """Wrap ``module.<name>`` (loop factories) so every loop they hand out counts its calls."""
    calls = {n: 0 for n in names}
    for name in names:
        factory = getattr(module, name)

        def wrapped(par: bool, *more, _f=factory, _n=name):  # noqa: ANN001, ANN002, ANN202
            loop = _f(par, *more)

            def run(*a):  # noqa: ANN002, ANN202
                calls[_n] += 1
                return loop(*a)
            return run
        monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_resnet_layers_take_the_direct_kernels(monkeypatch: pytest.MonkeyPatch, isa: str) -> None:
    """ResNet-20's layers (3x3 stride 1 and 2, 1x1 stride 2, even maps) run the no-packing
    direct conv for forward and input gradient and the padded-gradient weight-gradient loops, on
    AVX2 and AVX-512, and still match torch."""
    from swat_native import train as native_train
    if isa not in swat_native.cpu_isas():
        pytest.skip(f"this CPU has no {isa}")
    calls = _count_calls(monkeypatch, native_train, ["tconv_loop", "wgrad_s1_loop", "wgrad_s2_loop", "wgrad_loop"])
    torch.manual_seed(3)
    for c, o, h, k, s, p in [(16, 16, 32, 3, 1, 1), (16, 32, 32, 3, 2, 1), (32, 64, 16, 1, 2, 0), (64, 64, 8, 3, 1, 1)]:
        x = torch.relu(torch.randn(4, c, h, h))
        sel = select_bits(x, 0.9, "nchw", drop_zeros=True)
        vals = memory.compact(x, sel.bits, sel.count)
        xs = memory.expand(vals, sel.bits, x.shape)
        wt = _weight(o, c, k, 0.1, 1)
        ref = F.conv2d(xs, wt, None, s, p)
        gy = torch.randn_like(ref)
        rgi, rgw, _ = torch.ops.aten.convolution_backward(gy, xs, wt, None, [s, s], [p, p], [1, 1], False, [0, 0], 1,
                                                          [True, True, False])
        geo = ((s, s), (p, p), (1, 1))
        with mock.patch.dict(os.environ, {"SWAT_ISA": isa}), sp.use_mode("force"):
            out = sp.conv_forward(xs, wt, None, *geo, 1, 0.1)
            gi = sp.conv_input_grad(gy, wt, x.shape, *geo, 1, 0.1, lambda: torch.full_like(rgi, float("nan")))
            gw = sp.conv_weight_grad(gy, vals, sel.bits, x.shape, wt.shape, *geo, 1,
                                     lambda: torch.full_like(rgw, float("nan")))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gi, rgi, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gw, rgw, rtol=1e-4, atol=1e-4)
    # forward x4, input gradient: 2 stride-1 convs + one direct conv per reached stride phase
    # (4 for the 3x3 stride 2, 1 for the 1x1 stride 2)
    assert calls["tconv_loop"] == 4 + 2 + 4 + 1
    assert calls["wgrad_s1_loop"] == 2 and calls["wgrad_s2_loop"] == 2 and calls["wgrad_loop"] == 0


def test_direct_kernel_refuses_what_it_cannot_do() -> None:
    """A stride-1 conv that shrinks the map, groups, a strided conv whose input phases are larger
    than its output: no direct plan (those layers keep the packed shift kernel or torch)."""
    assert sp._direct_plan(sp._ConvSpec(16, 16, 3, 3, 1, (1, 1), (0, 0), (1, 1)), 18, 18, 1) is None
    assert sp._direct_plan(sp._ConvSpec(16, 16, 3, 3, 2, (1, 1), (1, 1), (1, 1)), 16, 16, 1) is None
    assert sp._direct_plan(sp._ConvSpec(16, 16, 3, 3, 1, (2, 2), (0, 0), (1, 1)), 16, 16, 1) is None  # 7x7 out, 8x8 phases
    if "avx512" not in swat_native.cpu_isas():
        return
    spec = sp._ConvSpec(16, 16, 3, 3, 1, (1, 1), (1, 1), (1, 1))
    with mock.patch.dict(os.environ, {"SWAT_ISA": "avx512"}):
        plan = sp._direct_plan(spec, 8, 8, 1)
        odd = sp._direct_plan(spec, 5, 7, 1)  # 35 outputs: two vectors and 3 lanes
    assert plan is not None and plan.masks.shape == (4, 9)
    # output vector 0 = rows 0-1 of the 8x8 map: tap (0, 0) reads row -1 for row 0 (masked) and
    # column -1 for column 0 (masked): lanes 9..15 only
    assert int(plan.masks[0, 0]) == sum(1 << q for q in range(9, 16))
    assert int(plan.masks[1, 4]) == 0xFFFF  # the centre tap reads every lane
    assert odd is not None and odd.masks.shape == (3, 9) and int(odd.masks[2, 4]) == 0b111  # lanes past 35 clear


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_weight_gradient_many_channels_on_a_large_map(isa: str) -> None:
    """The stride-1 weight-gradient loop walks large maps in bands of positions, every channel's
    value index carried across bands, and more than 512 work items in groups: still exact."""
    if isa not in swat_native.cpu_isas():
        pytest.skip(f"this CPU has no {isa}")
    torch.manual_seed(4)
    x = torch.relu(torch.randn(1, 520, 17, 17))  # 289 positions: 3 bands; 520 items in 2 groups
    sel = select_bits(x, 0.8, "nchw", drop_zeros=True)
    vals = memory.compact(x, sel.bits, sel.count)
    xs = memory.expand(vals, sel.bits, x.shape)
    wt = torch.randn(16, 520, 3, 3)
    gy = torch.randn(1, 16, 17, 17)
    ref = torch.ops.aten.convolution_backward(gy, xs, wt, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                              [False, True, False])[1]
    with mock.patch.dict(os.environ, {"SWAT_ISA": isa}):
        got = sp._sparse_wgrad(gy, vals, sel.bits, x.shape, wt.shape, (1, 1), (1, 1), (1, 1))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("n", [2, 5])
def test_weight_gradient_split_by_images_over_two_threads_is_exact(isa: str, stride: int, n: int) -> None:
    """At two threads the padded-gradient loops give each thread its own images and a private dW,
    summed after (swat_native.train.split_by_images); an odd batch leaves the threads unequal
    shares. Both must still equal the masked-dense product."""
    if isa not in swat_native.cpu_isas():
        pytest.skip(f"this CPU has no {isa}")
    from swat_native import train as native_train

    torch.manual_seed(5 + n)
    x = torch.relu(torch.randn(n, 8, 12, 12))
    sel = select_bits(x, 0.7, "nchw", drop_zeros=True)
    vals = memory.compact(x, sel.bits, sel.count)
    xs = memory.expand(vals, sel.bits, x.shape)
    wt = torch.randn(32, 8, 3, 3)
    gy = torch.randn(n, 32, 12 // stride, 12 // stride)
    ref = torch.ops.aten.convolution_backward(gy, xs, wt, None, [stride, stride], [1, 1], [1, 1], False, [0, 0], 1,
                                              [False, True, False])[1]
    assert native_train.split_by_images(n, 8, 144, 2) and not native_train.split_by_images(1, 8, 144, 2)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with mock.patch.dict(os.environ, {"SWAT_ISA": isa}):
            got = sp._sparse_wgrad(gy, vals, sel.bits, x.shape, wt.shape, (stride, stride), (1, 1), (1, 1))
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_padded_channel_stride_gives_the_same_bits_as_in_place(isa: str) -> None:
    """The direct conv's two input layouts (in place, or copied at the padded channel stride that
    swat_native.layout_choice may pick per shape) sum the same products in the same order: the
    forward and the strided input gradient are bit-identical either way."""
    if isa not in swat_native.cpu_isas():
        pytest.skip(f"this CPU has no {isa}")
    torch.manual_seed(5)
    x = torch.randn(3, 16, 32, 32)
    w = _weight(16, 16, 3, 0.3, 1)
    spec = sp._ConvSpec(16, 16, 3, 3, 1, (1, 1), (1, 1), (1, 1))
    with mock.patch.dict(os.environ, {"SWAT_ISA": isa}):
        d = sp._direct_plan(spec, 32, 32, 1)
        assert d is not None and d.cs == 32 * 32 + 16
        a = sp._direct_run(x, w, None, spec, 1, d, False)
        b = sp._direct_run(x, w, None, spec, 1, d, True)
        ws = _weight(32, 16, 3, 0.3, 1)
        g = torch.randn(3, 32, 16, 16)
        plan = sp._direct_dgrad_plan(ws.shape, x.shape, g.shape, (2, 2), (1, 1))
        ga = sp._direct_strided_input_grad_run(g, ws, x.shape, (2, 2), plan, False)
        gb = sp._direct_strided_input_grad_run(g, ws, x.shape, (2, 2), plan, True)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    torch.testing.assert_close(a, F.conv2d(x, w, None, 1, 1), rtol=1e-4, atol=1e-4)
