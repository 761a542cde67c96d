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

Closeness of logits alone cannot prove a file is the run's: a weight changed by 1e-4 moves the
logits by less than 1e-3. So every float32 / fp16 export's tensors (layer weights decoded from
their compact form, biases, normalisation) must equal the run's pruned model bit for bit (fp16:
its float16 rounding), and the deploy metadata (class names, normalisation, epochs, seed, ...)
must equal run.json. Every export ``swat export`` wrote into the run dir (``exports.json``) is
expected: a missing one fails unless ``allow_missing``; the report names the files it checked.

int8 (QDQ) exports (``model.int8.onnx``) are judged as int8: integrity, provenance and metadata
as above; per layer, the zeros counted in the stored int8 weights must be exactly the zeros of
the pruned float32 weights; accuracy within 1.0 pt of the float32 export (the one judged in the
same call, else run.json's). Agreement and logit difference are reported, not thresholded:
int8 rounding moves logits by design.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from training import data as datasets
from training.errors import FAILED, SwatError, option
from training.rundir import Run, load_trained_model, read_run
from training.text import escape_control as esc
from training.evaluation import iterate_batches
from swat_deploy import artifact as art
from swat_deploy.formats import sparsity_of
from swat_deploy.export import DEFAULT_NAMES, INT8_NAME
from swat_deploy.qdq import is_quantized

ACCURACY_TOL = 0.001
AGREEMENT_MIN = 0.999
SPARSITY_TOL = 0.005
LOGIT_TOL = 1e-3
LOGIT_TOL_FP16 = 5e-2
INT8_ACCURACY_TOL_PT = 1.0  # int8 export vs float32 export, percentage points
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
    accuracy_diff_pt: float | None = None  # int8 exports: accuracy - float32 export's, in points


@dataclass
class Report:
    run_dir: str
    train_accuracy: float
    reference_accuracy: float
    samples: int
    checks: list[Check] = field(default_factory=list)
    artifacts: list[ArtifactResult] = field(default_factory=list)
    block: int = 1  # run.json's --block: groups of output channels claimed to share their zeros
    checked: list[str] = field(default_factory=list)  # files judged, as given / found
    missing: list[str] = field(default_factory=list)  # exports expected (exports.json) but absent
    allow_missing: bool = False

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
            "block": self.block,
            "layers": primary.layers,
            "samples": self.samples,
            "reference_accuracy": self.reference_accuracy,
            "checked_files": list(self.checked),
            "missing_files": list(self.missing),
            "checks": [asdict(c) for c in self.checks],
            "artifacts": [asdict(a) for a in self.artifacts],
        }


Runner = Callable[[np.ndarray], np.ndarray]


def _test_images(run: Run, data_dir: str | None, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    name = run.meta["dataset"]
    try:
        ds = datasets.load(name, "test", data_dir or run.config.data_dir)
    except SwatError as e:  # its message already names the files and the data_dir fix
        raise SwatError(f"cannot verify: test split of {name!r} unavailable: {e.template}", e.kind) from None
    except (OSError, ValueError) as e:
        raise SwatError(f"test split of {name!r} unavailable ({type(e).__name__}: {e}); pass {option('data_dir')} DIR "
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
    if getattr(sess, "delegated", False):  # a graph it hands whole to onnxruntime: nothing of ours to judge
        return None
    return lambda x: sess.run(None, {"input": x})[0]


def _torchscript_runner(module: Any) -> Runner:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()
    return run


def _find_artifacts(run: Run, model: str | Path | None) -> tuple[list[Path], list[str]]:
    """(files to judge, expected exports that are missing).

    Expected: every file ``swat export`` recorded in RUN/exports.json, plus the default names
    present (run dirs exported before exports.json existed).
    """
    from training.rundir import read_exports

    if model is not None:
        return [Path(model)], []
    names = list(dict.fromkeys([*DEFAULT_NAMES.values(), INT8_NAME, *read_exports(run.path)]))
    found = [run.path / n for n in names if (run.path / n).is_file()]
    missing = [n for n in read_exports(run.path) if not (run.path / n).is_file()]
    if not found and not missing:
        raise SwatError(f"no exported model in {run.path}; export one from the run dir ({option('fmt')} onnx), "
                        f"or pass {option('model')} FILE")
    return found, missing


def _exact_weights(stored: dict[str, np.ndarray], expected: dict[str, np.ndarray], fp16_names: set[str],
                   fp16: bool, used: set[str] | None = None) -> tuple[str, bool]:
    """(value, passed) of the exact-weights row: every tensor of the pruned model, by name, equal
    to the file's (the layer weights rounded to float16 for an fp16 export).

    ``used``: the tensors the file's Conv / Gemm / MatMul compute with; each must be one of the
    run's (a layer fed another tensor than the one named after it is caught here). An all-zero
    tensor may be absent: exporters drop zero biases.
    """
    foreign = sorted(((used or set()) & set(stored)) - set(expected))  # constants only, not activations
    if foreign:
        return f"a layer computes with {foreign[0]!r}, not a tensor of the run", False
    missing, differ = [], []
    for name, want in expected.items():
        got = stored.get(name)
        if got is None:
            if np.any(want):
                missing.append(name)
            continue
        if fp16 and name in fp16_names:
            want = want.astype(np.float16).astype(np.float32)
        got = np.asarray(got)
        if got.shape != want.shape or got.dtype != want.dtype:
            differ.append((name, f"shape/dtype {list(got.shape)} {got.dtype}"))
        elif not np.array_equal(got, want):
            diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            differ.append((name, f"max diff {diff:.3g}"))
    if not missing and not differ:
        return f"{len(expected)} tensors exact", True
    parts = [f"{n} {why}" for n, why in differ[:2]] + [f"{n} missing" for n in missing[:2]]
    more = len(differ) + len(missing) - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else ""), False


def _block_pattern(w: np.ndarray, block: int) -> tuple[str, str, bool]:
    """(value, threshold, passed) of a block-structure row: every group of ``block`` consecutive
    output channels of ``w`` must have one zero pattern (what block kernels rely on)."""
    from swat_deploy.formats import block_pattern_violations

    groups = w.shape[0] // block if w.ndim else 0
    if w.ndim == 0 or w.shape[0] % block:
        return f"{w.shape[0] if w.ndim else 0} channels", f"a multiple of {block}", False
    bad = block_pattern_violations(w, block)
    return ("shared" if not bad else f"{bad} of {groups} groups differ"), "every group shares its zeros", bad == 0


def _metadata_claims(meta: dict[str, str], run: Run) -> list[str]:
    """Keys whose embedded claim disagrees with run.json (the file describes another run or was edited)."""
    rm = run.meta
    bad = []
    for key in ("model", "dataset", "mode", "topk"):
        if key in meta and meta[key] != str(rm.get(key)):
            bad.append(key)
    if "block" in meta and meta["block"] != str(rm.get("block", 1)):
        bad.append("block")
    for key, want in (("sparsity", rm.get("sparsity")), ("test_accuracy", rm.get("test_accuracy")),
                      ("num_classes", rm.get("num_classes"))):
        try:
            if key not in meta or abs(float(meta[key]) - float(want)) > 1e-9:
                bad.append(key)
        except (TypeError, ValueError):
            bad.append(key)
    for key, want in (("epochs", rm.get("epochs")), ("seed", rm.get("seed")), ("producer", "swat")):
        if meta.get(key) != str(want):
            bad.append(key)
    for key, want in (("class_names", rm.get("class_names", [])), ("normalization", rm.get("normalization", {}))):
        try:
            if key not in meta or json.loads(meta[key]) != want:
                bad.append(key)
        except (json.JSONDecodeError, TypeError):
            bad.append(key)
    try:
        claimed = {l["name"]: (list(l["shape"]), float(l["sparsity"])) for l in json.loads(meta.get("layers", "[]"))}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
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
            shown = got[1:] if isinstance(got, list) else got
            raise SwatError(f"{path} takes input {shown} but run.json's model takes {want[1:]}; "
                            f"verify it against the run dir it was exported from")


@dataclass
class _Loaded:
    """One exported file, parsed: its kind (onnx / torchscript), the object and its metadata."""

    kind: str
    path: Path
    obj: Any
    meta: dict[str, str]


def _load_artifacts(run: Run, paths: list[Path]) -> list[_Loaded]:
    """Parse every file first: a missing / truncated / foreign file is a one-line error up front."""
    loaded = []
    for path in paths:
        kind = art.artifact_kind(path)
        if kind == "onnx":
            obj = art.load_onnx(path)
            meta = {k[len(art.META_PREFIX):]: v for k, v in art.onnx_metadata(obj).items()
                    if k.startswith(art.META_PREFIX)}
            get = lambda proto=obj: art.onnx_layer_weights(proto)  # noqa: E731
        else:
            obj, meta = art.load_torchscript(path)
            get = lambda module=obj: art.torchscript_layer_weights(module)  # noqa: E731
        loaded.append(_Loaded(kind, path, obj, meta))
        try:
            weights = get()
        except SwatError as e:
            if e.kind != FAILED:  # stored weights that do not decode are reported as a FAIL row
                raise
            weights = None
        _check_same_model(path, run, weights, meta)
    return loaded


@dataclass
class _Reference:
    """The trained model's answers on the test images every artefact is judged against."""

    x: torch.Tensor
    labels: np.ndarray
    logits: np.ndarray
    pred: np.ndarray
    accuracy: float
    target_accuracy: float  # what an export's accuracy must match

    @classmethod
    def of(cls, run: Run, data_dir: str | None, limit: int | None) -> "_Reference":
        x, y, info = _test_images(run, data_dir, limit)
        reference = load_trained_model(run)
        with torch.no_grad():
            logits = np.concatenate([reference(datasets.normalize(x[i:i + BATCH], info)).numpy()
                                     for i in range(0, len(x), BATCH)])
        pred = logits.argmax(1)
        labels = y.numpy()
        accuracy = float((pred == labels).mean())
        # the run's own number applies to the full test split; a `limit` subset is judged by the
        # reference model's accuracy on that same subset
        target = float(run.meta["test_accuracy"]) if limit is None else accuracy
        return cls(x, labels, logits, pred, accuracy, target)


class _Pruned:
    """The run's pruned model (what every export was made from), built on first use only."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self._model: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            from swat_deploy.prune import prune

            self._model = prune(self.run)
        return self._model

    def weights(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.model.weights().items()}

    def state(self) -> dict[str, np.ndarray]:
        """Every tensor of the pruned model (weights, biases, normalisation), by name."""
        return {k: v.detach().numpy() for k, v in self.model.module.state_dict().items()}


class _Judge:
    """Judges artefacts one by one into a :class:`Report`: each job (claims, weights, outputs)
    is one method adding its rows."""

    def __init__(self, run: Run, report: Report, ref: _Reference, pruned: _Pruned) -> None:
        self.run, self.report, self.ref, self.pruned = run, report, ref, pruned
        self.expected = {l["name"]: float(l["sparsity"]) for l in run.layers}
        self.blocks_of = {l["name"]: int(l.get("block", 1)) for l in run.layers}  # a block run's claim, per layer

    def judge(self, name: str, path: Path, make_runner: Callable[[], Runner | None],
              get_weights: Callable[[], dict[str, np.ndarray]] | None,
              meta: dict[str, str] | None, actual_hash: str | None, tol: float = LOGIT_TOL,
              int8: bool = False, exact: Callable[[], tuple[str, bool]] | None = None) -> None:
        res = ArtifactResult(name, str(path))

        def add(check: str, value: Any, threshold: str, ok: Any) -> None:
            self.report.checks.append(Check(name, check, value, threshold, bool(ok)))

        if meta is not None:
            self._claims(meta, actual_hash, add)
        if exact is not None:
            self._exact(exact, tol, add)
        if get_weights is not None:
            self._weights(get_weights, int8, res, add)
        if self._outputs(make_runner, tol, int8, res, add):
            self.report.artifacts.append(res)

    def _claims(self, meta: dict[str, str], actual_hash: str | None, add: Callable[..., None]) -> None:
        """Integrity (hash vs metadata), provenance (run weights hash) and metadata vs run.json."""
        claimed = meta.get("weights_sha256")
        add("integrity (weights hash vs metadata)", (actual_hash or "")[:16], f"= {(claimed or 'missing')[:16]}",
            claimed == actual_hash)
        origin, want = meta.get("run_weights_sha256"), self.run.meta.get("weights_sha256")
        add("provenance (run weights hash vs run.json)", (origin or "missing")[:16], f"= {str(want)[:16]}",
            origin == want)
        bad = _metadata_claims(meta, self.run)
        add("metadata claims vs run.json", ", ".join(bad) or "consistent", "all equal", not bad)

    @staticmethod
    def _exact(exact: Callable[[], tuple[str, bool]], tol: float, add: Callable[..., None]) -> None:
        try:
            value, ok = exact()
        except SwatError as e:
            value, ok = str(e)[:80], False
        add("weights = run's pruned weights (exact)", value,
            "bit-equal" + (" to their float16 rounding" if tol == LOGIT_TOL_FP16 else ""), ok)

    def _weights(self, get_weights: Callable[[], dict[str, np.ndarray]], int8: bool, res: ArtifactResult,
                 add: Callable[..., None]) -> None:
        """Per layer: present, sparsity as claimed (int8: exactly the float32 zeros), block pattern."""
        try:
            weights = get_weights()
        except SwatError as e:
            add("stored weights decode", str(e)[:80], "decodes", False)
            return
        missing = sorted(set(self.expected) - set(weights))
        if missing:
            add("layers present", f"missing {missing[:3]}", "all run.json layers", False)
        floats = self.pruned.weights() if int8 else {}
        for lname, exp in self.expected.items():
            if lname not in weights:
                continue
            w = weights[lname]
            block = self.blocks_of.get(lname, 1)
            measured = sparsity_of(w)
            res.layers.append({"name": lname, "expected_sparsity": exp, "measured_sparsity": measured,
                               "block": block})
            if block > 1:
                add(f"block {block}x1 pattern {lname}", *_block_pattern(w, block))
            if int8:  # exact: the int8 zeros are the float32 zeros, no more, no fewer
                ref = floats.get(lname)
                same = ref is not None and ref.shape == w.shape and np.array_equal(ref == 0, w == 0)
                add(f"int8 zeros {lname}", round(measured, 4), f"= float32 zeros ({exp:.4f})", same)
                continue
            add(f"sparsity {lname}", round(measured, 4), f"{exp:.4f} +/- {SPARSITY_TOL}",
                abs(measured - exp) <= SPARSITY_TOL)

    def _outputs(self, make_runner: Callable[[], Runner | None], tol: float, int8: bool, res: ArtifactResult,
                 add: Callable[..., None]) -> bool:
        """Run the file in its runtime on the test images: accuracy, agreement, logit difference.

        Returns whether the artefact has a result to report (False: no runner of ours applies)."""
        try:
            runner = make_runner()
        except Exception as e:
            add("loads in its runtime", f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}",
                "loads", False)
            return True
        if runner is None:
            return False
        ref = self.ref
        try:
            logits = _predict(runner, ref.x)
        except Exception as e:
            add("runs on the test split", f"{type(e).__name__}: {str(e)[:80]}", "no error", False)
            return True
        if logits.shape != ref.logits.shape:
            add("output shape", list(logits.shape), str(list(ref.logits.shape)), False)
            return True
        pred = logits.argmax(1)
        res.accuracy = float((pred == ref.labels).mean())
        res.agreement = float((pred == ref.pred).mean())
        res.max_abs_diff = float(np.abs(logits - ref.logits).max()) if len(logits) else 0.0
        if int8:
            self._int8_accuracy(res, add)
            return True
        add("accuracy vs run.json", round(res.accuracy, 5), f"{ref.target_accuracy:.5f} +/- {ACCURACY_TOL}",
            abs(res.accuracy - ref.target_accuracy) <= ACCURACY_TOL)
        add("top-1 agreement with trained model", round(res.agreement, 5), f">= {AGREEMENT_MIN}",
            res.agreement >= AGREEMENT_MIN)
        add("max |logit diff|", float(f"{res.max_abs_diff:.3g}"), f"<= {tol:g}", res.max_abs_diff <= tol)
        return True

    def _int8_accuracy(self, res: ArtifactResult, add: Callable[..., None]) -> None:
        """int8 rounding moves logits by design: only accuracy is thresholded, against the float32 export."""
        float_acc = next((a.accuracy for a in self.report.artifacts if a.name == "onnxruntime"
                          and a.accuracy is not None), None)
        source = "float32 export" if float_acc is not None else "run.json, which the float32 export matches"
        float_acc = self.ref.target_accuracy if float_acc is None else float_acc
        res.accuracy_diff_pt = round(100.0 * (res.accuracy - float_acc), 3)
        add("accuracy vs float32 export",
            f"{res.accuracy_diff_pt:+.2f} pt ({res.accuracy:.4f} vs {float_acc:.4f}, {source})",
            f"|diff| <= {INT8_ACCURACY_TOL_PT:g} pt", abs(res.accuracy_diff_pt) <= INT8_ACCURACY_TOL_PT)

    # ------------------------------------------------------------------ per kind of file
    def onnx(self, item: _Loaded, backend: bool) -> None:
        proto, meta = item.obj, item.meta
        fp16 = meta.get("fp16") == "true"
        tol = LOGIT_TOL_FP16 if fp16 else LOGIT_TOL
        int8 = meta.get("int8") == "true" or is_quantized(proto)
        suffix = " int8" if int8 else ""

        def exact() -> tuple[str, bool]:
            used = {i for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose")
                    for i in n.input[1:3] if i}
            return _exact_weights(art.onnx_named_tensors(proto), self.pruned.state(),
                                  set(art.onnx_stored_weights(proto)), fp16, used)

        self.judge("onnxruntime" + suffix, item.path, lambda: _onnxruntime_runner(item.path),
                   lambda: art.onnx_layer_weights(proto), meta, art.onnx_weights_sha256(proto), tol, int8,
                   None if int8 else exact)
        if backend:
            self.judge("swat Session" + suffix, item.path, lambda: _session_runner(item.path), None, None, None,
                       tol, int8)

    def torchscript(self, item: _Loaded) -> None:
        module = item.obj

        def exact() -> tuple[str, bool]:
            return _exact_weights(art.torchscript_named_tensors(module), self.pruned.state(), set(), False)

        self.judge("torchscript", item.path, lambda: _torchscript_runner(module),
                   lambda: art.torchscript_layer_weights(module), item.meta, art.torchscript_weights_sha256(module),
                   exact=exact)

    def pruned_model(self) -> None:
        sm = self.pruned.model  # prunes once: the int8 rows may have done it already
        self.judge("pruned model", self.run.path, lambda: _torchscript_runner(sm.module),
                   lambda: {k: v.numpy() for k, v in sm.weights().items()}, None, None)


def verify(run_dir: str | Path, model: str | Path | None = None, *, data_dir: str | None = None,
           limit: int | None = None, backend: bool = True, pruned: bool = True,
           allow_missing: bool = False) -> Report:
    """Check every exported artefact of ``run_dir`` (or ``model``) against the run; see module doc.

    ``backend``: also run ONNX files in our sparse ``Session``; ``pruned``: also judge the pruned
    model of :func:`swat_deploy.prune.prune` (what the exports were made from).
    ``allow_missing``: an export recorded in exports.json but deleted since is listed, not failed.
    """
    run = read_run(run_dir)
    paths, missing_exports = _find_artifacts(run, model)
    if limit is not None and limit < 1:
        raise SwatError(f"{option('limit')} {limit} must be a positive number of test images")
    loaded = _load_artifacts(run, paths)
    ref = _Reference.of(run, data_dir, limit)
    report = Report(str(run.path), float(run.meta["test_accuracy"]), ref.accuracy, len(ref.labels))
    report.block = int(run.meta.get("block", 1))
    report.checked = [str(p) for p in paths]
    report.missing, report.allow_missing = list(missing_exports), allow_missing
    if not allow_missing:
        for name in missing_exports:
            report.checks.append(Check(name, "exported file present", "missing",
                                       "listed in exports.json", False))
    judge = _Judge(run, report, ref, _Pruned(run))
    for item in loaded:
        if item.kind == "onnx":
            judge.onnx(item, backend)
        else:
            judge.torchscript(item)
    if pruned and model is None:
        judge.pruned_model()
    return report


def format_checks(checks: list[Check]) -> list[str]:
    """The table of checks, one row each with PASS / FAIL (run-dir and module verifies alike)."""
    rows = [("artifact", "check", "value", "threshold", "result")]
    for c in checks:
        rows.append((esc(c.artifact), esc(c.check), esc(str(c.value)), esc(c.threshold), "PASS" if c.passed else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_report(report: Report) -> str:
    """The human-readable table: one row per check, PASS / FAIL."""
    lines = format_checks(report.checks)
    verdict = "PASSED" if report.passed else "FAILED"
    lines.append("")
    lines.append("checked: " + (", ".join(esc(c) for c in report.checked) or "no exported file"))
    if report.missing:
        how = "not checked (--allow-missing)" if report.allow_missing else "FAIL"
        lines.append(f"missing: {', '.join(esc(m) for m in report.missing)} (listed in exports.json) - {how}")
    lines.append(f"{verdict}: {sum(c.passed for c in report.checks)}/{len(report.checks)} checks on "
                 f"{report.samples} test images of {report.run_dir} (run.json accuracy {report.train_accuracy:.4f})")
    return "\n".join(lines)


def report_json(report: Report) -> str:
    return json.dumps(report.to_json(), indent=2)
