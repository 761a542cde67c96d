"""SWAT training: Top-K selection, the SWAT / SAW / meProp layers, data sets and the Trainer.

``models`` knows nothing of SWAT; this package turns any model's Conv2d / Linear layers into
SWAT layers by module surgery (:func:`swatify`) and trains them.
"""
import swat_native  # noqa: F401  (first: it shortens OpenMP's idle spin before torch loads)
from training.errors import SwatError
from training.swatify import (layer_stats, layer_table, load_swat_state_dict, swat_layers, swat_state_dict,
                              swatify, unswatify)
from training.topk import keep_count, topk_mask
from training.weight_topk import topk_weight

__all__ = ["SwatError", "swatify", "unswatify", "swat_layers", "layer_table", "layer_stats", "swat_state_dict",
           "load_swat_state_dict", "topk_mask", "topk_weight", "keep_count", "TrainConfig", "train", "resume"]


def __getattr__(name: str):
    # the trainer pulls in data sets and plotting: import it only when asked for
    if name == "TrainConfig":
        from training.config import TrainConfig
        return TrainConfig
    if name in ("train", "resume"):
        from training import launch
        return getattr(launch, name)
    raise AttributeError(name)
