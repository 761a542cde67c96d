"""What a study trains: presets (model, data, schedule, seeds) and the configurations per claim.

A *configuration* is one way of training (mode, sparsity, Top-K variant, caching, budget...);
a *run* is a configuration at one seed.  Keys are stable strings: ``runs.jsonl`` is keyed by
``(key, seed)``, so a renamed configuration would be retrained - never rename one.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from training.errors import SwatError, option

__all__ = ["Config", "Preset", "PRESETS", "preset", "block_supported", "runs_of", "claim_configs"]


@dataclass(frozen=True)
class Config:
    """One way of training; ``forward_only`` ("weights" / "activations") implies mode dense."""

    key: str
    mode: str
    sparsity: float = 0.0
    topk: str = "nchw"
    refresh_every: int = 1
    cache_weight_threshold: bool = False
    budget: str = "uniform"
    forward_only: str = ""
    block: int = 1
    what: str = ""  # one line for the report

    def train_options(self) -> dict[str, Any]:
        """The TrainConfig fields this configuration sets (the rest come from the preset)."""
        opts: dict[str, Any] = {"mode": self.mode, "sparsity": self.sparsity, "topk": self.topk,
                                "refresh_every": self.refresh_every,
                                "cache_weight_threshold": self.cache_weight_threshold,
                                "budget": self.budget, "forward_only": self.forward_only}
        if self.block != 1:
            opts["block"] = self.block
        return opts


def _configs() -> list[Config]:
    """The issue's list, most important first; configurations needing ``block`` come last."""
    c: list[Config] = [Config("dense", "dense", what="dense baseline")]
    for s in (50, 70, 80, 90):
        c.append(Config(f"swat-{s}", "swat", s / 100, what=f"SWAT {s} % (sparse forward and backward)"))
        c.append(Config(f"saw-{s}", "saw", s / 100, what=f"SAW {s} % (dense forward, sparse backward)"))
    for s in (30, 50, 70):
        c.append(Config(f"meprop-{s}", "meprop", s / 100, what=f"meProp {s} % (Top-K of output gradients)"))
    for t in ("chw", "hw", "random"):  # nchw at 70 % is saw-70; the paper's Figure 3 uses SAW
        c.append(Config(f"saw-70-{t}", "saw", 0.7, topk=t, what=f"SAW 70 %, Top-K {t}"))
    c.append(Config("swat-90-erk", "swat", 0.9, budget="erk", what="SWAT 90 %, ERK budget (uniform: swat-90)"))
    for r in (20, 100):  # refresh 1 is swat-70 (caching at N = 1 is the exact computation)
        c.append(Config(f"swat-70-r{r}", "swat", 0.7, refresh_every=r, cache_weight_threshold=True,
                        what=f"SWAT 70 %, weight and activation thresholds refreshed every {r} steps"))
    c.append(Config("fwd-weights-70", "dense", 0.7, forward_only="weights",
                    what="forward-only TopK(W) 70 %, dense backward"))
    c.append(Config("fwd-activations-70", "dense", 0.7, forward_only="activations",
                    what="forward-only TopK(a) 70 %, dense backward"))
    for s in (70, 90):
        c.append(Config(f"swat-{s}-b4", "swat", s / 100, block=4, what=f"SWAT {s} %, blocks of 4 output channels"))
    return c


@dataclass(frozen=True)
class Preset:
    """Model, data and schedule shared by every run of a study."""

    name: str
    model: str
    dataset: str
    train_limit: Optional[int]
    epochs: int
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 128
    lr: float = 0.1
    schedule: str = "thirds"
    exclude: tuple[str, ...] = ()
    configs: tuple[Config, ...] = field(default_factory=lambda: tuple(_configs()))
    note: str = ""

    def describe(self) -> str:
        data = f"{self.train_limit} training images" if self.train_limit else "all training images"
        ex = f", {', '.join(self.exclude)} kept dense" if self.exclude else ""
        return (f"{self.model} on {self.dataset} ({data}, full test set), {self.epochs} epochs, batch "
                f"{self.batch_size}, SGD lr {self.lr} momentum 0.9 wd 1e-4, schedule '{self.schedule}'{ex}, "
                f"seeds {', '.join(map(str, self.seeds))}")


RESNET20_NOTE = """\
**Why this scale.** The aim was the largest subset and epoch count that finish in about
4 hours on these 2 cores *and* keep dense ResNet-20 above 0.90; on this machine the two conflict.
Measured CPU time per training step (batch 128, 1 torch thread, two runs at a time under
`nice -n 19` on a machine shared with other jobs, so pessimistic by ~20 % against an idle
machine: dense 0.41 s/step idle vs 0.49 s shared): dense 0.49 s, SWAT / SAW 0.60-0.72 s, meProp
0.67 s, Top-K hw / random 0.94 s, forward-only activations 0.87 s; 0.69 s on average over the 22
configurations, plus ~28 s per run for start-up and the final 10k-image evaluation. For 66 runs
(22 configurations x 3 seeds), a 4-hour budget on 2 idle cores is ~700 steps per run, e.g. 20k
images x 4 epochs, and that gave dense ResNet-20 only **0.868** (seed 0, measured: `swat train --model
resnet20 --dataset fashion-mnist --mode dense --sparsity 0 --epochs 4 --limit 20000 --schedule
thirds --seed 0`; under-fitted, train accuracy 0.886), and 30k images x 3 epochs (~4.2 h) gave
**0.890** (same command with `--epochs 3 --limit 30000 --exclude conv1`). The preset therefore
uses the **full 60k training set for 3 epochs** (1407 steps per run: one epoch per learning
rate), the first option considered, at about **7.7 h on 2 idle cores**
(~9 h at the shared-machine rates above; the two blocks-of-4 configurations add 0.7 h of it).
That 60k x 3 keeps dense above 0.90 is an extrapolation from those two points until the study's
first run (dense, seed 0) is in; its accuracy is in the table below.
The schedule is `thirds`: the learning rate drops /10 at 1/3 and 2/3 of training, the *shape* of
the paper's CIFAR schedule (epochs 50 and 100 of 150), not its length."""


PRESETS: dict[str, Preset] = {
    # the full training set for 3 epochs: 20k x 4 epochs gave dense 0.868 and 30k x 3 gave 0.890,
    # both below the 0.90 the issue requires; see RESNET20_NOTE for the numbers
    "resnet20": Preset("resnet20", "resnet20", "fashion-mnist", train_limit=None, epochs=3, exclude=("conv1",),
                       note=RESNET20_NOTE),
    "lenet5": Preset("lenet5", "lenet5", "fashion-mnist", train_limit=20000, epochs=6),
    # seconds-long: checks the machinery (tests, CI)
    "tiny": Preset("tiny", "lenet5", "digits", train_limit=64, epochs=1, seeds=(0, 1), batch_size=32),
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise SwatError(f"unknown study preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def block_supported() -> bool:
    """Whether this build's swatify and TrainConfig accept ``block`` (added by another change)."""
    from training.config import TrainConfig
    from training.swatify import swatify

    return "block" in inspect.signature(swatify).parameters and "block" in TrainConfig.__dataclass_fields__


def runs_of(p: Preset, only: Optional[list[str]] = None) -> list[tuple[Config, int]]:
    """(configuration, seed) pairs in run order: seed by seed, so a partial study already has
    every configuration at the first seeds; configurations needing ``block`` last, and only
    when the build supports it."""
    known = {c.key for c in p.configs}
    if only:
        bad = [k for k in only if k not in known]
        if bad:
            raise SwatError(f"{option('only')} {', '.join(bad)}: no such configuration; known: "
                            f"{', '.join(sorted(known))}")
    blocks = block_supported()
    cfgs = [c for c in p.configs if (not only or c.key in only) and (c.block == 1 or blocks)]
    plain = [c for c in cfgs if c.block == 1]
    blocked = [c for c in cfgs if c.block != 1]
    return [(c, s) for s in p.seeds for c in plain] + [(c, s) for c in blocked for s in p.seeds]


def claim_configs(p: Preset) -> dict[str, Config]:
    return {c.key: c for c in p.configs}


def with_overrides(p: Preset, **kw: Any) -> Preset:
    return replace(p, **kw)
