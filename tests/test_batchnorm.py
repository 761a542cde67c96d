"""SwatBatchNorm2d: torch's BatchNorm2d semantics with the compiled CPU float32 training passes."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
import swat_native as native
from training.batchnorm import SwatBatchNorm2d
from training.memory import saved_tensors
from training.swatify import swatify, unswatify

needs_native = pytest.mark.skipif(not native.available(), reason="compiled kernels not built (pip install -e .)")


def _pair(**kw) -> tuple[nn.BatchNorm2d, SwatBatchNorm2d]:  # noqa: ANN003
    plain = nn.BatchNorm2d(kw.pop("c"), **kw)
    if plain.weight is not None:
        with torch.no_grad():
            plain.weight.uniform_(0.5, 1.5)
            plain.bias.uniform_(-1, 1)
    fast = copy.deepcopy(plain)
    fast.__class__ = SwatBatchNorm2d
    return plain.train(), fast.train()


def _step(bn: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    xr = x.clone().requires_grad_(True)
    y = bn(xr)
    y.backward(dy)
    grads = tuple(p.grad.clone() for p in bn.parameters())
    bn.zero_grad(set_to_none=True)
    return (y.detach(), xr.grad) + grads


@needs_native
@pytest.mark.parametrize("shape", [(64, 16, 32, 32), (3, 5, 7, 7), (8, 24, 1, 1), (1, 4, 3, 5), (2, 3, 33, 17)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kw", [{}, {"affine": False}, {"momentum": None}, {"track_running_stats": False},
                                {"eps": 1e-3, "momentum": 0.3}], ids=["default", "no-affine", "cumulative",
                                                                      "no-running", "eps-momentum"])
def test_matches_torch_batchnorm_in_training(shape, kw) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    plain, fast = _pair(c=shape[1], **kw)
    for step in range(3):  # three steps: the running averages (and momentum=None's count) evolve
        x = torch.randn(shape) * (1 + step) + step - 1
        dy = torch.randn(shape)
        for a, b in zip(_step(plain, x, dy), _step(fast, x, dy)):
            assert torch.allclose(a, b, rtol=1e-4, atol=2e-5 * x.numel() ** 0.5), (a - b).abs().max()
    for name, buf in plain.named_buffers():
        assert torch.allclose(buf.float(), dict(fast.named_buffers())[name].float(), rtol=1e-5, atol=1e-6), name
    # eval mode is torch's own path: on the same running statistics, the same bits
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(shape)
    assert torch.equal(plain.eval()(x), fast.eval()(x))


@needs_native
@pytest.mark.parametrize("isa", list(native.cpu_isas()))
def test_each_isa_gives_torchs_result_and_thread_count_changes_no_bit(isa, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("SWAT_ISA", isa)
    torch.manual_seed(1)
    x, dy = torch.randn(16, 12, 21, 19) * 4 + 2, torch.randn(16, 12, 21, 19)
    plain, fast = _pair(c=12)
    ref = _step(plain, x, dy)
    runs = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            runs.append(_step(copy.deepcopy(fast), x, dy))
        finally:
            torch.set_num_threads(old)
    for a, b, c in zip(ref, *runs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-3)
        assert torch.equal(b, c)


@needs_native
def test_nan_propagates_to_its_channel_only() -> None:
    plain, fast = _pair(c=3)
    x = torch.randn(4, 3, 5, 5)
    x[1, 2, 3, 3] = float("nan")
    y = fast(x)
    assert torch.isnan(y[:, 2]).all() and not torch.isnan(y[:, :2]).any()
    assert torch.isnan(fast.running_mean[2]) and not torch.isnan(fast.running_mean[:2]).any()


def test_falls_back_to_torch_where_the_passes_do_not_apply() -> None:
    torch.manual_seed(2)
    plain, fast = _pair(c=4)
    # float64 (gradcheck), channels-last input: torch's own path, so exactly torch's numbers
    xd = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(copy.deepcopy(fast).double(), (xd,))
    xc = torch.randn(3, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    assert torch.equal(copy.deepcopy(plain)(xc), copy.deepcopy(fast)(xc))
    # one value per channel: torch's own error, unchanged
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fast(torch.randn(1, 4, 1, 1))


def test_swatify_installs_it_in_every_mode_and_unswatify_restores() -> None:
    for mode in ("swat", "saw", "meprop"):
        net = models.build("resnet20")
        keys = list(net.state_dict())
        swatify(net, 0.7, mode)
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and all(type(m) is SwatBatchNorm2d for m in bns)
        assert list(net.state_dict()) == keys
        unswatify(net)
        assert all(type(m) is nn.BatchNorm2d for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    net = swatify(models.build("resnet20"), 0.7, exclude=["bn1"])
    assert type(net.bn1) is nn.BatchNorm2d and type(net.layer1[0].bn1) is SwatBatchNorm2d


@needs_native
def test_keeps_what_torch_keeps_for_backward() -> None:
    plain, fast = _pair(c=8)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)

    def kept(bn: nn.Module) -> int:
        return sum(r.nbytes for r in saved_tensors(nn.Sequential(bn), x, lambda o: o.sum()))

    # the input, the weight and two per-channel vectors; torch keeps the running statistics too
    assert x.numel() * 4 < kept(fast) <= kept(plain)


@needs_native
def test_a_resnet_step_matches_plain_batchnorm() -> None:
    torch.manual_seed(3)
    net = models.build("resnet20").train()
    fast = copy.deepcopy(net)
    for m in fast.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SwatBatchNorm2d
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for m in (net, fast):
        F.cross_entropy(m(x), y).backward()
    for (name, p), q in zip(net.named_parameters(), fast.parameters()):
        assert np.allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-3, atol=1e-5), name
