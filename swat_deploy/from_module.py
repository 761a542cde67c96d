"""Deploying a module trained in your own loop: the run-dir description a module can supply.

Every exporter and verifier works on a :class:`swat_deploy.prune.SparseModel`, which pairs the
pruned network with the run that produced it. A module trained outside ``swat train`` has no
run dir, so :func:`module_run` writes the run.json a run dir would hold, from what the module
itself tells (its SWAT layers via :func:`training.swatify.layer_table`, input shape from an
example, class count from its output) plus what only the caller knows (normalisation, class
names). Pruning, BN folding, compact storage and metadata then take the one path run dirs
take (:func:`swat_deploy.prune.sparse_model`), so a module export and a run-dir export of the
same weights are the same file up to the provenance keys.

Provenance: ``source`` is ``"module"``; ``run_weights_sha256`` is the hash of the module's
``state_dict`` at export time (the same hash ``swat train`` records for its weights), so a
verify can tell the exported module from another one.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from training.errors import SwatError
from training.rundir import Run

Normalization = Mapping[str, Sequence[float]] | tuple[Sequence[float], Sequence[float]] | None


def check_example(example_input: Any) -> torch.Tensor:
    """The example batch must be what exported files take: float NCHW images."""
    if not isinstance(example_input, torch.Tensor):
        raise SwatError(f"example_input must be a torch.Tensor batch of images (N, C, H, W), got "
                        f"{type(example_input).__name__}")
    if example_input.dim() != 4 or example_input.shape[0] < 1:
        raise SwatError(f"example_input must have shape (N, C, H, W) with N >= 1, got {list(example_input.shape)}; "
                        f"exported models take NCHW image batches")
    if not example_input.is_floating_point():
        raise SwatError(f"example_input must be float images in [0, 1], got dtype {example_input.dtype}")
    return example_input.detach().to("cpu", torch.float32)


def normalization_dict(normalize: Normalization, channels: int) -> dict[str, list[float]]:
    """``normalize`` as run.json's ``{"mean": [...], "std": [...]}`` ({} for none), validated."""
    if normalize is None or (isinstance(normalize, Mapping) and not normalize):
        return {}
    if isinstance(normalize, Mapping):
        mean, std = normalize.get("mean"), normalize.get("std")
    elif isinstance(normalize, (tuple, list)) and len(normalize) == 2:
        mean, std = normalize
    else:
        raise SwatError("normalize must be (mean, std), {'mean': [...], 'std': [...]} or None")
    try:
        mean = [float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean])]
        std = [float(v) for v in (std if isinstance(std, (list, tuple)) else [std])]
    except (TypeError, ValueError):
        raise SwatError("normalize mean and std must be numbers or lists of numbers, one per channel") from None
    for what, vals in (("mean", mean), ("std", std)):
        if len(vals) not in (1, channels):
            raise SwatError(f"normalize {what} has {len(vals)} values; give 1 or one per input channel ({channels})")
    if any(not (s > 0) for s in std):
        raise SwatError(f"normalize std must be positive, got {std}")
    return {"mean": mean, "std": std}


def _only(values: list[Any], default: Any) -> Any:
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else ("+".join(map(str, distinct)) if distinct else default)


def module_run(model: nn.Module, example_input: torch.Tensor, *, normalize: Normalization = None,
               class_names: Sequence[str] | None = None, name: str | None = None) -> tuple[Run, nn.Module]:
    """(the run.json a run dir would hold for ``model``, an eval-mode CPU copy of ``model``).

    ``model`` itself is left untouched (mode, device, weights): exporting must not disturb a
    training loop that carries on afterwards.
    """
    from training.swatify import layer_table
    from swat_deploy.prune import Normalize

    if not isinstance(model, nn.Module):
        raise SwatError(f"expected a torch.nn.Module, got {type(model).__name__}")
    x = check_example(example_input)
    norm = normalization_dict(normalize, x.shape[1])
    weights_hash = module_weights_sha256(model)
    net = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        try:
            inp = Normalize(norm["mean"], norm["std"])(x) if norm else x
            logits = net(inp)
        except Exception as e:
            raise SwatError(f"the model does not run on example_input of shape {list(x.shape)} "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass one batch of "
                            f"the images it takes") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise SwatError("the model must return one tensor of logits (N, classes) for export; wrap it so it does")
    names = list(class_names) if class_names is not None else []
    if names and (len(names) != logits.shape[1] or not all(isinstance(n, str) for n in names)):
        raise SwatError(f"class_names must be {logits.shape[1]} strings (one per output), got {len(names)} items")
    layers = layer_table(net)
    counts = [l["train_sparsity"] * float(torch.Size(l["shape"]).numel()) for l in layers]
    total = sum(float(torch.Size(l["shape"]).numel()) for l in layers)
    sparsities = [l["train_sparsity"] for l in layers]
    # one number like swatify's argument: the shared value, else the weight-weighted mean (ERK's target)
    sparsity = sparsities[0] if len(set(sparsities)) == 1 else (round(sum(counts) / total, 10) if total else 0.0)
    meta = {
        "source": "module",
        "producer": "",
        "model": name or type(model).__name__,
        "dataset": "unknown",
        "num_classes": int(logits.shape[1]),
        "in_channels": int(x.shape[1]),
        "image_size": [int(x.shape[2]), int(x.shape[3])],
        "mode": _only([l["mode"] for l in layers], "dense"),
        "sparsity": float(sparsity),
        "topk": _only([l["topk"] for l in layers], "nchw"),
        "block": max((int(l.get("block", 1)) for l in layers), default=1),
        "epochs": None,
        "seed": None,
        "test_accuracy": None,
        "train_accuracy_last_epoch": None,
        "normalization": norm,
        "class_names": names,
        "layers": layers,
        "weights_sha256": weights_hash,
        "torch": torch.__version__,
    }
    return Run(path=Path(), meta=meta), net


def prune_module(model: nn.Module, example_input: torch.Tensor, *, normalize: Normalization = None,
                 class_names: Sequence[str] | None = None, name: str | None = None) -> Any:
    """The deployable :class:`swat_deploy.prune.SparseModel` of a (swatified) module: Top-K as
    its eval forward applies it, BN folded, ``normalize`` inside. ``model`` is not modified."""
    from swat_deploy.prune import sparse_model

    run, net = module_run(model, example_input, normalize=normalize, class_names=class_names, name=name)
    return sparse_model(net, run)


def module_weights_sha256(model: nn.Module) -> str:
    """What a module export records as ``run_weights_sha256``: the hash of ``model``'s state_dict."""
    from training.fileio import sha256_tensors

    return sha256_tensors({k: v.detach().cpu() for k, v in model.state_dict().items()})
