"""``swat info FILE|RUN``: what a file or run dir holds, read from its bytes.

Returns plain data (:class:`ArtifactInfo`) so notebooks get the same facts the CLI prints:
per layer its shape, sparsity counted from the stored weight, storage format and stored bytes,
plus the embedded metadata.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import SwatError
from training.text import escape_control as esc
from swat_deploy import artifact as art
from swat_deploy.formats import sparsity_of


@dataclass
class LayerInfo:
    name: str
    shape: list[int]
    sparsity: float
    format: str
    stored_bytes: int
    dense_bytes: int


@dataclass
class ArtifactInfo:
    path: str
    kind: str            # onnx | torchscript | run
    file_bytes: int
    layers: list[LayerInfo] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def _layers(stored: dict[str, Any]) -> list[LayerInfo]:
    out = []
    for name, sw in stored.items():
        v = np.asarray(sw.value)
        out.append(LayerInfo(art.layer_name(name), list(v.shape), sparsity_of(v),
                             sw.format, int(sw.stored_bytes), int(v.size * 4)))
    return out


def _file_bytes(path: Path) -> int:
    extra = path.with_name(path.name + ".data")  # ONNX external data
    return path.stat().st_size + (extra.stat().st_size if extra.is_file() else 0)


def file_info(path: str | Path) -> ArtifactInfo:
    """Layers and metadata of one exported ONNX or TorchScript file."""
    path = Path(path)
    kind = art.artifact_kind(path)
    if kind == "onnx":
        proto = art.load_onnx(path)
        meta = {k[len(art.META_PREFIX):] if k.startswith(art.META_PREFIX) else k: v
                for k, v in art.onnx_metadata(proto).items()}
        stored = art.onnx_stored_weights(proto)
    else:
        module, meta = art.load_torchscript(path)
        stored = art.torchscript_stored_weights(module)
    return ArtifactInfo(str(path), kind, _file_bytes(path), _layers(stored), dict(meta))


def info(target: str | Path) -> list[ArtifactInfo]:
    """``target`` is an exported file, or a run dir: its run.json, then every export inside."""
    from swat_deploy.export import DEFAULT_NAMES
    from training.rundir import WEIGHTS, read_run

    target = Path(target)
    if target.is_dir():
        run = read_run(target, need_weights=False)
        keep = ("model", "dataset", "mode", "sparsity", "topk", "epochs", "seed", "test_accuracy",
                "num_classes", "in_channels", "image_size", "producer", "weights_sha256")
        weights = run.file(WEIGHTS)
        layers = [LayerInfo(l["name"], list(l["shape"]), float(l["sparsity"]), "safetensors (dense, training)",
                            int(np.prod(l["shape"])) * 4, int(np.prod(l["shape"])) * 4) for l in run.layers]
        out = [ArtifactInfo(str(run.path / "run.json"), "run", weights.stat().st_size if weights.is_file() else 0,
                            layers, {k: run.meta[k] for k in keep if k in run.meta})]
        for name in DEFAULT_NAMES.values():
            if (target / name).is_file():
                out.append(file_info(target / name))
        return out
    if not target.exists():
        raise SwatError(f"{target} not found; give an exported .onnx / .pt file or a run dir")
    return [file_info(target)]


def _human(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def format_info(items: list[ArtifactInfo]) -> str:
    """Human-readable: a layer table per artefact, totals, then its metadata (JSON values unpacked).

    Every string that comes from a file (names, metadata) is printed with control characters
    escaped (:func:`training.text.escape_control`): a file must not drive the user's terminal.
    """
    blocks = []
    for a in items:
        lines = [f"{esc(a.path)}  ({a.kind}, {_human(a.file_bytes)})"]
        rows = [("layer", "shape", "sparsity", "storage", "bytes", "vs dense")]
        for l in a.layers:
            rows.append((esc(l.name), "x".join(map(str, l.shape)), f"{l.sparsity:.4f}", esc(l.format), str(l.stored_bytes),
                         f"{l.stored_bytes / max(l.dense_bytes, 1):.2f}x"))
        if a.layers:
            stored = sum(l.stored_bytes for l in a.layers)
            dense = sum(l.dense_bytes for l in a.layers)
            rows.append(("total", "", "", "", str(stored), f"{stored / max(dense, 1):.2f}x"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for i, r in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(w) if j < 4 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip())
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        if a.metadata:
            lines.append("  metadata:")
            width = max(len(esc(k)) for k in a.metadata)
            for k, v in a.metadata.items():
                if k == "layers":
                    continue  # already the table above
                text = esc(v if isinstance(v, str) else json.dumps(v))
                lines.append(f"    {esc(k).ljust(width)}  {text if len(text) <= 100 else text[:97] + '...'}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def info_json(items: list[ArtifactInfo]) -> str:
    from dataclasses import asdict

    return json.dumps([asdict(a) for a in items], indent=2)
