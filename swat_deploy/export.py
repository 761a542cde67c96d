"""Exporters: ONNX for any runtime, TorchScript for torch-only deployments.

Both take the pruned model of :mod:`swat_deploy.prune` (normalisation inside, BN folded, TopK'd
weights), so every exported file computes what training evaluated, on raw [0, 1] images.

ONNX opset 18: the newest opset every onnxruntime >= 1.14 and the torch exporter fully support,
and the first with BitwiseAnd / reduction axes as inputs, which compact weight storage uses.
"""
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
from swat_deploy.ts_packed import pack_layers

OPSET = 18
FORMATS = ("onnx", "torchscript")
DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}
WEIGHT_MODES = ("sparse", "dense")
# protobuf cannot serialise a message of 2 GiB or more; leave headroom for the graph and metadata
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def target_path(run: Run, fmt: str, out: str | Path | None, force: bool) -> Path:
    path = Path(out) if out else run.path / DEFAULT_NAMES[fmt]
    if path.exists() and not force:
        raise SwatError(f"{path} already exists; pass --force to overwrite it or --out to choose another file")
    if path.exists() and path.is_dir():
        raise SwatError(f"{path} is a directory; give --out a file name")
    return path


def export_metadata(sm: SparseModel, *, weights: str = "sparse", fp16: bool = False) -> dict[str, str]:
    """What a deployed file must carry to be judged on its own: provenance and expectations.

    Values are strings (ONNX ``metadata_props`` are string pairs); structured ones are JSON.
    """
    from training.trainer import SWAT_VERSION

    meta = sm.run.meta
    return {
        "producer": "swat",
        "version": SWAT_VERSION,
        "model": meta["model"],
        "dataset": meta["dataset"],
        "mode": meta["mode"],
        "sparsity": str(meta["sparsity"]),
        "topk": meta.get("topk", "nchw"),
        "test_accuracy": repr(meta["test_accuracy"]),
        "train_accuracy_last_epoch": repr(meta.get("train_accuracy_last_epoch")),
        "num_classes": str(meta["num_classes"]),
        "input_shape": json.dumps([None, meta["in_channels"], *meta["image_size"]]),
        "normalization": json.dumps(meta.get("normalization", {})),
        "class_names": json.dumps(meta.get("class_names", [])),
        "layers": json.dumps([{"name": l.name, "shape": l.shape, "sparsity": l.expected_sparsity}
                              for l in sm.layers]),
        "weights_storage": weights,
        "fp16": "true" if fp16 else "false",
        "opset": str(OPSET),
        # provenance: which run (its weights file hash) and how it was trained
        "run_weights_sha256": meta.get("weights_sha256", ""),
        "run_producer": str(meta.get("producer", "")),
        "run_name": sm.run.path.resolve().name,
        "seed": str(meta.get("seed")),
        "epochs": str(meta.get("epochs")),
        "trained_with_torch": str(meta.get("torch", "")),
    }


def _check_choice(value: str, choices: tuple[str, ...], option: str) -> None:
    if value not in choices:
        raise SwatError(f"unknown {option} {value!r}; choose one of: {', '.join(choices)}")


def export_onnx(run_dir: str | Path | Run, out: str | Path | None = None, *, force: bool = False,
                weights: str = "sparse", fp16: bool = False,
                external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """``swat export RUN --format onnx``: standard ops, ``input`` (dynamic batch) -> ``logits``.

    ``weights="sparse"`` stores each layer weight in its smallest form (see
    :mod:`swat_deploy.onnx_compact`); ``fp16`` stores weight values as float16 and casts them to
    float32 in-graph, so compute stays float32. A proto larger than ``external_threshold`` bytes
    (protobuf's hard limit is 2 GB) goes to ``FILE`` + ``FILE.data`` (ONNX external data).
    """
    _check_choice(weights, WEIGHT_MODES, "--weights")
    run = run_dir if isinstance(run_dir, Run) else read_run(run_dir)
    path = target_path(run, "onnx", out, force)
    sm = prune(run)
    return write_onnx(torch_to_onnx(sm), sm, path, weights=weights, fp16=fp16,
                      external_threshold=external_threshold)


def write_onnx(base: Any, sm: SparseModel, path: str | Path, *, weights: str = "sparse", fp16: bool = False,
               external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Encode weights, embed metadata, check and save a copy of ``base`` (torch's export of ``sm``).

    Split from :func:`export_onnx` so one (slow) torch export can be written in several forms.
    """
    import onnx

    from swat_deploy import onnx_compact

    _check_choice(weights, WEIGHT_MODES, "--weights")
    path = Path(path)
    model = onnx.ModelProto()
    model.CopyFrom(base)
    _strip_debug_info(model)
    try:
        onnx_compact.encode(model, weights=weights, fp16=fp16)
    except ValueError as e:
        raise SwatError(str(e)) from None
    meta = export_metadata(sm, weights=weights, fp16=fp16)
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


def _strip_debug_info(model: Any) -> None:
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


def torch_to_onnx(sm: SparseModel) -> Any:
    """Run torch's exporter quietly into memory; the graph it emits uses standard ops only."""
    import onnx

    example = torch.rand(*sm.input_shape)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = os.path.join(tmp, "model.onnx")
        sink = io.StringIO()
        quiet = logging.getLogger("torch.onnx")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                import warnings
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # external data: models over 2 GB cannot be one protobuf; loaded back below
                    torch.onnx.export(sm.module, (example,), tmp_path, dynamo=True, opset_version=OPSET,
                                      input_names=["input"], output_names=["logits"],
                                      dynamic_shapes={"input": {0: torch.export.Dim("batch")}},
                                      external_data=True)
        finally:
            quiet.setLevel(level)
        model = onnx.load(tmp_path, load_external_data=True)
    return model


def export_torchscript(run_dir: str | Path | Run, out: str | Path | None = None, *, force: bool = False,
                       weights: str = "sparse") -> Path:
    """``swat export RUN --format torchscript``: loads with ``torch.jit.load`` alone.

    With ``weights="sparse"`` each layer whose bitmask + values form is smaller than its dense
    weight is replaced by a `swat_deploy.ts_packed` layer (buffers ``weight_bits`` /
    ``weight_values`` / ``weight_shape``), which runs dense or, for the batch sizes where it was
    timed faster at export, as torch CSR @ dense.
    """
    _check_choice(weights, WEIGHT_MODES, "--weights")
    run = run_dir if isinstance(run_dir, Run) else read_run(run_dir)
    path = target_path(run, "torchscript", out, force)
    sm = prune(run)
    if weights == "sparse":
        pack_layers(sm, tune=True)
    try:
        scripted = torch.jit.script(sm.module)
    except Exception:  # fx GraphModules (BN folding) do not script; packed layers stay scripted inside
        scripted = torch.jit.trace(sm.module, torch.rand(*sm.input_shape))
    scripted = scripted.eval()
    for _, m in scripted.named_modules():  # tracing ran a forward: drop the decoded caches again
        if hasattr(m, "weight_bits"):
            m._dense = None
            m._csr = None
    meta = export_metadata(sm, weights=weights)
    meta["weights_sha256"] = torchscript_weights_sha256(scripted)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf, _extra_files={TS_META_FILE: json.dumps(meta)})
    atomic_write_bytes(path, buf.getvalue())
    return path


def export(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None, *, force: bool = False,
           weights: str = "sparse", fp16: bool = False) -> Path:
    """One entry point for the CLI: dispatch on ``fmt``."""
    if fmt not in FORMATS:
        raise SwatError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "onnx":
        return export_onnx(run_dir, out, force=force, weights=weights, fp16=fp16)
    if fp16:
        raise SwatError("--fp16 applies to ONNX only; drop it or use --format onnx")
    return export_torchscript(run_dir, out, force=force, weights=weights)
