"""Analytic FLOP / memory counters on a hand-computed network, and the sparsification angle."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from training import measure


def _tiny() -> nn.Module:
    # conv 1->2 3x3 pad 1 on 4x4: out 2x4x4, MACs 32 outputs * 9 = 288, input 16 elements
    # BN(2) input 32; Linear 32->3: MACs 96, input 32
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32, 3))


def test_trace_hand_computed():
    layers = measure.trace_layers(_tiny(), (1, 4, 4))
    got = [(l.kind, l.macs, l.input_numel, l.weight_numel) for l in layers]
    assert got == [("conv", 288, 16, 18), ("bn", 0, 32, 0), ("linear", 96, 32, 96)]


def test_trace_grouped_strided_conv():
    net = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, bias=False)
    (l,) = measure.trace_layers(net, (4, 8, 8))
    assert l.macs == 4 * 4 * 4 * (2 * 9)  # 64 outputs, each (Cin/groups) * 3 * 3 MACs
    assert l.input_numel == 256


def test_training_macs_per_mode():
    layers = measure.trace_layers(_tiny(), (1, 4, 4))
    m = 288 + 96
    assert measure.training_macs(layers, "dense", 0.0)["total"] == 3 * m
    swat = measure.training_macs(layers, "swat", 0.5)
    assert swat == {"forward": m / 2, "grad_input": m / 2, "grad_weight": m / 2, "total": 1.5 * m}
    saw = measure.training_macs(layers, "saw", 0.5)
    assert saw["forward"] == m and saw["total"] == 2 * m
    # meProp: forward dense, backward sparse, but the output layer (the linear) stays dense
    assert measure.training_macs(layers, "meprop", 0.5)["total"] == 288 * 2 + 96 * 3
    # per-layer sparsities (a budget): only the conv sparse
    per = measure.training_macs(layers, "swat", {layers[0].name: 0.75})
    assert per["total"] == 3 * (288 * 0.25 + 96)


def test_activation_memory_hand_computed():
    layers = measure.trace_layers(_tiny(), (1, 4, 4))
    assert measure.activation_elements(layers, "dense", 0.0) == 16 + 32 + 32
    assert measure.activation_elements(layers, "meprop", 0.5) == 80  # meProp saves dense a
    assert measure.activation_elements(layers, "swat", 0.5) == 8 + 32 + 16  # BN input stays dense
    assert measure.activation_elements(layers, "saw", 0.5, index_bits=1) == pytest.approx(56 + 48 / 32)
    assert measure.activation_bytes(layers, "dense", 0.0, batch=10) == 4 * 10 * 80


def test_reduction_table_matches_paper_model():
    layers = measure.trace_layers(_tiny(), (1, 4, 4))
    rows = {(r["mode"], r["sparsity"]): r for r in measure.reduction_table(layers, (0.5, 0.8))}
    assert rows[("swat", 0.8)]["compute_reduction"] == pytest.approx(5.0)
    assert rows[("saw", 0.5)]["compute_reduction"] == pytest.approx(1.5)
    assert rows[("swat", 0.5)]["activation_reduction"] == pytest.approx(80 / 56)
    assert rows[("swat", 0.8)]["weight_access_reduction"] == pytest.approx(5.0)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown mode"):
        measure.training_macs([], "sparse", 0.5)


def test_angle_zero_sparsity_is_zero():
    assert measure.sparsification_angle(torch.randn(100), 0.0) == 0.0


def test_angle_2d_hand_case():
    # keep the larger of (3, 4): cos = 4 / 5
    got = measure.sparsification_angle(torch.tensor([3.0, 4.0]), 0.5)
    assert got == pytest.approx(math.degrees(math.acos(0.8)), abs=1e-9)


def test_angle_per_group_variant():
    # chw keeps the larger entry of each row: kept energy 16 + 1 of 26
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert measure.sparsification_angle(x, 0.5, "chw") == pytest.approx(math.degrees(math.acos(math.sqrt(17 / 26))))
    assert measure.sparsification_angle(x, 0.5, "nchw") == pytest.approx(math.degrees(math.acos(math.sqrt(25 / 26))))


def test_gaussian_1000_dim_near_known_values():
    ang = measure.gaussian_angles(1000, (0.8, 0.9), trials=300, seed=1)
    # paper: ~36.4 deg at 80 % sparsity, ~48 deg at 90 %; closed form 36.28 / 48.49
    assert abs(ang[0.8].mean() - 36.4) < 1.0 and abs(ang[0.9].mean() - 48.0) < 1.0
    assert abs(ang[0.9].mean() - measure.gaussian_angle_limit(0.9)) < 0.3
    # the vectorised path agrees with the per-vector function
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1000, generator=g, dtype=torch.float64)
    one = measure.sparsification_angle(v, 0.9)
    k = 100
    cos = math.sqrt(float(v.pow(2).sort(descending=True).values[:k].sum() / v.pow(2).sum()))
    assert one == pytest.approx(math.degrees(math.acos(cos)), abs=1e-9)


def test_gaussian_limit_edges():
    assert measure.gaussian_angle_limit(0.0) == 0.0
    assert measure.gaussian_angle_limit(1.0) == 90.0
    assert measure.gaussian_angle_limit(0.5) < measure.gaussian_angle_limit(0.7) < measure.gaussian_angle_limit(0.9)
