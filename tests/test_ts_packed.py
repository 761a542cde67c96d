"""TorchScript packed layers: bitmask storage, CSR and dense compute paths, export-time tuning."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swat_deploy.ts_packed as tsp
from swat_deploy.ts_packed import PackedConv2d, PackedLinear, csr_max_batch


def _sparsify_(m: nn.Module, sparsity: float, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight[torch.rand(m.weight.shape, generator=g) < sparsity] = 0
    return m


def _roundtrip(m: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buf = io.BytesIO()
    torch.jit.save(m, buf)
    buf.seek(0)
    return torch.jit.load(buf)


CONVS = [dict(in_channels=4, out_channels=8, kernel_size=3, padding=1),
         dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=False),
         dict(in_channels=3, out_channels=5, kernel_size=(3, 5), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
         dict(in_channels=8, out_channels=16, kernel_size=1)]


@pytest.mark.parametrize("cfg", CONVS, ids=lambda c: f"k{c['kernel_size']}s{c.get('stride', 1)}")
def test_packed_conv_csr_and_dense_paths_match_the_conv(cfg: dict) -> None:
    conv = _sparsify_(nn.Conv2d(**cfg), 0.8, 1).eval()
    packed = PackedConv2d(conv)
    packed.csr_max_batch = 2
    loaded = _roundtrip(torch.jit.script(packed))
    for n in (1, 2, 3):  # batches 1-2 take the CSR path, 3 the dense one
        x = torch.randn(n, cfg["in_channels"], 9, 11)
        want = conv(x)
        torch.testing.assert_close(loaded(x), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded.forward_csr(x), want, rtol=1e-4, atol=1e-5)
    assert loaded._csr is not None and loaded._dense is not None  # both decoded, on demand
    assert loaded.weight_values.numel() == int((conv.weight != 0).sum())  # stored compactly


def test_packed_linear_paths_and_storage() -> None:
    lin = _sparsify_(nn.Linear(64, 10), 0.9, 2).eval()
    packed = PackedLinear(lin.weight, lin.bias)
    packed.csr_max_batch = 4
    loaded = _roundtrip(torch.jit.script(packed))
    for n in (1, 4, 5):
        x = torch.randn(n, 64)
        torch.testing.assert_close(loaded(x), lin(x), rtol=1e-4, atol=1e-5)
    x3 = torch.randn(2, 3, 64)  # more than 2 dims: always the dense path
    torch.testing.assert_close(loaded(x3), lin(x3), rtol=1e-4, atol=1e-5)
    assert loaded._dense is not None and loaded._csr is not None


def _fake_timing(csr_wins_up_to: int):  # noqa: ANN202
    def timing(fns: dict, **kw) -> dict:  # noqa: ANN003
        x_batch = timing.batches.pop(0)
        for fn in fns.values():
            fn()
        csr = 1.0 if x_batch <= csr_wins_up_to else 10.0
        return {"dense": (5.0, 3), "csr": (csr, 3)}
    timing.batches = list(tsp.TUNE_BATCHES)
    return timing


@pytest.mark.parametrize("wins_up_to,expected", [(0, 0), (1, 1), (16, 16), (10**6, tsp.TUNE_BATCHES[-1])])
def test_csr_max_batch_is_the_last_batch_csr_wins_from_1(wins_up_to: int, expected: int, monkeypatch) -> None:  # noqa: ANN001
    import swat_deploy.timing as timing_mod

    monkeypatch.setattr(timing_mod, "time_interleaved", _fake_timing(wins_up_to))
    layer = PackedConv2d(_sparsify_(nn.Conv2d(4, 8, 3, padding=1), 0.9, 3))
    assert csr_max_batch(layer, (1, 4, 6, 6)) == expected
    assert layer._dense is None and layer._csr is None  # timing leaves no decoded weights behind


def test_grouped_convs_never_take_the_csr_path() -> None:
    layer = PackedConv2d(nn.Conv2d(4, 8, 3, padding=1, groups=2))
    assert csr_max_batch(layer, (1, 4, 6, 6)) == 0


def test_real_timing_prefers_dense_for_a_dense_big_map() -> None:
    """A 0 %-sparse conv on a 16x16 map: im2col + CSR cannot beat the dense conv."""
    layer = PackedConv2d(nn.Conv2d(16, 16, 3, padding=1))
    assert csr_max_batch(layer, (1, 16, 16, 16)) == 0
    x = torch.randn(2, 16, 16, 16)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.dense_weight(), layer.bias, 1, 1))
