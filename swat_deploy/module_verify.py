"""Verify an export against the module it came from, on your own data: no run dir needed.

``swat verify RUN`` judges a file against a run dir and its test split. A model trained in
your own loop has neither, so :func:`verify_module` takes the module and a loader instead and
asks the same questions of the file, each as a row with its threshold:

- integrity: the hash of the stored weights equals the one in the file's metadata;
- provenance: the file was exported from *this* module (the hash of its ``state_dict``);
- metadata claims (mode, sparsity, layers, input shape, classes) equal what the module gives;
- every tensor of the file equals the module's pruned form bit for bit (fp16: its rounding);
- per-layer sparsity counted from the file's stored weights vs counted from the module's pruned
  weights;
- on the loader's batches, in the file's own runtime (stock onnxruntime, and our ``Session``
  for ONNX; ``torch.jit.load`` for TorchScript): top-1 agreement with the module in eval mode
  (which computes with its Top-K weights: the pruned form), max |logit diff|, and with labels
  the accuracy of each.

The loader yields what the exported file takes: float NCHW images, alone or as ``(images,
labels)``; the module sees them normalised as the file records (or as ``normalize`` says).
Thresholds are :mod:`swat_deploy.verify`'s.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from training.errors import SwatError
from swat_deploy import artifact as art
from swat_deploy.formats import sparsity_of
from swat_deploy.verify import (ACCURACY_TOL, AGREEMENT_MIN, BATCH, LOGIT_TOL, LOGIT_TOL_FP16, SPARSITY_TOL,
                                ArtifactResult, Check, _block_pattern, _exact_weights, _onnxruntime_runner, _predict,
                                _session_runner, _torchscript_runner, format_checks)

# metadata a module determines (``model`` / ``class_names`` are the caller's words, not checked)
_CLAIMS = ("mode", "sparsity", "topk", "block", "num_classes", "input_shape", "layers")


@dataclass
class ModuleReport:
    """What :func:`verify_module` found: one :class:`swat_deploy.verify.Check` per row."""

    path: str
    samples: int
    module_accuracy: float | None = None  # None: the loader gave no labels
    checks: list[Check] = field(default_factory=list)
    artifacts: list[ArtifactResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def rows(self) -> list[Check]:
        return self.checks

    def to_dict(self) -> dict[str, Any]:
        """Plain data, with the keys of ``swat verify --json`` where they mean the same."""
        primary = self.artifacts[0] if self.artifacts else ArtifactResult("", "")
        return {
            "passed": self.passed,
            "path": self.path,
            "samples": self.samples,
            "module_accuracy": self.module_accuracy,
            "exported_accuracy": primary.accuracy,
            "agreement": primary.agreement,
            "max_abs_diff": primary.max_abs_diff,
            "layers": primary.layers,
            "checks": [asdict(c) for c in self.checks],
            "artifacts": [asdict(a) for a in self.artifacts],
        }

    def format(self) -> str:
        """The table ``swat verify`` prints, plus a verdict line."""
        acc = "" if self.module_accuracy is None else f" (module accuracy {self.module_accuracy:.4f})"
        return "\n".join(format_checks(self.checks) + [
            "", f"{'PASSED' if self.passed else 'FAILED'}: {sum(c.passed for c in self.checks)}/{len(self.checks)} "
                f"checks of {self.path} against the module on {self.samples} images{acc}"])

    def __str__(self) -> str:
        return self.format()


def _batches(loader: Iterable[Any], limit: int | None) -> tuple[torch.Tensor, np.ndarray | None]:
    """All images (and labels, if every batch has them) of ``loader``, up to ``limit`` images."""
    xs, ys, n = [], [], 0
    for item in loader:
        if isinstance(item, (tuple, list)):
            if not item:
                raise SwatError("the loader yielded an empty batch; yield images or (images, labels)")
            x, y = item[0], (item[1] if len(item) > 1 else None)
        else:
            x, y = item, None
        x = torch.as_tensor(x)
        if x.dim() != 4 or not x.is_floating_point():
            raise SwatError(f"the loader must yield float image batches (N, C, H, W), got {x.dtype} "
                            f"{list(x.shape)}")
        if xs and (y is not None) != bool(ys):
            raise SwatError("some batches of the loader have labels and some do not; yield (images, labels) always")
        xs.append(x.detach().to("cpu", torch.float32))
        if y is not None:
            ys.append(torch.as_tensor(y).reshape(-1).cpu())
            if len(ys[-1]) != len(x):
                raise SwatError(f"a batch has {len(x)} images but {len(ys[-1])} labels")
        n += len(x)
        if limit is not None and n >= limit:
            break
    if not xs:
        raise SwatError("the loader yielded nothing; give it at least one batch of images")
    x_all = torch.cat(xs)[:limit]
    return x_all, (torch.cat(ys)[:limit].numpy() if ys else None)


def _load(path: Path) -> tuple[str, Any, dict[str, str]]:
    """(kind, parsed file, its swat.* metadata), with verify's one-line errors."""
    kind = art.artifact_kind(path)
    if kind == "torchscript":
        module, meta = art.load_torchscript(path)
        return kind, module, meta
    proto = art.load_onnx(path)
    meta = {k[len(art.META_PREFIX):]: v for k, v in art.onnx_metadata(proto).items() if k.startswith(art.META_PREFIX)}
    if meta.get("int8") == "true":
        raise SwatError(f"{path} is an int8 export; verify_module judges float32 / fp16 exports (int8 files "
                        f"are judged against their float32 export by swat_deploy.verify)")
    return kind, proto, meta


def _module_logits(model: nn.Module, x: torch.Tensor, norm: dict[str, list[float]]) -> np.ndarray:
    """``model``'s eval-mode logits on normalised ``x``; its train/eval mode is restored after."""
    from swat_deploy.prune import Normalize

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    normalize = Normalize(norm["mean"], norm["std"]) if norm else nn.Identity()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return np.concatenate([model(normalize(x[i:i + BATCH]).to(device)).float().cpu().numpy()
                                   for i in range(0, len(x), BATCH)])
    finally:
        model.train(was_training)


def verify_module(model: nn.Module, path: str | Path, loader: Iterable[Any], *, normalize: Any = None,
                  backend: bool = True, limit: int | None = None) -> ModuleReport:
    """Judge the exported file ``path`` against ``model`` on ``loader``'s batches; see module doc.

    ``normalize``: ``(mean, std)`` the module's inputs need (default: the file's recorded
    normalisation, which its graph applies). ``backend``: also run an ONNX file in our sparse
    ``Session``. ``limit``: judge at most this many images. ``model`` is left as it was.
    """
    from swat_deploy.export_file import export_metadata
    from swat_deploy.from_module import module_weights_sha256, normalization_dict, prune_module

    if limit is not None and limit < 1:
        raise SwatError(f"limit {limit} must be a positive number of images")
    path = Path(path)
    kind, obj, meta = _load(path)
    x, labels = _batches(loader, limit)
    if normalize is not None:
        norm = normalization_dict(normalize, x.shape[1])
    else:
        try:
            norm = normalization_dict(json.loads(meta.get("normalization", "{}")) or None, x.shape[1])
        except (json.JSONDecodeError, SwatError) as e:
            raise SwatError(f"{path} records no usable normalisation ({e}); pass normalize=(mean, std)") from None
    ref = _module_logits(model, x, norm)
    sm = prune_module(model, x[:1], normalize=norm)  # the pruned form the file should hold
    report = ModuleReport(str(path), len(x))
    ref_pred = ref.argmax(1)
    if labels is not None:
        report.module_accuracy = float((ref_pred == labels).mean())
    fp16 = meta.get("fp16") == "true"

    def add(artifact: str, check: str, value: Any, threshold: str, ok: bool) -> None:
        report.checks.append(Check(artifact, check, value, threshold, bool(ok)))

    # -- the file: integrity, provenance, claims, exact weights, per-layer sparsity
    first = "onnxruntime" if kind == "onnx" else "torchscript"
    res = ArtifactResult(first, str(path))
    actual = art.onnx_weights_sha256(obj) if kind == "onnx" else art.torchscript_weights_sha256(obj)
    claimed = meta.get("weights_sha256")
    add(first, "integrity (weights hash vs metadata)", actual[:16], f"= {(claimed or 'missing')[:16]}",
        claimed == actual)
    origin, mine = meta.get("run_weights_sha256"), module_weights_sha256(model)
    add(first, "provenance (module weights hash)", (origin or "missing")[:16], f"= {mine[:16]}", origin == mine)
    want = export_metadata(sm, weights=meta.get("weights_storage", "sparse"), fp16=fp16)
    bad = [k for k in _CLAIMS + (("normalization",) if normalize is not None else ()) if meta.get(k) != want[k]]
    add(first, "metadata claims vs module", ", ".join(bad) or "consistent", "all equal", not bad)
    state = {k: v.detach().numpy() for k, v in sm.module.state_dict().items()}
    try:
        if kind == "onnx":
            used = {i for n in obj.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")
                    for i in n.input[1:3] if i}
            value, ok = _exact_weights(art.onnx_named_tensors(obj), state, set(art.onnx_stored_weights(obj)),
                                       fp16, used)
        else:
            value, ok = _exact_weights(art.torchscript_named_tensors(obj), state, set(), False)
    except SwatError as e:
        value, ok = str(e)[:80], False
    add(first, "weights = module's pruned weights (exact)",
        value, "bit-equal" + (" to their float16 rounding" if fp16 else ""), ok)
    try:
        stored = art.onnx_layer_weights(obj) if kind == "onnx" else art.torchscript_layer_weights(obj)
    except SwatError as e:
        stored = None
        add(first, "stored weights decode", str(e)[:80], "decodes", False)
    if stored is not None:
        missing = [l.name for l in sm.layers if l.name not in stored]
        if missing:
            add(first, "layers present", f"missing {missing[:3]}", "all the module's SWAT layers", False)
        for layer in sm.layers:
            w = stored.get(layer.name)
            if w is None:
                continue
            if list(w.shape) != layer.shape:
                add(first, f"shape {layer.name}", list(w.shape), f"= {layer.shape}", False)
                continue
            measured = sparsity_of(w)
            res.layers.append({"name": layer.name, "expected_sparsity": layer.measured_sparsity,
                               "measured_sparsity": measured, "block": layer.block})
            add(first, f"sparsity {layer.name}", round(measured, 4),
                f"{layer.measured_sparsity:.4f} +/- {SPARSITY_TOL}", abs(measured - layer.measured_sparsity) <= SPARSITY_TOL)
            if layer.block > 1:
                add(first, f"block {layer.block}x1 pattern {layer.name}", *_block_pattern(w, layer.block))

    # -- the file run in its runtime(s) on the loader's images vs the module
    runners: list[tuple[str, Any]] = []
    if kind == "onnx":
        runners.append((first, lambda: _onnxruntime_runner(path)))
        if backend:
            runners.append(("swat Session", lambda: _session_runner(path)))
    else:
        runners.append((first, lambda: _torchscript_runner(obj)))
    tol = LOGIT_TOL_FP16 if fp16 else LOGIT_TOL
    for i, (name, make) in enumerate(runners):
        r = res if i == 0 else ArtifactResult(name, str(path), layers=res.layers)
        try:
            runner = make()
            if runner is None:  # a graph our Session hands whole to onnxruntime: nothing of ours to judge
                continue
            logits = _predict(runner, x)
        except Exception as e:
            add(name, "runs on the loader's images", f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}",
                "no error", False)
            report.artifacts.append(r)
            continue
        report.artifacts.append(r)
        if logits.shape != ref.shape:
            add(name, "output shape", list(logits.shape), f"= {list(ref.shape)} (the module's)", False)
            continue
        pred = logits.argmax(1)
        r.agreement = float((pred == ref_pred).mean())
        r.max_abs_diff = float(np.abs(logits - ref).max())
        add(name, "top-1 agreement with module", round(r.agreement, 5), f">= {AGREEMENT_MIN}",
            r.agreement >= AGREEMENT_MIN)
        add(name, "max |logit diff| vs module", float(f"{r.max_abs_diff:.3g}"), f"<= {tol:g}", r.max_abs_diff <= tol)
        if labels is not None:
            r.accuracy = float((pred == labels).mean())
            add(name, "accuracy vs module", round(r.accuracy, 5), f"{report.module_accuracy:.5f} +/- {ACCURACY_TOL}",
                abs(r.accuracy - report.module_accuracy) <= ACCURACY_TOL)
    return report
