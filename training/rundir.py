"""The run dir: the one format every later stage reads.

``swat train --out RUN`` writes::

    RUN/run.json            what was trained and how (contract keys of DESIGN.md + config)
    RUN/model.safetensors   final dense weights and buffers (state_dict keys of the plain model)
    RUN/swat_state.safetensors  Top-K thresholds / counters, so a reload behaves the same
    RUN/metrics.jsonl       one JSON object per epoch
    RUN/checkpoint.safetensors  latest resumable state (model, optimizer, RNG, Top-K state)
    RUN/*.png               plots

Pruning, export and verify read only these files (never the trainer's objects), so a run dir
copied to another machine is all they need.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.config import TrainConfig
from training.errors import SwatError
from training.fileio import load_tensors, sha256_file

RUN_FORMAT_VERSION = 1
RUN_JSON = "run.json"
WEIGHTS = "model.safetensors"
SWAT_STATE = "swat_state.safetensors"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.safetensors"


def prepare_out_dir(out: str | Path, force: bool) -> Path:
    """Create the run dir, refusing to overwrite a user's earlier run without ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SwatError(f"--out {out} is a file, not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SwatError(f"run dir {out} already exists and is not empty; pass --force to overwrite "
                        f"it or --resume {out} to continue it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SwatError(f"cannot write to run dir {out} ({e.strerror}); choose a writable --out") from None
    if force:
        for name in (RUN_JSON, WEIGHTS, SWAT_STATE, METRICS, CHECKPOINT):
            (out / name).unlink(missing_ok=True)
    return out


@dataclass
class Run:
    """A finished (or in-progress) run dir, as read from disk."""

    path: Path
    meta: dict[str, Any]

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.from_json(self.meta["config"])

    @property
    def layers(self) -> list[dict[str, Any]]:
        return list(self.meta.get("layers", []))

    def file(self, name: str) -> Path:
        return self.path / name


def read_run(path: str | Path, need_weights: bool = True) -> Run:
    """Open a run dir with clear errors for the ways it can be missing or damaged."""
    path = Path(path)
    if not path.exists():
        raise SwatError(f"run dir {path} not found; train one with `swat train --out {path}`")
    if not path.is_dir():
        raise SwatError(f"{path} is not a run dir (a directory written by `swat train --out`)")
    rj = path / RUN_JSON
    if not rj.is_file():
        raise SwatError(f"{path} has no {RUN_JSON}; it is not a finished run dir "
                        f"(train with `swat train --out {path}` or resume with `swat train --resume {path}`)")
    try:
        meta = json.loads(rj.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SwatError(f"{rj} is not valid JSON ({e}); re-run training to recreate it") from None
    if not isinstance(meta, dict) or "config" not in meta:
        raise SwatError(f"{rj} lacks the 'config' section; it was not written by swat train")
    if meta.get("format_version", 1) > RUN_FORMAT_VERSION:
        raise SwatError(f"{rj} has format_version {meta['format_version']}, newer than this swat "
                        f"reads ({RUN_FORMAT_VERSION}); upgrade swat")
    if need_weights and not (path / WEIGHTS).is_file():
        raise SwatError(f"{path} has no {WEIGHTS}; the run did not finish - resume it with "
                        f"`swat train --resume {path}`")
    return Run(path=path, meta=meta)


def build_model(config: TrainConfig, num_classes: int, in_channels: int) -> nn.Module:
    """The plain architecture, then SWAT surgery exactly as training applied it."""
    import models
    from training.swatify import swatify

    try:
        model = models.build(config.model, num_classes=num_classes, in_channels=in_channels,
                             **config.model_cfg)
    except ValueError as e:
        raise SwatError(str(e)) from None
    swatify(model, sparsity=config.sparsity, mode=config.mode, topk=config.topk,
            refresh_every=config.refresh_every, exclude=config.exclude,
            per_layer=config.per_layer or None, budget=config.budget)
    return model


def load_trained_model(run: Run | str | Path, verify_hash: bool = True) -> nn.Module:
    """The trained model in eval mode, computing what training's final evaluation computed."""
    from training.swatify import load_swat_state_dict

    if not isinstance(run, Run):
        run = read_run(run)
    weights = run.file(WEIGHTS)
    if verify_hash and run.meta.get("weights_sha256") and sha256_file(weights) != run.meta["weights_sha256"]:
        raise SwatError(f"{weights} does not match the hash in run.json (edited or corrupted); "
                        f"restore it or retrain", exit_code=1)
    model = build_model(run.config, run.meta["num_classes"], run.meta["in_channels"])
    state, _ = load_tensors(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise SwatError(f"{weights} does not fit model {run.meta['model']!r} ({first}); "
                        f"the weights belong to another run") from None
    sw = run.file(SWAT_STATE)
    if sw.is_file():
        load_swat_state_dict(model, load_tensors(sw)[0])
    return model.eval()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / METRICS
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a killed run: ignore it and what follows
    return rows


def state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
