"""Exporters: ONNX for any runtime, TorchScript for torch-only deployments.

Both take the pruned model of :mod:`swat_deploy.prune` (normalisation inside, BN folded, TopK'd
weights), so every exported file computes what training evaluated, on raw [0, 1] images.

ONNX: torch's dynamo exporter at opset 18 (:mod:`swat_deploy.torch_export`, the one conversion the
Session on a run dir uses too), then the weights in their compact form (:mod:`swat_deploy.onnx_compact`).
"""
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.errors import SwatError, option
from training.fileio import atomic_write_bytes, check_writable_dir
from training.rundir import Run, read_run
from swat_deploy.artifact import TS_META_FILE, torchscript_weights_sha256
from swat_deploy.export_file import EXTERNAL_DATA_THRESHOLD, export_metadata, finish_onnx, record, strip_debug_info
from swat_deploy.prune import SparseModel, prune
from swat_deploy.torch_export import OPSET, torch_to_onnx  # noqa: F401 - OPSET: part of this surface
from swat_deploy.ts_packed import pack_layers

FORMATS = ("onnx", "torchscript")
DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}
INT8_NAME = "model.int8.onnx"  # `swat export RUN --format onnx --int8` (see swat_deploy.quantize)
WEIGHT_MODES = ("sparse", "dense")


def target_path(run: Run, fmt: str, out: str | Path | None, force: bool, default: str | None = None) -> Path:
    path = Path(out) if out else run.path / (default or DEFAULT_NAMES[fmt])
    if path.exists() and not force:
        raise SwatError(f"{path} already exists; pass {option('force')} to overwrite it or {option('out')} to "
                        f"choose another file")
    if path.exists() and path.is_dir():
        raise SwatError(f"{path} is a directory; give {option('out')} a file name")
    check_writable_dir(path.parent, "output directory")  # before seconds of pruning and exporting
    return path


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
    strip_debug_info(model)
    try:
        onnx_compact.encode(model, weights=weights, fp16=fp16)
    except ValueError as e:
        raise SwatError(str(e)) from None
    return finish_onnx(model, export_metadata(sm, weights=weights, fp16=fp16), path,
                       external_threshold=external_threshold)


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
    record(path, "torchscript")
    return path


def export_onnx_int8(run_dir: str | Path | Run, out: str | Path | None = None, *, force: bool = False,
                     calib: int | None = None, seed: int = 0, weights: str = "sparse",
                     data_dir: str | None = None) -> Path:
    """The int8 ONNX export of a run dir: RUN/model.int8.onnx by default, a QDQ model of the pruned
    model calibrated on ``calib`` training images, int8 weights stored compactly, metadata and
    weights hash as for the float32 export (plus ``int8`` / ``quantization`` keys).
    ``calib``: default :data:`swat_deploy.quantize.CALIB_IMAGES`."""
    from swat_deploy.quantize import CALIB_IMAGES, calibration_images, write_onnx_int8

    _check_choice(weights, WEIGHT_MODES, "weights")
    run = run_dir if isinstance(run_dir, Run) else read_run(run_dir)
    path = target_path(run, "onnx", out, force, default=INT8_NAME)
    # before the slow torch export: fails fast when the data is missing
    images = calibration_images(run, CALIB_IMAGES if calib is None else calib, seed, data_dir)
    sm = prune(run)
    return write_onnx_int8(torch_to_onnx(sm), sm, path, images, seed=seed, weights=weights)


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
        return export_onnx_int8(run_dir, out, force=force, weights=weights, calib=calib)
    if fmt == "onnx":
        return export_onnx(run_dir, out, force=force, weights=weights, fp16=fp16)
    if fp16:
        raise SwatError(f"{option('fp16')} applies to ONNX only; drop it or use {option('fmt')} onnx")
    return export_torchscript(run_dir, out, force=force, weights=weights)
