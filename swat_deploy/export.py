"""Exporters: ONNX for any runtime, TorchScript for torch-only deployments.

Both take the pruned model of :mod:`swat_deploy.prune` (normalisation inside, BN folded, TopK'd
weights), so every exported file computes what training evaluated, on raw [0, 1] images.

ONNX opset 18: the newest opset every onnxruntime >= 1.14 and the torch exporter fully support,
and the first with BitwiseAnd / reduction axes as inputs, which compact weight storage uses.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from training.errors import SwatError
from training.fileio import atomic_write_bytes
from training.rundir import Run, read_run
from swat_deploy.artifact import META_PREFIX, TS_META_FILE, onnx_weights_sha256, torchscript_weights_sha256
from swat_deploy.prune import SparseModel, prune

OPSET = 18
FORMATS = ("onnx", "torchscript")
DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}


def target_path(run: Run, fmt: str, out: str | Path | None, force: bool) -> Path:
    path = Path(out) if out else run.path / DEFAULT_NAMES[fmt]
    if path.exists() and not force:
        raise SwatError(f"{path} already exists; pass --force to overwrite it or --out to choose another file")
    if path.exists() and path.is_dir():
        raise SwatError(f"{path} is a directory; give --out a file name")
    return path


def export_metadata(sm: SparseModel) -> dict[str, str]:
    """What a deployed file must carry to be judged on its own: provenance and expectations."""
    meta = sm.run.meta
    return {
        "producer": "swat",
        "version": meta.get("producer", "swat"),
        "model": meta["model"],
        "dataset": meta["dataset"],
        "mode": meta["mode"],
        "sparsity": str(meta["sparsity"]),
        "topk": meta.get("topk", "nchw"),
        "test_accuracy": repr(meta["test_accuracy"]),
        "num_classes": str(meta["num_classes"]),
        "input_shape": json.dumps([None, meta["in_channels"], *meta["image_size"]]),
        "normalization": json.dumps(meta.get("normalization", {})),
        "class_names": json.dumps(meta.get("class_names", [])),
        "layers": json.dumps([{"name": l.name, "shape": l.shape, "sparsity": l.expected_sparsity}
                              for l in sm.layers]),
        "run_weights_sha256": meta.get("weights_sha256", ""),
    }


def export_onnx(run_dir: str | Path | Run, out: str | Path | None = None, *, force: bool = False) -> Path:
    """``swat export RUN --format onnx``: standard ops, ``input`` (dynamic batch) -> ``logits``."""
    import onnx

    run = run_dir if isinstance(run_dir, Run) else read_run(run_dir)
    path = target_path(run, "onnx", out, force)
    sm = prune(run)
    model = _torch_to_onnx(sm)
    meta = export_metadata(sm)
    meta["weights_sha256"] = onnx_weights_sha256(model)
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = META_PREFIX + k, v
    model.producer_name = "swat"
    model.doc_string = f"swat {meta['mode']} {meta['model']} on {meta['dataset']}, sparsity {meta['sparsity']}"
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise SwatError(f"exported ONNX failed onnx.checker ({str(e).splitlines()[0]}); please report this") from None
    atomic_write_bytes(path, model.SerializeToString())
    return path


def _torch_to_onnx(sm: SparseModel) -> Any:
    """Run torch's exporter quietly into memory; the graph it emits uses standard ops only."""
    import onnx

    example = torch.rand(*sm.input_shape)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = os.path.join(tmp, "model.onnx")
        sink = io.StringIO()
        quiet = logging.getLogger("torch.onnx")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(sm.module, (example,), tmp_path, dynamo=True, opset_version=OPSET,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_shapes={"input": {0: torch.export.Dim("batch")}},
                                  external_data=False)
        quiet.setLevel(level)
        model = onnx.load(tmp_path)
    return model


def export_torchscript(run_dir: str | Path | Run, out: str | Path | None = None, *, force: bool = False) -> Path:
    """``swat export RUN --format torchscript``: loads with ``torch.jit.load`` alone."""
    run = run_dir if isinstance(run_dir, Run) else read_run(run_dir)
    path = target_path(run, "torchscript", out, force)
    sm = prune(run)
    try:
        scripted = torch.jit.script(sm.module)
    except Exception:
        scripted = torch.jit.trace(sm.module, torch.rand(*sm.input_shape))
    scripted = scripted.eval()
    meta = export_metadata(sm)
    meta["weights_sha256"] = torchscript_weights_sha256(scripted)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf, _extra_files={TS_META_FILE: json.dumps(meta)})
    atomic_write_bytes(path, buf.getvalue())
    return path


def export(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None, *, force: bool = False) -> Path:
    """One entry point for the CLI: dispatch on ``fmt``."""
    if fmt not in FORMATS:
        raise SwatError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return (export_onnx if fmt == "onnx" else export_torchscript)(run_dir, out, force=force)
