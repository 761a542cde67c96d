"""Typed configuration of a training run, serialised to versioned JSON.

One dataclass holds every knob ``swat train`` exposes, so the CLI, a notebook and a resumed run
all describe a run the same way, and ``run.json`` can rebuild it exactly.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from training.errors import SwatError, option

CONFIG_VERSION = 1
# The choices of each knob, defined here once (this module imports nothing heavy); topk,
# budget, swatify and measure import them.
MODES = ("dense", "swat", "saw", "meprop")
TOPK_VARIANTS = ("nchw", "chw", "hw", "random")
BUDGETS = ("uniform", "erk")
SCHEDULES = ("step", "thirds", "cosine", "constant")
FORWARD_ONLY = ("", "weights", "activations")
DEVICES = ("auto", "cpu", "cuda")
# The paper trains with batch 128; digits has only 1437 training images, where 128 would give
# 11 steps an epoch - 32 gives enough steps to converge in the 15-epoch demo.
DEFAULT_BATCH_SIZE = 128
DATASET_BATCH_SIZE = {"digits": 32}


@dataclass
class TrainConfig:
    model: str = "lenet5"
    dataset: str = "digits"
    data_dir: str | None = None
    mode: str = "swat"
    sparsity: float = 0.7
    topk: str = "nchw"
    refresh_every: int = 1
    cache_weight_threshold: bool = False  # refresh the weight Top-K threshold every N steps too
    forward_only: str = ""  # "weights" | "activations": the Figure 2a ablation (mode dense only)
    budget: str = "uniform"
    block: int = 1  # consecutive output channels sharing one weight zero pattern (training.blocks)
    exclude: tuple[str, ...] = ()
    per_layer: dict[str, float] = field(default_factory=dict)
    epochs: int = 15
    batch_size: int | None = None  # None: the data set's default (see DATASET_BATCH_SIZE)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "step"
    warmup_epochs: int = 0
    seed: int = 0
    workers: int = 0
    device: str = "auto"
    limit: int | None = None
    model_cfg: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        """Reject bad values up front so a run never dies after an hour of training."""
        if self.batch_size is None:
            self.batch_size = DATASET_BATCH_SIZE.get(self.dataset, DEFAULT_BATCH_SIZE)
        def bad(what: str, fix: str) -> SwatError:
            return SwatError(f"invalid {what}; {fix}")

        import models  # the registry: an unknown name fails here, before a run dir is created
        from training import data as datasets

        if not isinstance(self.model, str) or self.model not in models.names():
            raise bad(f"model {self.model!r}", f"choose one of: {', '.join(models.names())}")
        if not isinstance(self.dataset, str):
            raise bad(f"dataset {self.dataset!r}", f"choose one of: {', '.join(datasets.names())}")
        datasets.canonical(self.dataset)  # unknown name: a SwatError listing the data sets
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise bad(f"sparsity {self.sparsity!r}", f"use a value in [0, 1), e.g. {option('sparsity')} 0.7")
        if self.mode not in MODES:
            raise bad(f"mode {self.mode!r}", f"choose one of: {', '.join(MODES)}")
        if self.topk not in TOPK_VARIANTS:
            raise bad(f"topk {self.topk!r}", f"choose one of: {', '.join(TOPK_VARIANTS)}")
        if self.budget not in BUDGETS:
            raise bad(f"budget {self.budget!r}", f"choose one of: {', '.join(BUDGETS)}")
        if self.forward_only not in FORWARD_ONLY:
            raise bad(f"forward-only {self.forward_only!r}", "choose weights or activations (or leave it unset)")
        if self.forward_only and self.mode != "dense":
            raise bad(f"forward-only {self.forward_only!r} with mode {self.mode!r}",
                      f"use {option('mode')} dense: the forward-only ablation sparsifies the forward and keeps "
                      f"the backward dense")
        if not isinstance(self.cache_weight_threshold, bool):
            raise bad(f"cache_weight_threshold {self.cache_weight_threshold!r}", "use true or false")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1 \
                or self.block & (self.block - 1):
            raise bad(f"block {self.block!r}", "use a power of two: 1 (unstructured), 2, 4, 8 or 16")
        if self.block > 1 and (self.mode not in ("swat", "saw") or self.topk == "random" or self.forward_only):
            raise bad(f"block {self.block} with mode {self.mode!r}, topk {self.topk!r}",
                      f"blocks shape the weight Top-K of {option('mode')} swat / saw with {option('topk')} "
                      f"nchw, chw or hw; use {option('block')} 1 otherwise")
        if self.schedule not in SCHEDULES:
            raise bad(f"schedule {self.schedule!r}", f"choose one of: {', '.join(SCHEDULES)}")
        if self.device not in DEVICES:
            raise bad(f"device {self.device!r}", f"choose one of: {', '.join(DEVICES)}")
        for name, value, low in (("epochs", self.epochs, 1), ("batch size", self.batch_size, 1),
                                 ("refresh-every", self.refresh_every, 1), ("workers", self.workers, 0),
                                 ("warmup epochs", self.warmup_epochs, 0)):
            if not isinstance(value, int) or value < low:
                raise bad(f"{name} {value!r}", f"use an integer >= {low}")
        for name, value in (("lr", self.lr), ("momentum", self.momentum), ("weight decay", self.weight_decay)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise bad(f"{name} {value!r}", "use a finite number >= 0")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise bad(f"limit {self.limit!r}", "use a positive number of training samples or leave it unset")
        for name, s in self.per_layer.items():
            if not (isinstance(s, (int, float)) and 0.0 <= s < 1.0):
                raise bad(f"per-layer sparsity {name}={s!r}", "use values in [0, 1)")
        return self

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["exclude"] = list(self.exclude)
        d["version"] = CONFIG_VERSION
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TrainConfig":
        d = dict(d)
        version = d.pop("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise SwatError(f"config version {version} is newer than this swat understands "
                            f"({CONFIG_VERSION}); upgrade swat")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SwatError(f"unknown config keys {unknown}; remove them or upgrade swat")
        if "exclude" in d:
            d["exclude"] = tuple(d["exclude"])
        return cls(**d)
