"""Batching and evaluation of a data set: the public surface deploy tools use.

Why its own module: ``swat_deploy`` (verify, int8 calibration) and the Trainer iterate the same
data sets the same way and judge a model with the same loss and accuracy; neither needs the
other's internals.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from training import data as datasets

__all__ = ["EVAL_BATCH", "as_unit", "iterate_batches", "evaluate"]

EVAL_BATCH = 256


def as_unit(x: torch.Tensor) -> torch.Tensor:
    """Images as float in [0, 1]: uint8 data sets are stored as bytes to save memory."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def iterate_batches(ds: Any, order: torch.Tensor, batch_size: int, workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches in ``order``: a fast slice for in-memory sets, a DataLoader for file-backed ones."""
    if hasattr(ds, "images") and hasattr(ds, "labels"):
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            yield as_unit(ds.images[idx]), ds.labels[idx].long()
        return
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, order.tolist()), batch_size=batch_size,
                                         shuffle=False, num_workers=workers)
    for x, y in loader:
        yield as_unit(x), torch.as_tensor(y).long()


@torch.no_grad()
def evaluate(model: nn.Module, ds: Any, info: Any, device: torch.device, batch_size: int = EVAL_BATCH,
             return_logits: bool = False, indices: torch.Tensor | None = None) -> dict[str, Any]:
    """Loss and top-1 accuracy of ``model`` in eval mode: the model's inference form.

    ``indices``: evaluate only these samples (a rank's shard); the sums come back too so shards add up.
    """
    was_training = model.training
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    chunks = []
    for x, y in iterate_batches(ds, torch.arange(len(ds)) if indices is None else indices, batch_size):
        x, y = datasets.normalize(x.to(device), info), y.to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += y.numel()
        if return_logits:
            chunks.append(logits.cpu())
    model.train(was_training)
    out: dict[str, Any] = {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1), "n": total,
                           "correct": correct, "loss_sum": loss_sum}
    if return_logits:
        out["logits"] = torch.cat(chunks) if chunks else torch.empty(0)
    return out
