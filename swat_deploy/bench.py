"""``swat bench``: how fast the sparse model runs, next to the dense runtimes, on this machine.

Every engine sees the same model and the same input in one process, and the calls are
interleaved round by round (engine order reversed every other round) so that frequency
changes and other load hit all engines alike; each number is a median of repeats. Ratios are
against dense onnxruntime, the runtime a user would otherwise deploy with, and sit next to the
FLOP ideal 1 / (1 - s), the speed-up that skipping every zero multiply would give.

onnxruntime int8 runs next to onnxruntime float32: the QDQ model a CPU user would make with
onnxruntime's own quantiser (`swat_deploy.quantize`; the run's exported ``model.int8.onnx`` when
there is one, else quantised here - calibrated on the run's training images, or random ones for
a bare file - and cached under the user cache dir, keyed by the model's content hash). Every
result carries its ratio to both. The report names the CPU and its vector ISA
(`swat_deploy.cpu`): int8 speed depends on VNNI / AMX far more than float32 speed does.

onnxruntime runs as `swat_deploy.ort.ort_session` opens it (no spinning worker threads).

Library only (returns data); ``cli/bench.py`` formats and prints.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from training.errors import FAILED, SwatError, option

from .cpu import cpu_info
from .ort import ort_session
from .timing import time_interleaved

ENGINES = ("torch", "onnxruntime", "onnxruntime-int8", "swat", "torchscript")
DEFAULT_SWEEP = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)


@dataclass
class EngineResult:
    engine: str
    batch: int
    median_ms: float
    throughput: float            # images per second
    vs_onnxruntime: float | None  # onnxruntime time / this engine's time (> 1: faster)
    repeats: int
    plan: str | None = None       # swat only: what the Session chose, e.g. "kernels, 2 threads"
    vs_onnxruntime_int8: float | None = None  # onnxruntime int8 time / this engine's time


@dataclass
class LayerResult:
    name: str
    op: str
    weight_shape: list[int]
    input_shape: list[int] | None
    sparsity: float
    kernel: str
    dense_us: float
    chosen_us: float
    speedup: float
    ideal: float


@dataclass
class SweepPoint:
    sparsity: float
    batch: int
    onnxruntime_ms: float
    swat_ms: float
    speedup: float
    ideal: float
    plan: str | None = None


@dataclass
class BenchReport:
    target: str
    model: str
    threads: int
    sparsity: float      # fraction of zero weights over all Conv / Gemm / MatMul weights
    ideal: float         # 1 / (1 - sparsity)
    load: tuple[float, float, float]  # os.getloadavg() when the timing started
    results: list[EngineResult] = field(default_factory=list)
    layers: list[LayerResult] = field(default_factory=list)
    sweep: list[SweepPoint] = field(default_factory=list)
    sweep_png: str | None = None
    notes: list[str] = field(default_factory=list)
    cpu: dict[str, Any] = field(default_factory=dict)  # swat_deploy.cpu.cpu_info()
    int8_source: str | None = None  # where the onnxruntime-int8 model came from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------- loading
@dataclass
class _Target:
    label: str
    model_name: str
    onnx_bytes: bytes
    torch_module: torch.nn.Module | None
    torchscript: Path | None
    input_shape: tuple[int, ...]  # (C, H, W)
    plain: Any = None  # the model with plain weight initializers (what a sweep re-prunes)
    calib: Callable[[], np.ndarray] | None = None  # calibration images for the int8 model
    calib_tag: str = ""          # names them in the int8 cache key
    int8_file: Path | None = None  # the run's exported model.int8.onnx
    quantized: bool = False      # onnx_bytes is already a QDQ model (a quantised file)


def format_report(report: BenchReport) -> str:
    """The report as ``swat bench`` prints it: the header, one row per engine and batch size,
    then the per-layer and sweep tables when they were measured, and any notes."""
    from .cpu import describe

    text: list[str] = []
    put = text.append
    load = ", ".join(f"{v:.2f}" for v in report.load)
    put(f"{report.model}  ({report.target})  weight sparsity {report.sparsity:.3f}  "
        f"FLOP ideal {report.ideal:.2f}x  threads {report.threads}  load avg {load}")
    put(f"CPU: {describe(report.cpu)}")
    if report.int8_source:
        put(f"onnxruntime-int8: {report.int8_source}")
    put(f"{'engine':<16} {'batch':>5} {'median ms':>10} {'img/s':>10} {'vs ORT':>7} {'vs int8':>7} {'rounds':>6}")
    for r in report.results:
        ratio = "" if r.vs_onnxruntime is None else f"{r.vs_onnxruntime:.2f}x"
        ratio8 = "" if r.vs_onnxruntime_int8 is None else f"{r.vs_onnxruntime_int8:.2f}x"
        plan = f"  ({r.plan})" if r.plan else ""
        put(f"{r.engine:<16} {r.batch:>5} {r.median_ms:>10.3f} {r.throughput:>10.1f} {ratio:>7} {ratio8:>7} "
            f"{r.repeats:>6}{plan}")
    if report.layers:
        put("")
        put(f"{'layer':<34} {'weight':<16} {'input':<16} {'sparsity':>8} {'kernel':<11} "
            f"{'dense us':>9} {'ours us':>9} {'speedup':>7} {'ideal':>6}")
        for l in report.layers:
            put(f"{l.name[-34:]:<34} {'x'.join(map(str, l.weight_shape)):<16} "
                f"{'x'.join(map(str, l.input_shape or [])):<16} {l.sparsity:>8.3f} {l.kernel:<11} "
                f"{l.dense_us:>9.1f} {l.chosen_us:>9.1f} {l.speedup:>6.2f}x {l.ideal:>5.1f}x")
    if report.sweep:
        put("")
        put(f"{'sparsity':>8} {'batch':>5} {'ORT ms':>9} {'swat ms':>9} {'speedup':>7} {'ideal':>6}")
        for p in report.sweep:
            plan = f"  ({p.plan})" if p.plan else ""
            put(f"{p.sparsity:>8.2f} {p.batch:>5} {p.onnxruntime_ms:>9.3f} {p.swat_ms:>9.3f} "
                f"{p.speedup:>6.2f}x {p.ideal:>5.1f}x{plan}")
    if report.sweep_png:
        put(f"wrote {report.sweep_png}")
    for note in report.notes:
        put(f"note: {note}")
    return "\n".join(text)


def _load_target(target: str | Path) -> _Target:
    """A run dir, a sparse.safetensors or an .onnx file -> the things each engine runs."""
    from .onnx_load import read_model  # external data only from the file's folder; one-line errors

    path = Path(target)
    if not path.exists():
        raise SwatError(f"{path} not found; pass a run dir, a sparse.safetensors or a .onnx file")
    if path.is_dir() or path.suffix == ".safetensors":
        from .prune import load_sparse, prune, to_onnx_model

        sm = load_sparse(path) if path.is_file() else prune(path)
        run_dir = sm.run.path
        exported = run_dir / "model.onnx" if path.is_dir() else None
        # The user's exported file when there is one (what they deploy), else an in-memory export.
        proto = read_model(exported) if exported is not None and exported.is_file() else to_onnx_model(sm)
        ts = run_dir / "model.pt" if path.is_dir() and (run_dir / "model.pt").is_file() else None
        from .export import INT8_NAME
        from .quantize import CALIB_IMAGES, calibration_images

        int8 = run_dir / INT8_NAME if path.is_dir() and (run_dir / INT8_NAME).is_file() else None
        limit = sm.run.config.limit
        tag = f"{sm.run.meta['dataset']} train limit={limit} n={CALIB_IMAGES} seed=0"
        return _Target(str(path), str(sm.run.meta.get("model", "?")), proto.SerializeToString(), sm.module,
                       ts, tuple(sm.input_shape[1:]), plain=to_onnx_model(sm),
                       calib=lambda: calibration_images(sm.run, CALIB_IMAGES, 0), calib_tag=tag, int8_file=int8)
    if path.suffix != ".onnx":
        raise SwatError(f"{path} is neither a run dir, a .safetensors nor a .onnx file; pass one of those")
    proto = read_model(path)
    if not proto.graph.input:
        raise SwatError(f"{path} has no graph input; bench needs a model that takes an image batch")
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.dim_value > 0 else 0 for d in dims)[1:]
    if not shape or any(d == 0 for d in shape):
        raise SwatError(f"{path}: the input's non-batch dims {shape} are not all fixed; export with a fixed "
                        "image size")
    from .qdq import is_quantized
    from .quantize import CALIB_RANDOM, random_images

    return _Target(str(path), path.stem, proto.SerializeToString(), None, None, shape, plain=proto,
                   calib=lambda: random_images(shape, CALIB_RANDOM, 0), calib_tag=f"random n={CALIB_RANDOM} seed=0",
                   quantized=is_quantized(proto))


# ------------------------------------------------------------------------------- timing
def _weight_sparsity(sess: Any, model_bytes: bytes | None = None) -> float:
    if getattr(sess, "delegated", False) and model_bytes is not None:  # a QDQ graph: count its int8 weights
        import onnx

        from .qdq import decode_int8_weights

        ws = [sw.value for sw in decode_int8_weights(onnx.load_from_string(model_bytes)).values()]
        total = sum(w.size for w in ws)
        return sum(int((w == 0).sum()) for w in ws) / total if total else 0.0
    layers = sess.layers()
    total = sum(int(np.prod(l["weight_shape"])) for l in layers)
    zeros = sum(l["sparsity"] * int(np.prod(l["weight_shape"])) for l in layers)
    return zeros / total if total else 0.0


def _plan_label(sess: Any, batch: int) -> str | None:
    """What the Session runs batches of `batch` on, for the report."""
    for p in sess.plans():
        if next(iter(p["inputs"].values()), [None])[0] == batch:
            if p["engine"] == "onnxruntime":
                return "onnxruntime fallback"
            return f"kernels, {p['threads']} thread" + ("s" if p["threads"] > 1 else "")
    return None


def _int8_model(t: _Target) -> tuple[bytes, str]:
    """The int8 QDQ model onnxruntime-int8 runs, and where it came from (for the report)."""
    if t.quantized:
        return t.onnx_bytes, "the file itself (already int8 QDQ)"
    if t.int8_file is not None:
        return t.int8_file.read_bytes(), str(t.int8_file)
    from .quantize import CALIB_RANDOM, CalibrationDataMissing, cache_dir, quantize_cached, random_images

    tag = t.calib_tag
    try:
        data, hit = quantize_cached(t.onnx_bytes, t.calib, tag)
    except CalibrationDataMissing:  # the run's data set is not here: the speed is the same on random images
        tag = f"random n={CALIB_RANDOM} seed=0, the run's data set is not here"
        data, hit = quantize_cached(t.onnx_bytes, lambda: random_images(t.input_shape, CALIB_RANDOM, 0), tag)
    return data, f"quantised by onnxruntime ({tag}), {'cached' if hit else 'now cached'} in {cache_dir()}"


def _ideal(s: float) -> float:
    return 1.0 / max(1.0 - s, 1e-9)


# ------------------------------------------------------------------------------- entry
def bench(target: str | Path, batch_sizes: Sequence[int] = (1,), threads: int = 2, *, repeats: int = 30,
          engines: Sequence[str] = ENGINES, layers: bool = False, sweep: bool = False,
          sweep_sparsities: Sequence[float] = DEFAULT_SWEEP, sweep_png: str | Path | None = None,
          seed: int = 0) -> BenchReport:
    """Time the model at `target` on every engine and batch size; see the module docstring.

    ``layers`` adds a per-layer table (our kernel vs dense on each layer's real input);
    ``sweep`` re-prunes the model by magnitude to each of `sweep_sparsities`, times our Session
    against onnxruntime and, with `sweep_png`, writes the plot there (atomically).
    """
    from .session import Session

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise SwatError(f"{option('threads')} must be a positive integer, got {threads!r}; e.g. {option('threads')} 2")
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise SwatError(f"{option('batch_sizes')} must be positive integers, got {list(batch_sizes)}; e.g. "
                        f"{option('batch_sizes')} 1,64")
    if repeats < 1:
        raise SwatError(f"{option('repeats')} must be >= 1, got {repeats}")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise SwatError(f"unknown engine(s) {unknown}; choose from {', '.join(ENGINES)}")
    t = _load_target(target)
    if sweep:  # fail before the timing, not after it
        _check_sparsities(sweep_sparsities)
        _sweep_weights(t.plain)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # a QDQ file is its own int8 model; there is no float32 model to time next to it
        ort_sess = None if t.quantized else ort_session(t.onnx_bytes, threads)
        sess = Session(t.onnx_bytes, threads=threads)
        s = _weight_sparsity(sess, t.onnx_bytes)
        report = BenchReport(t.label, t.model_name, threads, s, _ideal(s), os.getloadavg(), cpu=cpu_info())
        int8_sess = None
        if "onnxruntime-int8" in engines or t.quantized:
            int8_bytes, report.int8_source = _int8_model(t)
            try:
                int8_sess = ort_session(int8_bytes, threads)
            except Exception as e:
                raise SwatError(f"onnxruntime cannot load the int8 model ({report.int8_source}): "
                                f"{' '.join(str(e).split())[:200]}; re-export it or delete that cached file",
                                kind=FAILED) from None
        if t.quantized:
            report.notes.append("onnxruntime: the file is already int8 (QDQ); bench its float32 model for the "
                                "float32 row")
        ts_module = None
        if "torchscript" in engines and t.torchscript is not None:
            ts_module = torch.jit.load(str(t.torchscript)).eval()
        elif "torchscript" in engines:
            report.notes.append("torchscript: no model.pt in the run dir (export one in TorchScript format to "
                                "include it)")
        if "torch" in engines and t.torch_module is None:
            report.notes.append("torch: only for a run dir or sparse.safetensors (an .onnx file has no torch model)")
        gen = np.random.default_rng(seed)
        for b in batch_sizes:
            x = gen.random((b,) + t.input_shape, dtype=np.float32)
            xt = torch.from_numpy(x)
            fns: dict[str, Callable[[], Any]] = {}
            if "torch" in engines and t.torch_module is not None:
                fns["torch"] = lambda m=t.torch_module: m(xt)
            if ort_sess is not None and ("onnxruntime" in engines or "swat" in engines):
                fns["onnxruntime"] = lambda: ort_sess.run(None, {"input": x})
            if int8_sess is not None:
                fns["onnxruntime-int8"] = lambda: int8_sess.run(None, {"input": x})
            if "swat" in engines:
                fns["swat"] = lambda: sess.run(None, {"input": x})
            if ts_module is not None:
                fns["torchscript"] = lambda: ts_module(xt)
            with torch.inference_mode():
                if "swat" in fns:  # a wrong fast answer is no answer: check before timing
                    # on a QDQ file: against onnxruntime int8 on the same file (the Session hands it to
                    # onnxruntime today, so equal; int8 kernels will set their own tolerance here)
                    ref = fns["onnxruntime" if "onnxruntime" in fns else "onnxruntime-int8"]()[0]
                    got = fns["swat"]()[0]
                    if not np.allclose(got, ref, rtol=1e-4, atol=1e-4):
                        raise SwatError(f"the sparse Session disagrees with onnxruntime on {t.label} "
                                        f"(max diff {float(np.abs(got - ref).max()):.3g}); please report this",
                                        kind=FAILED)
                timed = time_interleaved(fns, repeats)
            ort_ms = timed["onnxruntime"][0] * 1e3 if "onnxruntime" in timed else None
            int8_ms = timed["onnxruntime-int8"][0] * 1e3 if "onnxruntime-int8" in timed else None
            for name in [e for e in ENGINES if e in timed]:
                if name == "onnxruntime" and "onnxruntime" not in engines:
                    continue
                sec, rounds = timed[name]
                report.results.append(EngineResult(name, b, sec * 1e3, b / sec,
                                                   None if ort_ms is None else ort_ms / (sec * 1e3), rounds,
                                                   _plan_label(sess, b) if name == "swat" else None,
                                                   None if int8_ms is None else int8_ms / (sec * 1e3)))
        if layers:
            report.layers = layer_table(sess)
        if sweep:
            report.sweep = sweep_sparsity(t.plain, t.input_shape, batch_sizes, threads, sweep_sparsities, repeats)
            if sweep_png is not None:
                report.sweep_png = str(plot_sweep(report.sweep, sweep_png, f"{t.model_name}, {threads} threads"))
        return report
    finally:
        torch.set_num_threads(old_threads)


# ------------------------------------------------------------------------------- per layer
def layer_table(sess: Any, repeats: int = 15) -> list[LayerResult]:
    """Per Conv / Gemm layer of a Session that has run: its kernel vs dense on its real input."""
    from .kernels import make_conv2d, make_linear

    rows = []
    for layer in sess._ctx.layers:
        op = layer._last
        if op is None or op.spec.input_shape is None:
            continue
        spec = op.spec
        w = layer.weight4 if spec.kind == "conv2d" else layer.weight
        if spec.kind == "conv2d":
            dense = make_conv2d(w, layer.bias, spec.stride, spec.padding, spec.dilation, spec.groups,
                                input_shape=spec.input_shape, kernel="dense", threads=op.threads)
        else:
            dense = make_linear(w, layer.bias, input_shape=spec.input_shape, kernel="dense", threads=op.threads)
        x = torch.rand(spec.input_shape)
        with torch.inference_mode():
            timed = time_interleaved({"dense": lambda: dense(x), "chosen": lambda: op(x)}, repeats, budget_s=2.0)
        d, c = timed["dense"][0] * 1e6, timed["chosen"][0] * 1e6
        rows.append(LayerResult(layer.name, layer.op_type, list(spec.weight_shape), list(spec.input_shape),
                                op.weight_sparsity, op.kernel_name, d, c, d / c, _ideal(op.weight_sparsity)))
    return rows


# ------------------------------------------------------------------------------- sweep
def _sweep_weights(model: Any) -> set[str]:
    """Names of the plain float32 Conv / Gemm / MatMul weight initializers a sweep can re-prune."""
    from onnx import TensorProto

    used = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1}
    names = {i.name for i in model.graph.initializer
             if i.name in used and i.data_type == TensorProto.FLOAT and len(i.dims) >= 2}
    if not names:
        raise SwatError("the model's Conv / Gemm weights are not plain initializers (compact encoding?); "
                        "run the sweep on the run dir instead of the exported file")
    return names


def magnitude_prune_onnx(model: Any, sparsity: float) -> Any:
    """A copy of `model` whose Conv / Gemm / MatMul weight initializers keep only their largest
    |w| (per tensor), so the sweep needs nothing but the ONNX file."""
    import onnx
    from onnx import numpy_helper

    weights = _sweep_weights(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name not in weights:
            continue
        w = numpy_helper.to_array(init)
        k = int(round(sparsity * w.size))
        if k > 0:
            flat = w.reshape(-1).copy()
            flat[np.argpartition(np.abs(flat), k - 1)[:k]] = 0.0
            w = flat.reshape(w.shape)
        init.CopyFrom(numpy_helper.from_array(w, init.name))
    return out


def _check_sparsities(sparsities: Sequence[float]) -> None:
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise SwatError(f"sweep sparsity {s} is not in [0, 1); e.g. 0.9")


def sweep_sparsity(model: Any, input_shape: tuple[int, ...], batch_sizes: Sequence[int], threads: int,
                   sparsities: Sequence[float], repeats: int = 20) -> list[SweepPoint]:
    """Session vs onnxruntime on magnitude-pruned copies of `model` at each sparsity."""
    from .session import Session

    _check_sparsities(sparsities)
    points = []
    gen = np.random.default_rng(0)
    for s in sparsities:
        data = magnitude_prune_onnx(model, s).SerializeToString()
        ort_sess, sess = ort_session(data, threads), Session(data, threads=threads)
        for b in batch_sizes:
            x = gen.random((b,) + tuple(input_shape), dtype=np.float32)
            timed = time_interleaved({"onnxruntime": lambda: ort_sess.run(None, {"input": x}),
                                      "swat": lambda: sess.run(None, {"input": x})}, repeats, budget_s=8.0)
            o, w = timed["onnxruntime"][0] * 1e3, timed["swat"][0] * 1e3
            points.append(SweepPoint(float(s), int(b), o, w, o / w, _ideal(_weight_sparsity(sess)),
                                     _plan_label(sess, b)))
    return points


def plot_sweep(points: Sequence[SweepPoint], path: str | Path, title: str) -> Path:
    """Speed-up over onnxruntime vs sparsity, one line per batch size, plus the FLOP ideal; atomic write."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for b in sorted({p.batch for p in points}):
        pts = sorted((p for p in points if p.batch == b), key=lambda p: p.sparsity)
        ax.plot([p.sparsity for p in pts], [p.speedup for p in pts], "o-", label=f"swat Session, batch {b}")
    ideal = sorted({(p.sparsity, p.ideal) for p in points})
    ax.plot([s for s, _ in ideal], [i for _, i in ideal], "k--", label="FLOP ideal 1/(1-s)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("weight sparsity")
    ax.set_ylabel("speed-up vs dense onnxruntime")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sweep.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
