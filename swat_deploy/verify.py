"""``swat verify``: prove an exported file computes what training measured, and is what it claims.

Each artefact is judged by its own bytes in its own runtime (stock onnxruntime for ONNX,
``torch.jit.load`` for TorchScript, and our sparse ``Session`` where available) against the run
dir: integrity hash vs embedded metadata, provenance vs run.json, per-layer sparsity counted from
the stored weights, accuracy on the run's test split and top-1 agreement / max logit difference
with the trained model. Every check is a row with its threshold, so a failure names itself.

Exit codes (CLI): 0 every row passed; 1 a row failed (including a file whose stored weights no
longer decode or that its runtime refuses); 2 the file cannot be judged at all - missing,
truncated or not ONNX / TorchScript, built for another model (layer shapes or input shape differ
from run.json), or the test split is unavailable - reported as one line naming the fix.

Thresholds: accuracy within 0.001 of run.json, top-1 agreement >= 0.999, max |logit diff|
<= 1e-3 (float32 weights) or <= 5e-2 for ``--fp16`` exports (float16 keeps ~3 significant
digits; logits of O(10) then move by up to ~1e-2), per-layer sparsity within 0.005.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from training import data as datasets
from training.errors import SwatError
from training.rundir import Run, load_trained_model, read_run
from training.trainer import iterate_batches
from swat_deploy import artifact as art
from swat_deploy.export import DEFAULT_NAMES

ACCURACY_TOL = 0.001
AGREEMENT_MIN = 0.999
SPARSITY_TOL = 0.005
LOGIT_TOL = 1e-3
LOGIT_TOL_FP16 = 5e-2
BATCH = 256


@dataclass
class Check:
    artifact: str
    check: str
    value: Any
    threshold: str
    passed: bool


@dataclass
class ArtifactResult:
    name: str
    path: str
    accuracy: float | None = None
    agreement: float | None = None
    max_abs_diff: float | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Report:
    run_dir: str
    train_accuracy: float
    reference_accuracy: float
    samples: int
    checks: list[Check] = field(default_factory=list)
    artifacts: list[ArtifactResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        primary = self.artifacts[0] if self.artifacts else ArtifactResult("", "")
        return {
            "passed": self.passed,
            "train_accuracy": self.train_accuracy,
            "exported_accuracy": primary.accuracy,
            "agreement": primary.agreement,
            "max_abs_diff": primary.max_abs_diff,
            "layers": primary.layers,
            "samples": self.samples,
            "reference_accuracy": self.reference_accuracy,
            "checks": [asdict(c) for c in self.checks],
            "artifacts": [asdict(a) for a in self.artifacts],
        }


Runner = Callable[[np.ndarray], np.ndarray]


def _test_images(run: Run, data_dir: str | None, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    name = run.meta["dataset"]
    try:
        ds = datasets.load(name, "test", data_dir or run.config.data_dir)
    except SwatError as e:  # its message already names the files and the --data-dir fix
        raise SwatError(f"cannot verify: test split of {name!r} unavailable: {e}") from None
    except (OSError, ValueError) as e:
        raise SwatError(f"test split of {name!r} unavailable ({type(e).__name__}: {e}); pass --data-dir DIR "
                        f"where it is stored") from None
    n = len(ds) if limit is None else min(limit, len(ds))
    xs, ys = [], []
    for x, y in iterate_batches(ds, torch.arange(n), BATCH):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys), ds.info


def _predict(fn: Runner, x: torch.Tensor) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i:i + BATCH].numpy()), dtype=np.float32)
                           for i in range(0, len(x), BATCH)])


def _onnxruntime_runner(path: Path) -> Runner:
    from .ort import ort_session

    sess = ort_session(path)
    return lambda x: sess.run(["logits"], {"input": x})[0]


def _session_runner(path: Path) -> Runner | None:
    try:
        from swat_deploy.session import Session
    except ImportError:
        return None
    sess = Session(path, fallback=False)  # the proof is about our kernels, not onnxruntime's
    return lambda x: sess.run(None, {"input": x})[0]


def _torchscript_runner(module: Any) -> Runner:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()
    return run


def _find_artifacts(run: Run, model: str | Path | None) -> list[Path]:
    if model is not None:
        return [Path(model)]
    found = [run.path / name for name in DEFAULT_NAMES.values() if (run.path / name).is_file()]
    if not found:
        raise SwatError(f"no exported model in {run.path}; run `swat export {run.path} --format onnx` "
                        f"(or pass --model FILE)")
    return found


def _metadata_claims(meta: dict[str, str], run: Run) -> list[str]:
    """Keys whose embedded claim disagrees with run.json (the file describes another run or was edited)."""
    rm = run.meta
    bad = []
    for key in ("model", "dataset", "mode", "topk"):
        if key in meta and meta[key] != str(rm.get(key)):
            bad.append(key)
    for key, want in (("sparsity", rm.get("sparsity")), ("test_accuracy", rm.get("test_accuracy")),
                      ("num_classes", rm.get("num_classes"))):
        try:
            if key not in meta or abs(float(meta[key]) - float(want)) > 1e-9:
                bad.append(key)
        except (TypeError, ValueError):
            bad.append(key)
    try:
        claimed = {l["name"]: (list(l["shape"]), float(l["sparsity"])) for l in json.loads(meta.get("layers", "[]"))}
    except (json.JSONDecodeError, KeyError, TypeError):
        claimed = None
    expected = {l["name"]: (list(l["shape"]), float(l["sparsity"])) for l in run.layers}
    if claimed is None or claimed.keys() != expected.keys() or any(
            claimed[k][0] != expected[k][0] or abs(claimed[k][1] - expected[k][1]) > 1e-9 for k in expected):
        bad.append("layers")
    return bad


def _check_same_model(path: Path, run: Run, weights: dict[str, np.ndarray] | None,
                      meta: dict[str, str] | None) -> None:
    """A file of another architecture cannot be judged against this run: one-line error (exit 2)."""
    shapes = {l["name"]: list(l["shape"]) for l in run.layers}
    if weights:
        for name, w in weights.items():
            if name in shapes and list(w.shape) != shapes[name]:
                raise SwatError(f"{path} comes from another model: layer {name} has shape {list(w.shape)}, "
                                f"run.json says {shapes[name]}; verify it against the run dir it was exported from")
    if meta and "input_shape" in meta:
        want = [None, run.meta["in_channels"], *run.meta["image_size"]]
        try:
            got = json.loads(meta["input_shape"])
        except json.JSONDecodeError:
            got = None
        if got is not None and got != want:
            raise SwatError(f"{path} takes input {got[1:]} but run.json's model takes {want[1:]}; "
                            f"verify it against the run dir it was exported from")


def verify(run_dir: str | Path, model: str | Path | None = None, *, data_dir: str | None = None,
           limit: int | None = None, backend: bool = True, pruned: bool = True) -> Report:
    """Check every exported artefact of ``run_dir`` (or ``model``) against the run; see module doc.

    ``backend``: also run ONNX files in our sparse ``Session``; ``pruned``: also judge the pruned
    model of :func:`swat_deploy.prune.prune` (what the exports were made from).
    """
    run = read_run(run_dir)
    paths = _find_artifacts(run, model)
    if limit is not None and limit < 1:
        raise SwatError(f"--limit {limit} must be a positive number of test images")
    # parse every file first: a missing / truncated / foreign file is a one-line error up front
    loaded = []
    for path in paths:
        kind = art.artifact_kind(path)
        if kind == "onnx":
            proto = art.load_onnx(path)
            meta = {k[len(art.META_PREFIX):]: v for k, v in art.onnx_metadata(proto).items()
                    if k.startswith(art.META_PREFIX)}
            loaded.append((kind, path, proto, meta))
            get = lambda proto=proto: art.onnx_layer_weights(proto)  # noqa: E731
        else:
            module, meta = art.load_torchscript(path)
            loaded.append((kind, path, module, meta))
            get = lambda module=module: art.torchscript_layer_weights(module)  # noqa: E731
        try:
            weights = get()
        except SwatError as e:
            if e.exit_code != 1:  # 1: stored weights do not decode - reported as a FAIL row
                raise
            weights = None
        _check_same_model(path, run, weights, meta)
    x, y, info = _test_images(run, data_dir, limit)
    reference = load_trained_model(run)
    with torch.no_grad():
        ref_logits = np.concatenate([reference(datasets.normalize(x[i:i + BATCH], info)).numpy()
                                     for i in range(0, len(x), BATCH)])
    ref_pred = ref_logits.argmax(1)
    labels = y.numpy()
    ref_acc = float((ref_pred == labels).mean())
    # the run's own number applies to the full test split; a --limit subset is judged by the
    # reference model's accuracy on that same subset
    target_acc = float(run.meta["test_accuracy"]) if limit is None else ref_acc
    report = Report(str(run.path), float(run.meta["test_accuracy"]), ref_acc, len(labels))
    expected = {l["name"]: float(l["sparsity"]) for l in run.layers}

    def judge(name: str, path: Path, make_runner: Callable[[], Runner | None],
              get_weights: Callable[[], dict[str, np.ndarray]] | None,
              meta: dict[str, str] | None, actual_hash: str | None, tol: float = LOGIT_TOL) -> None:
        res = ArtifactResult(name, str(path))
        add = lambda check, value, threshold, ok: report.checks.append(Check(name, check, value, threshold, bool(ok)))
        if meta is not None:
            claimed = meta.get("weights_sha256")
            add("integrity (weights hash vs metadata)", (actual_hash or "")[:16], f"= {(claimed or 'missing')[:16]}",
                claimed == actual_hash)
            origin = meta.get("run_weights_sha256")
            add("provenance (run weights hash vs run.json)", (origin or "missing")[:16],
                f"= {str(run.meta.get('weights_sha256'))[:16]}", origin == run.meta.get("weights_sha256"))
            bad = _metadata_claims(meta, run)
            add("metadata claims vs run.json", ", ".join(bad) or "consistent", "all equal", not bad)
        weights = None
        if get_weights is not None:
            try:
                weights = get_weights()
            except SwatError as e:
                add("stored weights decode", str(e)[:80], "decodes", False)
        if weights is not None:
            missing = sorted(set(expected) - set(weights))
            if missing:
                add("layers present", f"missing {missing[:3]}", "all run.json layers", False)
            for lname, exp in expected.items():
                if lname not in weights:
                    continue
                w = weights[lname]
                measured = float((w == 0).sum()) / max(w.size, 1)
                res.layers.append({"name": lname, "expected_sparsity": exp, "measured_sparsity": measured})
                add(f"sparsity {lname}", round(measured, 4), f"{exp:.4f} +/- {SPARSITY_TOL}",
                    abs(measured - exp) <= SPARSITY_TOL)
        try:
            runner = make_runner()
        except Exception as e:
            add("loads in its runtime", f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}",
                "loads", False)
            report.artifacts.append(res)
            return
        if runner is None:
            return
        try:
            logits = _predict(runner, x)
        except Exception as e:
            add("runs on the test split", f"{type(e).__name__}: {str(e)[:80]}", "no error", False)
            report.artifacts.append(res)
            return
        if logits.shape != ref_logits.shape:
            add("output shape", list(logits.shape), str(list(ref_logits.shape)), False)
            report.artifacts.append(res)
            return
        pred = logits.argmax(1)
        res.accuracy = float((pred == labels).mean())
        res.agreement = float((pred == ref_pred).mean())
        res.max_abs_diff = float(np.abs(logits - ref_logits).max()) if len(logits) else 0.0
        add("accuracy vs run.json", round(res.accuracy, 5), f"{target_acc:.5f} +/- {ACCURACY_TOL}",
            abs(res.accuracy - target_acc) <= ACCURACY_TOL)
        add("top-1 agreement with trained model", round(res.agreement, 5), f">= {AGREEMENT_MIN}",
            res.agreement >= AGREEMENT_MIN)
        add("max |logit diff|", float(f"{res.max_abs_diff:.3g}"), f"<= {tol:g}", res.max_abs_diff <= tol)
        report.artifacts.append(res)

    for kind, path, obj, meta in loaded:
        if kind == "onnx":
            def onnx_weights(proto: Any = obj) -> dict[str, np.ndarray]:
                return art.onnx_layer_weights(proto)
            tol = LOGIT_TOL_FP16 if meta.get("fp16") == "true" else LOGIT_TOL
            judge("onnxruntime", path, lambda p=path: _onnxruntime_runner(p), onnx_weights, meta,
                  art.onnx_weights_sha256(obj), tol)
            if backend:
                judge("swat Session", path, lambda p=path: _session_runner(p), None, None, None, tol)
        else:
            def ts_weights(module: Any = obj) -> dict[str, np.ndarray]:
                return art.torchscript_layer_weights(module)
            judge("torchscript", path, lambda m=obj: _torchscript_runner(m), ts_weights, meta,
                  art.torchscript_weights_sha256(obj))
    if pruned and model is None:
        from swat_deploy.prune import prune

        sm = prune(run)
        judge("pruned model", run.path, lambda: _torchscript_runner(sm.module),
              lambda: {k: v.numpy() for k, v in sm.weights().items()}, None, None)
    return report


def format_report(report: Report) -> str:
    """The human-readable table: one row per check, PASS / FAIL."""
    rows = [("artifact", "check", "value", "threshold", "result")]
    for c in report.checks:
        rows.append((c.artifact, c.check, str(c.value), c.threshold, "PASS" if c.passed else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    verdict = "PASSED" if report.passed else "FAILED"
    lines.append("")
    lines.append(f"{verdict}: {sum(c.passed for c in report.checks)}/{len(report.checks)} checks on "
                 f"{report.samples} test images of {report.run_dir} (run.json accuracy {report.train_accuracy:.4f})")
    return "\n".join(lines)


def report_json(report: Report) -> str:
    return json.dumps(report.to_json(), indent=2)
