"""The paper's measurements: analytic training FLOPs, activation memory, sparsification angle.

FLOP model (paper section 3.3, Figure 7): only Conv2d / Linear GEMMs are counted, as the paper
does.  Per layer and sample the forward costs M multiply-accumulates (MACs); the backward costs
M for grad_input (from W) and M for grad_W (from a_in).  With layer sparsity s:

=========  =========  ==============  ============
mode       forward    grad_input      grad_W
=========  =========  ==============  ============
dense      M          M               M
swat       (1-s) M    (1-s) M (TopK W) (1-s) M (TopK a)
saw        M          (1-s) M         (1-s) M
meprop     M          (1-s) M (TopK g) (1-s) M
=========  =========  ==============  ============

meProp's output layer is counted dense (s = 0), as `training.swatify` runs it.

Activation-memory model (Figure 8b): what a training step keeps for backward, counted the way
the paper counts it: the inputs of Conv2d / Linear layers (TopK-compressed to (1-s) of their
values in swat / saw) plus the inputs of BatchNorm layers (always dense).  ``index_bits`` adds
the cost of saying *which* values were kept (this project stores a 1-bit mask per element);
the paper's figures leave it out (``index_bits=0``).

Sparsification angle (section 4, appendix B): ``arccos(||TopK(v)|| / ||v||)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from training.config import MODES
from training.topk import check_sparsity, topk_mask

__all__ = ["LayerCost", "trace_layers", "training_macs", "activation_elements", "activation_bytes",
           "reduction_table", "sparsification_angle", "gaussian_angles", "gaussian_angle_limit"]
Sparsity = Union[float, Mapping[str, float]]


@dataclass(frozen=True)
class LayerCost:
    """One layer's per-sample sizes, as seen in one forward pass at a given input size."""

    name: str
    kind: str  # "conv" | "linear" | "bn"
    macs: int  # multiply-accumulates of the forward GEMM per sample (0 for bn)
    input_numel: int  # per sample
    weight_numel: int


def _per_sample(t: Tensor) -> int:
    return int(math.prod(t.shape[1:])) if t.dim() > 1 else int(t.numel())


def trace_layers(model: nn.Module, input_shape: Sequence[int]) -> list[LayerCost]:
    """Run one forward of batch 1 on the meta device and record every Conv2d / Linear / BN.

    Meta tensors carry shapes only, so even VGG-16 at 224x224 costs no real memory or time.
    The model is moved to meta in place only for a meta copy: pass a model built under
    ``torch.device("meta")`` or any model (it is deep-copied to meta).
    """
    import copy

    net = copy.deepcopy(model).to("meta").eval()
    records: list[LayerCost] = []
    handles = []

    def hook(name: str):
        def fn(m: nn.Module, inputs: tuple, output: Tensor) -> None:
            x = inputs[0]
            if isinstance(m, nn.Conv2d):
                out_sp = _per_sample(output)
                k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]  # (Cin/groups)*kh*kw
                records.append(LayerCost(name, "conv", out_sp * k, _per_sample(x), m.weight.numel()))
            elif isinstance(m, nn.Linear):
                rows = int(math.prod(output.shape[1:-1])) if output.dim() > 2 else 1
                records.append(LayerCost(name, "linear", rows * m.in_features * m.out_features, _per_sample(x),
                                         m.weight.numel()))
            else:
                records.append(LayerCost(name, "bn", 0, _per_sample(x), 0))
        return fn

    for name, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            net(torch.empty((1, *input_shape), device="meta"))
    finally:
        for h in handles:
            h.remove()
    return records


def _layer_s(sparsity: Sparsity, name: str) -> float:
    if isinstance(sparsity, Mapping):
        return float(sparsity.get(name, 0.0))
    return float(sparsity)


def training_macs(layers: Iterable[LayerCost], mode: str, sparsity: Sparsity) -> dict[str, float]:
    """Per-sample MACs of one training step: forward, grad_input, grad_W and their total."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    layers = [l for l in layers if l.kind != "bn"]
    # meProp leaves the output layer dense unless a per-layer map says otherwise (as swatify)
    dense_out = layers[-1].name if mode == "meprop" and layers and not isinstance(sparsity, Mapping) else None
    fwd = gin = gw = 0.0
    for l in layers:
        s = 0.0 if mode == "dense" or l.name == dense_out else check_sparsity(_layer_s(sparsity, l.name))
        d = 1.0 - s
        fwd += l.macs * (d if mode == "swat" else 1.0)
        gin += l.macs * d
        gw += l.macs * d
    return {"forward": fwd, "grad_input": gin, "grad_weight": gw, "total": fwd + gin + gw}


def activation_elements(layers: Iterable[LayerCost], mode: str, sparsity: Sparsity,
                        index_bits: float = 0.0) -> float:
    """Per-sample saved activation size in float32-element units (see module docstring).

    ``index_bits``: bits per *dense* element spent on recording the kept positions (1 for a
    bitmask) in swat / saw; expressed in 32-bit element units.
    """
    total = 0.0
    for l in layers:
        if l.kind == "bn":
            total += l.input_numel
        elif mode in ("swat", "saw"):
            s = check_sparsity(_layer_s(sparsity, l.name))
            total += l.input_numel * ((1.0 - s) + index_bits / 32.0)
        else:
            total += l.input_numel
    return total


def activation_bytes(layers: Iterable[LayerCost], mode: str, sparsity: Sparsity, batch: int = 1,
                     index_bits: float = 0.0) -> float:
    """:func:`activation_elements` in bytes (float32) for a mini-batch of ``batch``."""
    return 4.0 * batch * activation_elements(layers, mode, sparsity, index_bits)


def reduction_table(layers: Sequence[LayerCost], sparsities: Sequence[float],
                    modes: Sequence[str] = ("swat", "saw")) -> list[dict[str, float]]:
    """Per (mode, sparsity): dense / sparse ratios of training MACs, activation and weight memory."""
    dense_macs = training_macs(layers, "dense", 0.0)["total"]
    dense_act = activation_elements(layers, "dense", 0.0)
    rows = []
    for mode in modes:
        for s in sparsities:
            macs = training_macs(layers, mode, s)["total"]
            rows.append({
                "mode": mode, "sparsity": float(s),
                "gmacs_dense": dense_macs / 1e9, "gmacs": macs / 1e9,
                "compute_reduction": dense_macs / macs,
                "activation_reduction": dense_act / activation_elements(layers, mode, s),
                "activation_reduction_with_mask": dense_act / activation_elements(layers, mode, s, index_bits=1),
                # weights read by the backward pass: TopK(W) in both swat and saw (Figure 8a)
                "weight_access_reduction": 1.0 / (1.0 - s),
            })
    return rows


# --------------------------------------------------------------------------------- angles
def sparsification_angle(x: Tensor, sparsity: float, topk: str = "nchw", *,
                         generator: Optional[torch.Generator] = None) -> float:
    """Angle in degrees between ``x`` (flattened) and its Top-K sparsified copy.

    0 for sparsity 0; 90 when nothing is kept (or ``x`` is all zeros and nothing is left).
    """
    s = check_sparsity(sparsity, allow_one=True)
    x = x.detach().double()
    if s == 0.0:
        return 0.0
    mask = topk_mask(x, s, topk, generator=generator)
    full = float(x.pow(2).sum())
    if full == 0.0:
        return 0.0
    kept = float(x[mask].pow(2).sum())
    return math.degrees(math.acos(min(1.0, math.sqrt(kept / full))))


def gaussian_angles(dim: int = 1000, sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9), trials: int = 1000,
                    seed: int = 0) -> dict[float, np.ndarray]:
    """Sparsification angles of ``trials`` standard-normal vectors of ``dim`` entries, per sparsity.

    Vectorised over trials (sort of |v|^2 per row), equivalent to :func:`sparsification_angle`
    with nchw on each row.
    """
    rng = np.random.default_rng(seed)
    v2 = np.sort(rng.standard_normal((trials, dim)) ** 2, axis=1)[:, ::-1]
    csum = np.cumsum(v2, axis=1)
    out = {}
    for s in sparsities:
        k = max(1, int(math.floor((1.0 - s) * dim + 0.5)))
        cos = np.sqrt(csum[:, k - 1] / csum[:, -1])
        out[float(s)] = np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))
    return out


def gaussian_angle_limit(sparsity: float) -> float:
    """Large-dimension limit of the Gaussian sparsification angle, in closed form.

    Keeping the top (1-s) magnitudes keeps |v| > t with P(|v| > t) = 1-s, whose share of the
    energy is E[v^2; |v| > t] = 2 (t phi(t) + 1 - Phi(t)); the angle is arccos of its root.
    """
    s = check_sparsity(sparsity, allow_one=True)
    if s == 0.0:
        return 0.0
    if s == 1.0:
        return 90.0
    nd = NormalDist()
    t = nd.inv_cdf(1.0 - (1.0 - s) / 2.0)
    energy = 2.0 * (t * nd.pdf(t) + (1.0 - nd.cdf(t)))
    return math.degrees(math.acos(math.sqrt(min(1.0, energy))))
