"""Pruning: from a run dir to the model that is actually deployed.

The deployed function must be the one training evaluated. In SWAT mode the eval forward already
used TopK(W), so pruning applies the *same* ``training.topk.topk_weight`` (same k, same tie rule)
to the saved dense weights, folds BatchNorm into the preceding conv (a per-output-channel scale,
so zeros stay zeros) and bakes the input normalisation into the graph, so exported models take
[0, 1] images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.errors import SwatError, option
from training.rundir import Run, load_trained_model, read_run
from training.weight_topk import topk_weight

from .formats import sparsity_of


class Normalize(nn.Module):
    """(x - mean) / std per channel, inside the graph so users feed raw [0, 1] images."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class InferenceModel(nn.Module):
    """What exports contain: normalisation, then the pruned, BN-folded network."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - ONNX input name
        return self.net(self.normalize(input))


@dataclass
class SparseLayer:
    name: str
    shape: list[int]
    expected_sparsity: float
    measured_sparsity: float
    block: int = 1  # run.json's claim: output channels sharing one zero pattern


@dataclass
class SparseModel:
    """The pruned model: an eval-mode ``InferenceModel`` plus what verify and export report."""

    module: InferenceModel
    run: Run
    layers: list[SparseLayer] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        h, w = self.run.meta["image_size"]
        return (1, self.run.meta["in_channels"], h, w)

    def weights(self) -> dict[str, torch.Tensor]:
        """Prunable weights by run.json layer name (the tensors exports store)."""
        params = dict(self.module.net.named_parameters())
        return {layer.name: params[f"{layer.name}.weight"].detach() for layer in self.layers}


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a conv into that conv's weight and bias."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(net.eval(), inplace=False)
    except Exception as e:  # symbolic tracing fails on data-dependent control flow
        raise SwatError(f"cannot fold BatchNorm in this model ({type(e).__name__}: {e}); "
                        f"its forward must be traceable by torch.fx") from None


def pruned_net(model: nn.Module, layers: list[dict[str, Any]], topk: str = "nchw") -> nn.Module:
    """``model`` (in place) with TopK applied to its weights as ``layers`` (run.json's list) say,
    SWAT surgery removed: one code path for run dirs and modules, so both deploy the same function."""
    from training.swatify import unswatify

    with torch.no_grad():
        modules = dict(model.named_modules())
        for layer in layers:
            if layer["sparsity"] > 0:
                w = modules[layer["name"]].weight
                # run.json claims the realised sparsity (at least one kept entry per group, block
                # grid); selection uses the training one, which keeps exactly that count
                s = layer.get("train_sparsity", layer["sparsity"])
                w.copy_(topk_weight(w, s, layer.get("topk", topk), layer.get("block", 1)))
    return unswatify(model).eval()


def plain_pruned_net(run: Run) -> nn.Module:
    """The trained net with TopK applied to its weights and the SWAT surgery removed."""
    return pruned_net(load_trained_model(run), run.layers, run.meta.get("topk", "nchw"))


def sparse_model(model: nn.Module, run: Run) -> SparseModel:
    """The deployable form of the trained ``model`` (consumed) that ``run`` describes: TopK as
    run.json's layers say, BN folded, the run's normalisation inside. Run dirs and modules
    (:mod:`swat_deploy.from_module`) both come through here."""
    net = fold_batchnorm(pruned_net(model, run.layers, run.meta.get("topk", "nchw")))
    norm = run.meta.get("normalization") or {"mean": [0.0], "std": [1.0]}
    module = InferenceModel(net, norm["mean"], norm["std"]).eval()
    params = dict(module.net.named_parameters())
    layers = []
    for layer in run.layers:
        key = f"{layer['name']}.weight"
        if key not in params:
            raise SwatError(f"layer {layer['name']!r} of run.json is not in the model; the run dir is "
                            f"inconsistent - retrain it")
        w = params[key]
        layers.append(SparseLayer(layer["name"], list(w.shape), float(layer["sparsity"]), sparsity_of(w),
                                  int(layer.get("block", 1))))
    return SparseModel(module=module, run=run, layers=layers)


def prune(run_dir: str | Path | Run) -> SparseModel:
    """``swat prune``: the deployable model of a run dir, predictions unchanged."""
    run = run_dir if isinstance(run_dir, Run) else read_run(run_dir)
    return sparse_model(load_trained_model(run), run)


# ------------------------------------------------------------------- sparse.safetensors
SPARSE_FILE = "sparse.safetensors"
SPARSE_FORMAT_VERSION = 1
_DENSE_PREFIX = "dense."    # every other tensor of the InferenceModel, stored as is
_SPARSE_PREFIX = "sparse."  # prunable weights in their chosen format (see swat_deploy.formats)


@dataclass
class StoredLayer:
    """One row of ``swat prune``'s table: how a prunable weight is stored on disk."""

    name: str
    shape: list[int]
    sparsity: float
    format: str
    dense_bytes: int
    stored_bytes: int
    block: int = 1  # output channels sharing one zero pattern in the stored weight (block_size_of)


def storage_plan(sm: SparseModel) -> list[StoredLayer]:
    """The format each prunable weight is stored in: the smallest of dense / CSR / BSR blocks.

    Bytes decide (not speed): the kernels re-derive their own layout at load, so the file's
    only job is to be small and lossless. Unstructured Top-K ends up CSR; block-structured
    weights (``--block B``) BSR with (B, 1) blocks; weights that are barely sparse stay dense.
    """
    from .formats import block_size_of, choose_format, format_nbytes

    weights = sm.weights()
    rows = []
    for layer in sm.layers:
        w = weights[layer.name]
        fmt = choose_format(w)
        rows.append(StoredLayer(layer.name, list(w.shape), sparsity_of(w), fmt,
                                format_nbytes(w, "dense"), format_nbytes(w, fmt), block_size_of(w)))
    return rows


def format_storage(rows: list[StoredLayer]) -> str:
    """The per-layer storage table ``swat prune`` prints, with the total and the size ratio."""
    lines = [f"{'layer':<28} {'shape':<18} {'sparsity':>8} {'block':>5} {'format':<8} {'dense B':>10} {'stored B':>10}"]
    for r in rows:
        lines.append(f"{r.name:<28} {'x'.join(map(str, r.shape)):<18} {r.sparsity:>8.4f} {r.block:>5} {r.format:<8} "
                     f"{r.dense_bytes:>10} {r.stored_bytes:>10}")
    dense, stored = sum(r.dense_bytes for r in rows), sum(r.stored_bytes for r in rows)
    lines.append(f"{'total':<28} {'':<18} {'':>8} {'':>5} {'':<8} {dense:>10} {stored:>10}  "
                 f"({dense / max(stored, 1):.1f}x smaller)")
    return "\n".join(lines)


def save_sparse(sm: SparseModel, path: str | Path | None = None, *, force: bool = False) -> tuple[Path, list[StoredLayer]]:
    """``swat prune``: write the pruned model as one safetensors file (default RUN/sparse.safetensors).

    The file holds every tensor of the inference model (prunable weights compressed) and the
    run's run.json, so `load_sparse` / ``Session(file)`` rebuild the model from it alone.
    Written atomically; an existing file is kept unless ``force``.
    """
    import json

    from training.fileio import save_tensors

    from .formats import to_format

    path = Path(path) if path is not None else sm.run.path / SPARSE_FILE
    if path.exists() and not force:
        raise SwatError(f"{path} already exists; pass {option('force')} to overwrite it")
    plan = storage_plan(sm)
    prunable = {f"net.{row.name}.weight": row for row in plan}
    tensors: dict[str, torch.Tensor] = {}
    headers: dict[str, Any] = {}
    for key, value in sm.module.state_dict().items():
        row = prunable.get(key)
        if row is None:
            tensors[_DENSE_PREFIX + key] = value
            continue
        stored, header = to_format(value.detach(), row.format).to_state(_SPARSE_PREFIX + key + ".")
        tensors.update(stored)
        headers[key] = header
    missing = set(prunable) - set(headers)
    if missing:
        raise SwatError(f"layers {sorted(missing)} of run.json are not in the pruned model; the run dir is "
                        "inconsistent - retrain it")
    meta = {"format": "swat-sparse", "version": str(SPARSE_FORMAT_VERSION),
            "run_json": json.dumps(sm.run.meta), "weights": json.dumps(headers)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, tensors, metadata=meta)
    except OSError as e:
        raise SwatError(f"cannot write {path} ({e.strerror}); choose a writable path") from None
    return path, plan


def load_sparse(path: str | Path) -> SparseModel:
    """Rebuild the `SparseModel` that `save_sparse` wrote, from the file alone (no run dir needed)."""
    import json

    from training.fileio import load_tensors
    from training.rundir import build_model
    from training.swatify import unswatify

    from .formats import load_state

    path = Path(path)
    tensors, meta = load_tensors(path)
    if meta.get("format") != "swat-sparse":
        raise SwatError(f"{path} is not a swat sparse model (no 'swat-sparse' header); write one by pruning its "
                        f"run dir")
    if int(meta.get("version", "0")) > SPARSE_FORMAT_VERSION:
        raise SwatError(f"{path} has sparse format version {meta['version']}, newer than this swat reads; upgrade swat")
    try:
        run_meta = json.loads(meta["run_json"])
        headers = json.loads(meta["weights"])
    except (KeyError, json.JSONDecodeError):
        raise SwatError(f"{path} has a damaged header; re-create it by pruning its run dir again "
                        f"({option('force')} to overwrite)") from None
    run = Run(path=path.parent, meta=run_meta)
    net = fold_batchnorm(unswatify(build_model(run.config, run_meta["num_classes"], run_meta["in_channels"])))
    norm = run_meta.get("normalization") or {"mean": [0.0], "std": [1.0]}
    module = InferenceModel(net, norm["mean"], norm["std"]).eval()
    state = {k[len(_DENSE_PREFIX):]: v for k, v in tensors.items() if k.startswith(_DENSE_PREFIX)}
    try:
        for key, header in headers.items():
            state[key] = load_state(tensors, header, _SPARSE_PREFIX + key + ".").to_dense()
        module.load_state_dict(state, strict=True)
    except (KeyError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SwatError(f"{path} does not fit model {run_meta.get('model')!r} ({first}); "
                        f"re-create it by pruning its run dir again ({option('force')} to overwrite)") from None
    params = dict(module.net.named_parameters())
    layers = [SparseLayer(l["name"], list(params[f"{l['name']}.weight"].shape), float(l["sparsity"]),
                          sparsity_of(params[f"{l['name']}.weight"]), int(l.get("block", 1))) for l in run.layers]
    return SparseModel(module=module, run=run, layers=layers)


def to_onnx_model(sm: SparseModel) -> Any:
    """The pruned model as an in-memory ONNX ModelProto (plain initializers, dynamic batch): the
    graph ``swat export`` writes, before its compact weight encoding (one exporter for both)."""
    from swat_deploy.torch_export import torch_to_onnx

    return torch_to_onnx(sm)
