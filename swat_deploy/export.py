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
from torch import nn

from training.errors import SwatError, option
from training.fileio import atomic_write_bytes, check_writable_dir
from training.rundir import RUN_JSON, Run, read_run, record_export
from swat_deploy.artifact import META_PREFIX, TS_META_FILE, onnx_weights_sha256, torchscript_weights_sha256
from swat_deploy.prune import SparseModel, prune
from swat_deploy.ts_packed import pack_layers

OPSET = 18
FORMATS = ("onnx", "torchscript")
DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}
INT8_NAME = "model.int8.onnx"  # `swat export RUN --format onnx --int8` (see swat_deploy.quantize)
WEIGHT_MODES = ("sparse", "dense")
# protobuf cannot serialise a message of 2 GiB or more; leave headroom for the graph and metadata
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def target_path(run: Run, fmt: str, out: str | Path | None, force: bool, default: str | None = None) -> Path:
    path = Path(out) if out else run.path / (default or DEFAULT_NAMES[fmt])
    if path.exists() and not force:
        raise SwatError(f"{path} already exists; pass {option('force')} to overwrite it or {option('out')} to "
                        f"choose another file")
    if path.exists() and path.is_dir():
        raise SwatError(f"{path} is a directory; give {option('out')} a file name")
    check_writable_dir(path.parent, "output directory")  # before seconds of pruning and exporting
    return path


def _record(path: Path, fmt: str) -> None:
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


def _check_choice(value: str, choices: tuple[str, ...], param: str) -> None:
    """``param``: the parameter's name (a flag spelling such as ``--weights`` is accepted too)."""
    if value not in choices:
        name = option(param.lstrip("-").replace("-", "_"))
        raise SwatError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _module_target(out: str | Path | None, force: bool) -> Path:
    """Where a module export goes: a module has no run dir to default into."""
    if out is None:
        raise SwatError("exporting a module needs the file to write: export_onnx(model, 'model.onnx', ...)")
    path = Path(out)
    if path.exists() and path.is_dir():
        raise SwatError(f"{path} is a directory; give the path of the file to write")
    if path.exists() and not force:
        raise SwatError(f"{path} already exists; pass force=True to overwrite it or choose another path")
    check_writable_dir(path.parent, "output directory")
    return path


def _pruned(source: str | Path | Run | nn.Module, fmt: str, out: str | Path | None, force: bool,
            module_args: dict[str, Any]) -> tuple[SparseModel, Path]:
    """(the pruned model, the checked target path) of a run dir or of a module trained anywhere."""
    if isinstance(source, nn.Module):
        from swat_deploy.from_module import prune_module

        if module_args.get("example_input") is None:
            raise SwatError("exporting a module needs example_input=: one batch (N, C, H, W) of the images it takes")
        path = _module_target(out, force)
        return prune_module(source, **module_args), path
    if any(v is not None for v in module_args.values()):
        given = ", ".join(k for k, v in module_args.items() if v is not None)
        raise SwatError(f"{given} apply to exporting a module; a run dir records them in run.json - drop them")
    run = source if isinstance(source, Run) else read_run(source)
    path = target_path(run, fmt, out, force)
    return prune(run), path


def export_onnx(source: str | Path | Run | nn.Module, out: str | Path | None = None, *, force: bool = False,
                weights: str = "sparse", fp16: bool = False,
                external_threshold: int = EXTERNAL_DATA_THRESHOLD, example_input: torch.Tensor | None = None,
                normalize: Any = None, class_names: list[str] | None = None, name: str | None = None) -> Path:
    """``swat export RUN --format onnx``: standard ops, ``input`` (dynamic batch) -> ``logits``.

    ``source`` is a run dir, or a module trained in your own loop (swatified or not; left
    unmodified): then ``out`` is required, ``example_input`` is one batch of the float NCHW images
    the file will take (its shape fixes the input size), ``normalize`` = ``(mean, std)`` per channel
    goes inside the graph (so the file takes raw images; None: the module takes them as they are),
    ``class_names`` and ``name`` (default: the class name) are recorded in the metadata.
    ``weights="sparse"`` stores each layer weight in its smallest form (see
    :mod:`swat_deploy.onnx_compact`); ``fp16`` stores weight values as float16 and casts them to
    float32 in-graph, so compute stays float32. A proto larger than ``external_threshold`` bytes
    (protobuf's hard limit is 2 GB) goes to ``FILE`` + ``FILE.data`` (ONNX external data).
    """
    _check_choice(weights, WEIGHT_MODES, "weights")
    sm, path = _pruned(source, "onnx", out, force, {"example_input": example_input, "normalize": normalize,
                                                     "class_names": class_names, "name": name})
    return write_onnx(torch_to_onnx(sm), sm, path, weights=weights, fp16=fp16,
                      external_threshold=external_threshold)


def write_onnx(base: Any, sm: SparseModel, path: str | Path, *, weights: str = "sparse", fp16: bool = False,
               external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Encode weights, embed metadata, check and save a copy of ``base`` (torch's export of ``sm``).

    Split from :func:`export_onnx` so one (slow) torch export can be written in several forms.
    """
    import onnx

    from swat_deploy import onnx_compact

    _check_choice(weights, WEIGHT_MODES, "weights")
    path = Path(path)
    model = onnx.ModelProto()
    model.CopyFrom(base)
    _strip_debug_info(model)
    try:
        onnx_compact.encode(model, weights=weights, fp16=fp16)
    except ValueError as e:
        raise SwatError(str(e)) from None
    return finish_onnx(model, export_metadata(sm, weights=weights, fp16=fp16), path,
                       external_threshold=external_threshold)


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
    _record(path, "onnx")
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


def export_torchscript(source: str | Path | Run | nn.Module, out: str | Path | None = None, *,
                       force: bool = False, weights: str = "sparse", example_input: torch.Tensor | None = None,
                       normalize: Any = None, class_names: list[str] | None = None,
                       name: str | None = None) -> Path:
    """``swat export RUN --format torchscript``: loads with ``torch.jit.load`` alone.

    ``source`` is a run dir or a module, with the module arguments of :func:`export_onnx`.
    With ``weights="sparse"`` each layer whose bitmask + values form is smaller than its dense
    weight is replaced by a `swat_deploy.ts_packed` layer (buffers ``weight_bits`` /
    ``weight_values`` / ``weight_shape``), which runs dense or, for the batch sizes where it was
    timed faster at export, as torch CSR @ dense.
    """
    _check_choice(weights, WEIGHT_MODES, "weights")
    sm, path = _pruned(source, "torchscript", out, force, {"example_input": example_input, "normalize": normalize,
                                                            "class_names": class_names, "name": name})
    return write_torchscript(sm, path, weights=weights)


def write_torchscript(sm: SparseModel, path: str | Path, *, weights: str = "sparse") -> Path:
    """Pack, script, embed metadata + weights hash and write ``sm`` (run dirs and modules alike)."""
    path = Path(path)
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
    _record(path, "torchscript")
    return path


def export(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None, *, force: bool = False,
           weights: str = "sparse", fp16: bool = False, int8: bool = False, calib: int | None = None) -> Path:
    """One entry point for the CLI: dispatch on ``fmt`` (``int8``: see :mod:`swat_deploy.quantize`)."""
    if fmt not in FORMATS:
        raise SwatError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if calib is not None and not int8:
        raise SwatError(f"{option('calib')} applies to {option('int8')} exports only; add {option('int8')} or "
                        f"drop {option('calib')}")
    if int8:
        if fmt != "onnx" or fp16:
            raise SwatError(f"{option('int8')} makes an ONNX QDQ model; use {option('fmt')} onnx without "
                            f"{option('fp16')}")
        from swat_deploy.quantize import CALIB_IMAGES, export_onnx_int8

        return export_onnx_int8(run_dir, out, force=force, weights=weights,
                                calib=CALIB_IMAGES if calib is None else calib)
    if fmt == "onnx":
        return export_onnx(run_dir, out, force=force, weights=weights, fp16=fp16)
    if fp16:
        raise SwatError(f"{option('fp16')} applies to ONNX only; drop it or use {option('fmt')} onnx")
    return export_torchscript(run_dir, out, force=force, weights=weights)
