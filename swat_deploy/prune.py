"""Pruning: from a run dir to the model that is actually deployed.

The deployed function must be the one training evaluated. In SWAT mode the eval forward already
used TopK(W), so pruning applies the *same* ``training.topk.topk_weight`` (same k, same tie rule)
to the saved dense weights, folds BatchNorm into the preceding conv (a per-output-channel scale,
so zeros stay zeros) and bakes the input normalisation into the graph, so exported models take
[0, 1] images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.errors import SwatError
from training.rundir import Run, load_trained_model, read_run
from training.topk import topk_weight


class Normalize(nn.Module):
    """(x - mean) / std per channel, inside the graph so users feed raw [0, 1] images."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class InferenceModel(nn.Module):
    """What exports contain: normalisation, then the pruned, BN-folded network."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - ONNX input name
        return self.net(self.normalize(input))


@dataclass
class SparseLayer:
    name: str
    shape: list[int]
    expected_sparsity: float
    measured_sparsity: float


@dataclass
class SparseModel:
    """The pruned model: an eval-mode ``InferenceModel`` plus what verify and export report."""

    module: InferenceModel
    run: Run
    layers: list[SparseLayer] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        h, w = self.run.meta["image_size"]
        return (1, self.run.meta["in_channels"], h, w)

    def weights(self) -> dict[str, torch.Tensor]:
        """Prunable weights by run.json layer name (the tensors exports store)."""
        params = dict(self.module.net.named_parameters())
        return {layer.name: params[f"{layer.name}.weight"].detach() for layer in self.layers}


def sparsity_of(t: torch.Tensor) -> float:
    return float((t == 0).sum().item()) / max(t.numel(), 1)


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a conv into that conv's weight and bias."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(net.eval(), inplace=False)
    except Exception as e:  # symbolic tracing fails on data-dependent control flow
        raise SwatError(f"cannot fold BatchNorm in this model ({type(e).__name__}: {e}); "
                        f"its forward must be traceable by torch.fx") from None


def plain_pruned_net(run: Run) -> nn.Module:
    """The trained net with TopK applied to its weights and the SWAT surgery removed."""
    from training.swatify import unswatify

    model = load_trained_model(run)
    with torch.no_grad():
        modules = dict(model.named_modules())
        for layer in run.layers:
            if layer["sparsity"] > 0:
                w = modules[layer["name"]].weight
                w.copy_(topk_weight(w, layer["sparsity"], layer.get("topk", run.meta.get("topk", "nchw"))))
    return unswatify(model).eval()


def prune(run_dir: str | Path | Run) -> SparseModel:
    """``swat prune``: the deployable model of a run dir, predictions unchanged."""
    run = run_dir if isinstance(run_dir, Run) else read_run(run_dir)
    net = fold_batchnorm(plain_pruned_net(run))
    norm = run.meta.get("normalization") or {"mean": [0.0], "std": [1.0]}
    module = InferenceModel(net, norm["mean"], norm["std"]).eval()
    params = dict(module.net.named_parameters())
    layers = []
    for layer in run.layers:
        key = f"{layer['name']}.weight"
        if key not in params:
            raise SwatError(f"layer {layer['name']!r} of run.json is not in the model; the run dir is "
                            f"inconsistent - retrain it")
        w = params[key]
        layers.append(SparseLayer(layer["name"], list(w.shape), float(layer["sparsity"]), sparsity_of(w)))
    return SparseModel(module=module, run=run, layers=layers)


def layer_rows(sm: SparseModel) -> list[dict[str, Any]]:
    return [{"name": l.name, "shape": l.shape, "expected_sparsity": l.expected_sparsity,
             "measured_sparsity": l.measured_sparsity} for l in sm.layers]
