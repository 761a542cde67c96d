"""Learning-rate schedules as pure functions of the epoch.

Deriving the rate from the epoch index (instead of a stateful scheduler object) means a resumed
run needs nothing but the epoch number to continue bit-identically.
"""
from __future__ import annotations

import math

from training.config import TrainConfig


def lr_at(config: TrainConfig, epoch: int) -> float:
    """Rate for 0-based ``epoch``: ``step`` (/10 at 50 % and 75 % of training - this project's
    default, not the paper's), ``thirds`` (/10 at 1/3 and 2/3: the shape of the paper's CIFAR
    schedule, 50 / 100 of 150 epochs), cosine or constant."""
    base = config.lr
    if config.warmup_epochs and epoch < config.warmup_epochs:
        return base * (epoch + 1) / (config.warmup_epochs + 1)
    if config.schedule == "constant":
        return base
    if config.schedule == "thirds":
        milestones = (int(round(config.epochs / 3)), int(round(2 * config.epochs / 3)))
        return base * (0.1 ** sum(epoch >= m for m in milestones if m > 0))
    if config.schedule == "step":
        milestones = (int(config.epochs * 0.5), int(config.epochs * 0.75))
        return base * (0.1 ** sum(epoch >= m for m in milestones if m > 0))
    # cosine over the epochs after warm-up
    span = max(1, config.epochs - config.warmup_epochs)
    t = (epoch - config.warmup_epochs) / span
    return base * 0.5 * (1.0 + math.cos(math.pi * t))
