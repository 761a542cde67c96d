"""The run dir: the one format every later stage reads.

``swat train --out RUN`` writes::

    RUN/run.json            what was trained and how (contract keys of DESIGN.md + config)
    RUN/model.safetensors   final dense weights and buffers (state_dict keys of the plain model)
    RUN/swat_state.safetensors  Top-K thresholds / counters, so a reload behaves the same
    RUN/metrics.jsonl       one JSON object per epoch
    RUN/checkpoint.safetensors  latest resumable state (model, optimizer, RNG, Top-K state)
    RUN/*.png               plots
    RUN/exports.json        what `swat export` wrote into the run dir (so verify knows what to expect)

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
from training.errors import FAILED, SwatError, option
from training.fileio import (HASH_SCHEME, atomic_write_json, check_writable_dir, load_tensors,
                             sha256_file, sha256_tensors)

RUN_FORMAT_VERSION = 1
RUN_JSON = "run.json"
WEIGHTS = "model.safetensors"
SWAT_STATE = "swat_state.safetensors"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.safetensors"
EXPORTS = "exports.json"
PLOTS = ("curves.png", "sparsity.png")
# files of a run that `swat train --force` removes besides those listed in exports.json: the
# default export / prune / bench outputs of every version (a stale model.onnx next to new weights
# would fail verify, or worse, be deployed)
DERIVED = ("model.onnx", "model.onnx.data", "model.pt", "model.int8.onnx", "model.int8.onnx.data",
           "sparse.safetensors", "bench_sweep.png")


def check_out_dir(out: str | Path, force: bool) -> Path:
    """Everything :func:`prepare_out_dir` would refuse, checked without creating anything."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SwatError(f"{option('out')} {out} is a file, not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SwatError(f"run dir {out} already exists and is not empty; pass {option('force')} to overwrite "
                        f"it or {option('resume')} {out} to continue it")
    check_writable_dir(out, "run dir")
    return out


def prepare_out_dir(out: str | Path, force: bool) -> Path:
    """Create the run dir, refusing to overwrite a user's earlier run without ``force``.

    With ``force`` every file an earlier run in ``out`` left (weights, checkpoint, metrics, plots,
    and its exports) is removed first, so nothing of the old run can be mistaken for the new one;
    files swat does not write are left alone.
    """
    out = check_out_dir(out, force)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SwatError(f"cannot write to run dir {out} ({e.strerror}); choose a writable {option('out')}") from None
    check_writable_dir(out, "run dir")
    if force:
        for name in stale_files(out):
            try:
                (out / name).unlink(missing_ok=True)
            except IsADirectoryError:
                pass  # a directory the user made under one of our names: not ours to remove
            except OSError as e:
                raise SwatError(f"cannot remove {out / name} of the earlier run ({e.strerror}); remove it "
                                f"yourself or choose another {option('out')}") from None
    return out


def stale_files(out: Path) -> list[str]:
    """Names of the files in ``out`` that an earlier run (or its exports) wrote.

    The default export names count only in a dir an earlier run wrote (a ``model.onnx`` in some
    other folder given to ``--out --force`` may be the user's own).
    """
    core = {RUN_JSON, WEIGHTS, SWAT_STATE, METRICS, CHECKPOINT, EXPORTS}
    names = set(core)
    if any((out / n).is_file() for n in core):
        names.update((*PLOTS, *DERIVED))
    for name in read_exports(out):
        names.add(name)
        names.add(name + ".data")  # ONNX external data
    return sorted(n for n in names if (out / n).is_file() or (out / n).is_symlink())


# -- exports.json: what `swat export` wrote into the run dir ---------------------------------
def read_exports(run_dir: str | Path) -> dict[str, str]:
    """File name (inside the run dir) -> format, of every export written there; {} if none.

    Only plain names inside the run dir are returned: the manifest is read as untrusted input.
    """
    p = Path(run_dir) / EXPORTS
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get("exports") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        return {}
    return {name: fmt for name, fmt in entries.items()
            if isinstance(name, str) and isinstance(fmt, str) and name and "/" not in name
            and "\\" not in name and name not in (".", "..") and "\0" not in name}


def record_export(run_dir: str | Path, path: str | Path, fmt: str) -> None:
    """Note in ``RUN/exports.json`` that ``path`` (a file inside the run dir) was exported."""
    run_dir, path = Path(run_dir), Path(path)
    try:
        if path.resolve().parent != run_dir.resolve():
            return  # exported elsewhere: not part of the run dir, not expected there
    except OSError:
        return
    entries = read_exports(run_dir)
    entries[path.name] = fmt
    atomic_write_json(run_dir / EXPORTS, {"exports": dict(sorted(entries.items()))})


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
        raise SwatError(f"run dir {path} not found; check the path, or train a run into it ({option('out')} {path})")
    if not path.is_dir():
        raise SwatError(f"{path} is not a run dir (the directory a training run writes, its {option('out')})")
    rj = path / RUN_JSON
    if not rj.is_file():
        raise SwatError(f"{path} has no {RUN_JSON}; it is not a finished run dir "
                        f"(train into it with {option('out')} {path}, or continue it with {option('resume')} {path})")
    try:
        meta = json.loads(rj.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SwatError(f"{rj} is not valid JSON ({e}); re-run training to recreate it") from None
    except OSError as e:
        raise SwatError(f"cannot read {rj} ({e.strerror}); check its permissions") from None
    if not isinstance(meta, dict) or "config" not in meta:
        raise SwatError(f"{rj} lacks the 'config' section; it was not written by SWAT training")
    version = meta.get("format_version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > RUN_FORMAT_VERSION:
        raise SwatError(f"{rj} has format_version {version}, newer than this swat "
                        f"reads ({RUN_FORMAT_VERSION}); upgrade swat")
    problem = run_meta_problem(meta)
    if problem:
        raise SwatError(f"{rj} is not a run.json as SWAT training writes it: {problem}; restore the file or "
                        f"re-run training")
    if need_weights and not (path / WEIGHTS).is_file():
        raise SwatError(f"{path} has no {WEIGHTS}; the run did not finish - resume it with "
                        f"{option('resume')} {path}")
    return Run(path=path, meta=meta)


def _is_int(v: Any, low: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low)


def _is_num(v: Any) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def run_meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a run.json (None if nothing): every later stage indexes
    these keys, so a hand-edited file must fail here with one line, not deep inside with a
    KeyError."""
    if not _is_int(meta.get("format_version", 1)):
        return "'format_version' must be an integer"
    for key in ("model", "dataset"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            return f"'{key}' must be a non-empty string"
    for key in ("mode", "topk", "weights_sha256", "weights_hash", "producer"):
        if key in meta and not isinstance(meta[key], str):
            return f"'{key}' must be a string"
    for key in ("num_classes", "in_channels"):
        if not _is_int(meta.get(key), 1):
            return f"'{key}' must be a positive integer"
    for key in ("epochs", "seed"):
        if key in meta and not _is_int(meta[key]):
            return f"'{key}' must be an integer"
    for key in ("test_accuracy", "sparsity"):
        if key in meta and not _is_num(meta[key]):
            return f"'{key}' must be a number"
    if "test_accuracy" not in meta:
        return "'test_accuracy' is missing"
    size = meta.get("image_size")
    if size is not None and not (isinstance(size, list) and len(size) == 2 and all(_is_int(d, 1) for d in size)):
        return "'image_size' must be [height, width] in pixels"
    norm = meta.get("normalization")
    if norm is not None and not (isinstance(norm, dict) and all(
            isinstance(norm.get(k), list) and norm[k] and all(_is_num(x) for x in norm[k]) for k in ("mean", "std"))):
        return "'normalization' must be {\"mean\": [numbers], \"std\": [numbers]}"
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        return "'class_names' must be a list of strings"
    layers = meta.get("layers")
    if not isinstance(layers, list):
        return "'layers' must be a list of {name, shape, sparsity}"
    for i, layer in enumerate(layers):
        if not (isinstance(layer, dict) and isinstance(layer.get("name"), str)
                and isinstance(layer.get("shape"), list) and all(_is_int(d, 0) for d in layer["shape"])
                and _is_num(layer.get("sparsity")) and 0.0 <= layer["sparsity"] <= 1.0):
            return f"layers[{i}] must be {{name: str, shape: [ints], sparsity: number in [0, 1]}}"
        for key in ("train_sparsity",):
            if key in layer and not (_is_num(layer[key]) and 0.0 <= layer[key] < 1.0):
                return f"layers[{i}].{key} must be a number in [0, 1)"
        if "topk" in layer and not isinstance(layer["topk"], str):
            return f"layers[{i}].topk must be a string"
    if not isinstance(meta.get("config"), dict):
        return "'config' must be an object"
    try:
        TrainConfig.from_json(meta["config"]).validate()
    except SwatError as e:
        return f"its config is invalid ({e})"
    except (TypeError, ValueError, AttributeError) as e:
        return f"its config is invalid ({type(e).__name__}: {e})"
    return None


def build_model(config: TrainConfig, num_classes: int, in_channels: int) -> nn.Module:
    """The plain architecture, then SWAT surgery exactly as training applied it."""
    import models
    from training.swatify import swatify

    try:
        model = models.build(config.model, num_classes=num_classes, in_channels=in_channels,
                             **config.model_cfg)
    except ValueError as e:
        raise SwatError(str(e)) from None
    if config.forward_only:  # the Figure 2a ablation: sparse forward, dense backward, no SWAT layers
        from training.forward_only import forward_only
        return forward_only(model, config.sparsity, config.topk, what=config.forward_only, exclude=config.exclude)
    swatify(model, sparsity=config.sparsity, mode=config.mode, topk=config.topk,
            refresh_every=config.refresh_every, exclude=config.exclude,
            per_layer=config.per_layer or None, budget=config.budget,
            cache_weight_threshold=config.cache_weight_threshold, block=config.block)
    return model


def weights_hash_ok(run: Run, state: dict[str, torch.Tensor] | None = None) -> bool:
    """Does RUN/model.safetensors hold the tensors run.json's ``weights_sha256`` names?

    The hash is of the tensors (:func:`training.fileio.sha256_tensors`); run dirs written
    before that (no ``weights_hash`` key) recorded a hash of the file's bytes.
    """
    want = run.meta.get("weights_sha256")
    if not want:
        return True
    weights = run.file(WEIGHTS)
    if run.meta.get("weights_hash") == HASH_SCHEME:
        if state is None:
            state, _ = load_tensors(weights)
        return sha256_tensors(state) == want
    return sha256_file(weights) == want


def load_trained_model(run: Run | str | Path, verify_hash: bool = True) -> nn.Module:
    """The trained model in eval mode, computing what training's final evaluation computed."""
    from training.swatify import load_swat_state_dict

    if not isinstance(run, Run):
        run = read_run(run)
    weights = run.file(WEIGHTS)
    state, _ = load_tensors(weights)
    if verify_hash and not weights_hash_ok(run, state):
        raise SwatError(f"{weights} does not match the hash in run.json (edited or corrupted); "
                        f"restore it or retrain", kind=FAILED)
    model = build_model(run.config, run.meta["num_classes"], run.meta["in_channels"])
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


def read_metrics(run_dir: str | Path, bad_lines: list[int] | None = None) -> list[dict[str, Any]]:
    """The per-epoch rows of metrics.jsonl; lines that are not a JSON object are skipped.

    A run killed mid-write leaves a torn last line, but a torn line can sit anywhere (a copy cut
    short and appended to, a disk hiccup): skipping only that line keeps every valid row after
    it. ``bad_lines`` receives the 1-based numbers of the skipped lines.
    """
    p = Path(run_dir) / METRICS
    if not p.is_file():
        return []
    rows = []
    text = p.read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and _is_int(row.get("epoch"), 1):
            rows.append(row)
        elif bad_lines is not None:
            bad_lines.append(number)
    return rows

