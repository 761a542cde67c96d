"""What every exported ONNX file gets, whoever made it (float32 or int8, run dir or module).

Provenance metadata and the weights hash, debug info stripped, ``onnx.checker``'s full check,
an atomic write (external data past protobuf's 2 GB), and a note in the run dir's
``exports.json`` so ``verify`` expects the file. Below both :mod:`swat_deploy.export` and
:mod:`swat_deploy.quantize`, so neither needs the other.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.errors import SwatError
from training.fileio import atomic_write_bytes
from training.rundir import RUN_JSON, record_export
from swat_deploy.artifact import META_PREFIX, onnx_weights_sha256
from swat_deploy.torch_export import OPSET

if TYPE_CHECKING:
    from swat_deploy.prune import SparseModel

# protobuf cannot serialise a message of 2 GiB or more; leave headroom for the graph and metadata
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def record(path: Path, fmt: str) -> None:
    """An export written into a run dir is noted in its exports.json: verify then expects it."""
    if (path.parent / RUN_JSON).is_file():
        record_export(path.parent, path, fmt)


def export_metadata(sm: SparseModel, *, weights: str = "sparse", fp16: bool = False) -> dict[str, str]:
    """What a deployed file must carry to be judged on its own: provenance and expectations.

    Values are strings (ONNX ``metadata_props`` are string pairs); structured ones are JSON.
    """
    from training.version import SWAT_VERSION

    meta = sm.run.meta
    return {
        "producer": "swat",
        "version": SWAT_VERSION,
        "model": meta["model"],
        "dataset": meta["dataset"],
        "mode": meta["mode"],
        "sparsity": str(meta["sparsity"]),
        "topk": meta.get("topk", "nchw"),
        "block": str(meta.get("block", 1)),
        "test_accuracy": repr(meta["test_accuracy"]),
        "train_accuracy_last_epoch": repr(meta.get("train_accuracy_last_epoch")),
        "num_classes": str(meta["num_classes"]),
        "input_shape": json.dumps([None, meta["in_channels"], *meta["image_size"]]),
        "normalization": json.dumps(meta.get("normalization", {})),
        "class_names": json.dumps(meta.get("class_names", [])),
        "layers": json.dumps([{"name": l.name, "shape": l.shape, "sparsity": l.expected_sparsity, "block": l.block}
                              for l in sm.layers]),
        "weights_storage": weights,
        "fp16": "true" if fp16 else "false",
        "opset": str(OPSET),
        # provenance: which run (its weights file hash) and how it was trained
        "run_weights_sha256": meta.get("weights_sha256", ""),
        "run_producer": str(meta.get("producer", "")),
        "run_name": sm.run.path.resolve().name if meta.get("source", "run") == "run" else "",
        "source": meta.get("source", "run"),  # run: a `swat train` run dir; module: export_onnx(module, ...)
        "seed": str(meta.get("seed")),
        "epochs": str(meta.get("epochs")),
        "trained_with_torch": str(meta.get("torch", "")),
    }


def finish_onnx(model: Any, meta: dict[str, str], path: str | Path, *,
                external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Embed ``meta`` + the weights hash, full-check and write ``model`` atomically (float32 and int8 exports)."""
    path = Path(path)
    meta = dict(meta)
    meta["weights_sha256"] = onnx_weights_sha256(model)
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = META_PREFIX + k, v
    model.producer_name = "swat"
    model.producer_version = meta["version"]
    model.doc_string = f"swat {meta['mode']} {meta['model']} on {meta['dataset']}, sparsity {meta['sparsity']}"
    if model.ByteSize() > external_threshold:
        _save_external(model, path)
        _check(str(path))
    else:
        _check(model)
        atomic_write_bytes(path, model.SerializeToString())
    record(path, "onnx")
    return path


def _check(model_or_path: Any) -> None:
    import onnx

    try:
        onnx.checker.check_model(model_or_path, full_check=True)
    except Exception as e:
        raise SwatError(f"exported ONNX failed onnx.checker ({str(e).splitlines()[0]}); please report this") from None


def _save_external(model: Any, path: Path) -> None:
    """Write ``path`` + ``path.data`` (tensor bytes outside the proto), each atomically."""
    import onnx

    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_model = Path(tmp) / path.name
        onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(tmp_model, path)


def strip_debug_info(model: Any) -> None:
    """Drop the exporter's stack traces, doc strings and optional shape hints (local paths, bulk)."""
    del model.graph.value_info[:]
    for vi in list(model.graph.input) + list(model.graph.output):
        del vi.metadata_props[:]
    for node in model.graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    for vi in model.graph.value_info:
        del vi.metadata_props[:]
    for t in model.graph.initializer:
        del t.metadata_props[:]
