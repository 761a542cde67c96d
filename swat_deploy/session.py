"""`Session`: run an ONNX CNN with its sparse weights kept sparse.

Stock onnxruntime densifies sparse weights when it loads them, so a 90 %-sparse model runs
at dense speed. This Session mirrors onnxruntime's InferenceSession API but executes the graph
itself: load -> constant-fold (which also expands the exporter's compressed weights) -> fuse
Conv+BatchNorm -> a flat list of steps, where each Conv / Gemm / constant-weight MatMul is a
`swat_deploy.kernels` op and everything else is a torch op. Kernels are built lazily on the
first run of each input-shape class, so their selection sees real shapes.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from training.errors import SwatError

from . import autotune
from .onnx_ops import DEFAULT_DOMAINS, REGISTRY, BuildContext, Graph, Node, ValueInfo, graph_from_onnx, optimize
from .kernels.base import torch_thread_cap
from .onnx_ops.base import to_numpy, to_torch


@dataclass(frozen=True)
class NodeArg:
    """What get_inputs() / get_outputs() return, shaped like onnxruntime's NodeArg."""

    name: str
    shape: list[int | str | None] | None
    type: str


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch intra-op threads for the duration of one run, restored afterwards (process-global)."""
    if threads is None:
        yield
        return
    old = torch.get_num_threads()
    if old != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


@dataclass
class _Step:
    node: Node
    fn: Any                         # list of inputs -> list of outputs
    inputs: list[tuple[str, Any]]   # ("value", name) | ("const", tensor) | ("none", None)
    outputs: list[str]


def _load_graph(source: Any) -> tuple[Graph, Callable[[], bytes | str] | None]:
    """The graph, and how to get the same model as onnxruntime input (None for a bare Graph).

    ONNX comes in through :mod:`swat_deploy.onnx_load` only: external data is read from inside
    the model file's folder, and refused for bytes / a ModelProto (they have no folder). Then it
    must pass strict ONNX type and shape inference (as onnxruntime requires), and a swat export
    whose tensors no longer match its recorded hash is refused (damaged or edited).
    """
    if isinstance(source, Graph):
        return source, None
    import onnx

    from .onnx_load import check_integrity, check_valid, from_proto, parse_model, read_model

    def checked(model: Any, what: str) -> Graph:
        check_valid(model, what)
        check_integrity(model, what)
        return graph_from_onnx(model)

    if isinstance(source, onnx.ModelProto):
        model = from_proto(source)
        return checked(model, "the ModelProto given"), model.SerializeToString
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return checked(parse_model(data), "the bytes given"), lambda: data
    if not isinstance(source, (str, Path)):
        raise SwatError(f"Session() takes a path, an onnx.ModelProto or a Graph, not {type(source).__name__}; "
                        "pass a .onnx file, a run dir or a sparse.safetensors path")
    path = Path(source)
    if path.is_dir():
        if not (path / "run.json").is_file():
            raise SwatError(f"{path} is a directory but not a run dir (no run.json); pass a run dir, "
                            "a .onnx file or a sparse.safetensors file")
        from .prune import prune  # late: prune pulls in models / training

        return _from_sparse_model(prune(path))
    if not path.is_file():
        raise SwatError(f"{path} not found; check the path to the .onnx file, run dir or sparse.safetensors")
    if path.suffix == ".safetensors":
        from .prune import load_sparse

        return _from_sparse_model(load_sparse(path))
    graph = checked(read_model(path), str(path))
    # the fallback opens the path through ort_session, which confines external data the same way
    return graph, lambda: str(path)


def _project_errors(fn: Callable) -> Callable:
    """A model is untrusted input: whatever goes wrong building or running it surfaces as one
    SwatError naming the failure, never as some library's exception type."""
    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except SwatError:
            raise
        except Exception as exc:
            msg = " ".join(str(exc).split())[:300]
            doing = "loaded" if fn.__name__ == "__init__" else "run"
            raise SwatError(f"the model cannot be {doing} ({type(exc).__name__}: {msg}); the file is damaged "
                            f"or uses an ONNX feature the Session does not support") from exc
    return wrapper


def _needs_onnxruntime(graph: Graph) -> bool:
    """True for a quantised graph (QDQ / QOperator ops) with an op the registry cannot run."""
    from .qdq import QUANT_OPS

    return any(n.op_type in QUANT_OPS and (n.domain not in DEFAULT_DOMAINS or n.op_type not in REGISTRY)
               for n in graph.nodes)


def _from_sparse_model(sm: Any) -> tuple[Graph, Callable[[], bytes]]:
    """A pruned model (run dir or sparse.safetensors) -> graph, via an in-memory ONNX export."""
    from .prune import to_onnx_model

    model = to_onnx_model(sm)
    return graph_from_onnx(model), model.SerializeToString


@dataclass(frozen=True)
class Plan:
    """How one class of runs (requested outputs + input shapes) executes, as measured at its
    first run: our kernels on ``threads`` threads, or stock onnxruntime (``engine``)."""

    engine: str           # "swat" | "onnxruntime"
    threads: int
    ms: dict[str, float]  # ms per run of each candidate timed ({} when there was nothing to choose)

    @property
    def name(self) -> str:
        """The candidate name this plan ran as when timed ("swat/2", "onnxruntime")."""
        return "onnxruntime" if self.engine == "onnxruntime" else f"swat/{self.threads}"


# A plan is chosen from about a second of timing; a burst of other load in that second can pick
# the slower engine for the session's life (measured: one process in three planned our kernels
# for a ResNet-18 at 50 % and ran 0.61x onnxruntime). So the first CHECK_RUNS real runs are
# timed too (a clock read each), and if their median is RECHECK_SLOWER times what the plan
# expected while another candidate was timed faster than that median, the shape is planned once
# more. Once per shape: a machine that is simply slower now must not re-time forever.
CHECK_RUNS = 16
RECHECK_SLOWER = 1.25
# onnxruntime must be timed this much faster than our kernels to take a shape (it holds the
# dense weights), and an earlier process's choice stays unless it is now this much slower.
# Both bound what a near-tie may cost: with 0.95 and 1.10 a ResNet-18 at 70 % (batch 1) kept
# our kernels at 0.94x onnxruntime in every later process after one noisy plan chose them.
ORT_MARGIN = 0.97
STICKY = 1.05


def _plan_looks_wrong(plan: Plan, seconds: list[float]) -> bool:
    """Whether the real runs contradict the timing the plan was chosen on."""
    expected = plan.ms.get(plan.name)
    if not expected or len(seconds) < CHECK_RUNS:
        return False
    seen_ms = 1e3 * statistics.median(seconds)
    others = [ms for name, ms in plan.ms.items() if name != plan.name]
    return seen_ms > RECHECK_SLOWER * expected and any(ms < seen_ms / RECHECK_SLOWER for ms in others)


class Session:
    """An onnxruntime-like session whose Conv / Gemm / MatMul run on swat's sparse kernels.

    ``threads`` sets torch's intra-op threads during ``run`` (restored after) and is passed to
    every kernel; ``kernel`` forces one kernel for every layer (tests, benchmarks). ``run`` is
    safe to call from several Python threads, but thread counts are process-wide in torch, so
    sessions with different ``threads`` should not run concurrently.

    The first run of each input shape times the whole graph on our kernels with all threads,
    with one thread, and (``fallback``, on by default unless ``kernel`` is forced) on stock
    onnxruntime, and keeps the fastest for that shape (see `plans`). Per-layer autotuning
    already falls back to dense torch where sparse kernels lose; the whole-graph fallback
    exists because onnxruntime's dense convs are faster than torch's at batch 1, so a model
    that is sparse only in a few layers (or ~50 % everywhere) is never slower than the
    runtime it replaces.

    A quantised graph (QDQ: QuantizeLinear / DequantizeLinear, or onnxruntime's QLinear ops) with
    an op the Session has no implementation of is handed whole to onnxruntime (``delegated`` is
    True, every plan says onnxruntime), whatever ``fallback`` says: correct results first.
    """

    @_project_errors
    def __init__(self, path_or_model: str | Path | Any, threads: int | None = None,
                 kernel: str | None = None, fallback: bool = True) -> None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise SwatError(f"threads must be a positive integer or None, got {threads!r}; e.g. threads=2")
        if kernel is not None and not isinstance(kernel, str):
            raise SwatError(f"kernel must be a kernel name or None, got {kernel!r}; e.g. kernel='dense'")
        if kernel is not None:
            from .kernels import kernel_names

            if kernel not in kernel_names():
                raise SwatError(f"unknown kernel {kernel!r}; choose one of: {', '.join(kernel_names())}")
        source, onnx_source = _load_graph(path_or_model)
        self.metadata: dict[str, str] = dict(source.metadata)
        # A quantised graph our ops cannot run goes whole to onnxruntime (``delegated``; see run).
        self.delegated = _needs_onnxruntime(source)
        qdq = _qdq_graph(source, kernel) if self.delegated else None  # int8 kernels: see the QDQ section
        if qdq is not None:
            self.delegated = False
        if self.delegated and onnx_source is None:
            raise SwatError("this Graph has quantisation ops the Session cannot run, and a bare Graph cannot be "
                            "handed to onnxruntime; pass the .onnx file or its ModelProto")
        self._graph = source if self.delegated else qdq if qdq is not None else optimize(source, REGISTRY)
        self._threads = threads
        # One explicit thread count for the whole run (the process default when none is given):
        # torch's count stays fixed while the graph runs, see kernels.base.thread_scope.
        self._ctx = BuildContext(kernel=kernel, threads=threads if threads is not None else torch.get_num_threads())
        self._inputs = list(self._graph.inputs)
        self._outputs = list(self._graph.outputs)
        self._const_t = {}  # constants that runtime steps read, converted to torch once
        self._steps = [] if self.delegated else [self._make_step(n) for n in self._graph.nodes]
        self._programs: dict[tuple[str, ...], tuple[list[_Step], list[list[str]]]] = {}
        self._lock = threading.Lock()
        self._plans: dict[Any, Plan] = {}
        # key -> seconds of its first real runs; None once checked (a key checked and without a
        # plan is being planned a second time, see CHECK_RUNS)
        self._seen: dict[Any, list[float] | None] = {}
        self._onnx_source = onnx_source if (fallback and kernel is None) or self.delegated else None
        self._ort: Any = None  # onnxruntime session, opened when a plan first times it
        if self.delegated and not self._ort_ready(tuple(v.name for v in self._outputs)):
            raise SwatError("onnxruntime cannot load this quantised model, and the Session has no int8 ops yet; "
                            "check the file with onnxruntime.InferenceSession")
        # SWAT_SESSION_TUNE_THREADS=0 keeps torch at `threads` always (no one-thread candidate).
        self._tune_threads = os.environ.get("SWAT_SESSION_TUNE_THREADS", "1").strip() not in ("0", "off", "false")
        self._digest: str | None = None

    # ------------------------------------------------------------------ onnxruntime API

    def get_inputs(self) -> list[NodeArg]:
        return [NodeArg(v.name, None if v.shape is None else list(v.shape), v.type) for v in self._inputs]

    def get_outputs(self) -> list[NodeArg]:
        return [NodeArg(v.name, None if v.shape is None else list(v.shape), v.type) for v in self._outputs]

    @_project_errors
    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any]) -> list[np.ndarray]:
        """Outputs (numpy, in ``output_names`` order; None = all) for one batch of inputs."""
        names = tuple(output_names) if output_names else tuple(v.name for v in self._outputs)
        if self.delegated:
            return self._run_delegated(names, input_feed)
        self._program(names)  # an unknown output name fails here, before any timing
        env = self._feed(input_feed)
        key = self._plan_key(names, env)
        plan = self._plan(key, names, env)
        t0 = time.perf_counter()
        if plan.engine == "onnxruntime":
            out = self._ort.run(list(names), {k: v.numpy() for k, v in env.items()})
        else:
            out = self._run_kernels(names, env, plan.threads)
        self._observe(key, plan, time.perf_counter() - t0)
        return out

    def _observe(self, key: tuple, plan: Plan, seconds: float) -> None:
        """Record one real run of a planned shape; plan it again if the runs contradict the plan
        (see CHECK_RUNS)."""
        seen = self._seen.setdefault(key, [])
        if seen is None:
            return
        seen.append(seconds)
        if len(seen) < CHECK_RUNS:
            return
        self._seen[key] = None  # checked: at most one second plan per shape
        if _plan_looks_wrong(plan, seen):
            with self._lock:
                if self._plans.get(key) is plan:
                    del self._plans[key]  # the next run times the candidates again

    @staticmethod
    def _plan_key(names: tuple[str, ...], env: dict[str, torch.Tensor]) -> tuple:
        return (names,) + tuple((k, tuple(v.shape)) for k, v in sorted(env.items()))

    def _run_delegated(self, names: tuple[str, ...], input_feed: dict[str, Any]) -> list[np.ndarray]:
        """The whole graph on onnxruntime (``delegated``), recorded as that shape's plan."""
        known = [v.name for v in self._outputs]
        for name in names:
            if name not in known:
                raise SwatError(f"unknown output '{name}'; the model's outputs are {known}")
        env = self._feed(input_feed)
        key = self._plan_key(names, env)
        with self._lock:
            self._plans.setdefault(key, Plan("onnxruntime", self._ctx.threads, {}))
        return self._ort.run(list(names), {k: v.numpy() for k, v in env.items()})

    def _run_kernels(self, names: tuple[str, ...], env: dict[str, torch.Tensor], threads: int) -> list[np.ndarray]:
        steps, frees = self._program(names)
        with torch.no_grad(), _torch_threads(threads), torch_thread_cap(threads):
            return self._execute(names, steps, frees, env)

    def _plan(self, key: tuple, names: tuple[str, ...], env: dict[str, torch.Tensor]) -> Plan:
        """How runs of this output set and input shape execute; timed on the first such run.

        Candidates: our kernels with all threads, with one thread, and onnxruntime. One thread
        is a candidate because torch's OpenMP team needs every thread at each barrier; on a
        busy 2-core machine one descheduled thread stalls every op (measured: dense resnet18 at
        batch 1 went from 12 ms to 550 ms), while one thread never waits. The cap holds for
        numba kernels too (numba's OpenMP pool has the same wake-up stalls). Candidates run
        interleaved (see `_time_candidates`). One thread must win by 10 % (where it matters it wins
        by far more; a close call is noise, and all threads is right on a quiet machine);
        onnxruntime must win by 3 % (ORT_MARGIN), since our kernels hold the sparse weights and it
        the dense.
        """
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        with autotune.tuning_budget(_tune_budget_s()):
            plan = self._choose_plan(key, names, env)
        with self._lock:
            self._plans[key] = plan
            if self._ort is not None and all(p.engine != "onnxruntime" for p in self._plans.values()):
                self._ort = None  # not used by any plan: free its dense weights (reopened if needed)
        return plan

    def _choose_plan(self, key: tuple, names: tuple[str, ...], env: dict[str, torch.Tensor]) -> Plan:
        threads = self._ctx.threads
        runs: dict[str, Callable[[], Any]] = {
            f"swat/{threads}": lambda: self._run_kernels(names, dict(env), threads)}
        if threads > 1 and self._tune_threads:
            runs["swat/1"] = lambda: self._run_kernels(names, dict(env), 1)
        if self._ort_ready(names):
            feed = {k: v.numpy() for k, v in env.items()}
            runs["onnxruntime"] = lambda: self._ort.run(list(names), feed)
        if len(runs) == 1:
            return Plan("swat", threads, {})
        ms = _time_candidates(runs)
        ours = "swat/1" if "swat/1" in ms and ms["swat/1"] < 0.9 * ms[f"swat/{threads}"] else f"swat/{threads}"
        choice = "onnxruntime" if "onnxruntime" in ms and ms["onnxruntime"] < ORT_MARGIN * ms[ours] else ours
        # Sticky across processes: what an earlier process chose for this model and shape stays
        # unless it is now more than STICKY slower, so near-ties do not flip from run to run.
        cache_key = f"{self._fingerprint()}|" + ";".join(f"{k}={'x'.join(map(str, s))}" for k, s in key[1:])
        before = autotune.lookup_plan(cache_key, threads) if autotune.enabled() else None
        if key in self._seen and self._seen[key] is None:  # a second plan: real runs contradicted the first
            before = None
        if before in ms and before != choice and ms[before] <= STICKY * ms[choice]:
            choice = before
        if autotune.enabled() and choice != before:
            autotune.store_plan(cache_key, choice, ms, threads)
        if choice == "onnxruntime":
            return Plan("onnxruntime", threads, ms)
        return Plan("swat", int(choice.split("/")[1]), ms)

    def _fingerprint(self) -> str:
        """A digest of the graph (ops, attributes, weights) naming this model in the plan cache."""
        if self._digest is None:
            h = hashlib.sha256()
            for n in self._graph.nodes:
                h.update(repr((n.op_type, n.inputs, n.outputs, sorted(n.attrs.items(), key=lambda kv: kv[0])))
                         .encode())
            for name in sorted(self._graph.constants):
                arr = np.ascontiguousarray(self._graph.constants[name])
                h.update(f"{name}|{arr.dtype}|{arr.shape}".encode())
                h.update(arr.tobytes())
            self._digest = h.hexdigest()[:32]
        return self._digest

    def _ort_ready(self, names: tuple[str, ...]) -> bool:
        """Open onnxruntime on the same model if a fallback is possible for these outputs."""
        if self._onnx_source is None or not set(names) <= {v.name for v in self._outputs}:
            return False
        if self._ort is None:
            from .ort import ort_session

            try:
                self._ort = ort_session(self._onnx_source(), self._ctx.threads)
            except Exception:  # a model onnxruntime cannot load still runs here, without fallback
                self._onnx_source = None
                return False
        return True

    def plans(self) -> list[dict]:
        """Per class of runs so far: outputs, input shapes, the engine and threads chosen, and
        the ms per run of each candidate timed."""
        return [{"outputs": list(key[0]), "inputs": {k: list(shape) for k, shape in key[1:]},
                 "engine": p.engine, "threads": p.threads, "ms": dict(p.ms)}
                for key, p in self._plans.items()]

    def _execute(self, names: tuple[str, ...], steps: list, frees: list, env: dict[str, torch.Tensor]) -> list[np.ndarray]:
        for step, free in zip(steps, frees):
            args = [env[ref] if kind == "value" else ref if kind == "const" else None
                    for kind, ref in step.inputs]
            try:
                outs = step.fn(args)
            except SwatError:
                raise
            except Exception as exc:  # name the node; torch's messages are multi-line
                msg = " ".join(str(exc).split())[:300]
                raise SwatError(f"ONNX {step.node.op_type} node '{step.node.label()}' failed "
                                f"({type(exc).__name__}: {msg}); check the input shapes against "
                                "get_inputs()") from exc
            for name, value in zip(step.outputs, outs):
                if name:
                    env[name] = value
            for name in free:
                env.pop(name, None)
        result = []
        for name in names:
            value = env[name] if name in env else self._graph.constants[name]
            arr = to_numpy(value) if isinstance(value, torch.Tensor) else np.asarray(value)
            result.append(np.array(arr, copy=True))  # never hand out views of inputs / constants
        return result

    # -------------------------------------------------------------------- swat additions

    @property
    def graph(self) -> Graph:
        """The graph as executed: constants folded, Conv+BN fused, dead nodes removed."""
        return self._graph

    def layers(self) -> list[dict]:
        """Per constant-weight Conv / Gemm / MatMul: name, op, weight_shape, sparsity, kernel, bytes.

        ``kernel`` / ``bytes`` describe the op most recently built for the layer; before the
        first run the layer is built once without a shape hint so the report is never empty.
        """
        with _torch_threads(self._threads):
            return [layer.info() for layer in self._ctx.layers]

    # ------------------------------------------------------------------------- internals

    def _make_step(self, node: Node) -> _Step:
        op = REGISTRY[node.op_type] if node.op_type in REGISTRY else _qdq_ops()[node.op_type]
        fn = op.prepare(node, self._graph.constants, self._ctx) if op.prepare is not None else None
        if fn is None:
            fn = functools.partial(op.run_torch, node)
        refs: list[tuple[str, Any]] = []
        for name in node.inputs:
            if not name:
                refs.append(("none", None))
            elif name in self._graph.constants:
                if name not in self._const_t:
                    self._const_t[name] = to_torch(self._graph.constants[name])
                refs.append(("const", self._const_t[name]))
            else:
                refs.append(("value", name))
        return _Step(node, fn, refs, list(node.outputs))

    def _program(self, names: tuple[str, ...]) -> tuple[list[_Step], list[list[str]]]:
        """The steps the requested outputs need, and what each step may free afterwards."""
        with self._lock:
            if names in self._programs:
                return self._programs[names]
            known = {v.name for v in self._inputs} | set(self._graph.constants)
            known |= {o for s in self._steps for o in s.outputs if o}
            for name in names:
                if name not in known:
                    raise SwatError(f"unknown output '{name}'; the model's outputs are "
                                    f"{[v.name for v in self._outputs]}")
            needed = set(names)
            steps = []
            for step in reversed(self._steps):
                if any(o in needed for o in step.outputs if o):
                    steps.append(step)
                    needed.update(ref for kind, ref in step.inputs if kind == "value")
            steps.reverse()
            last_use: dict[str, int] = {}
            for i, step in enumerate(steps):
                for kind, ref in step.inputs:
                    if kind == "value":
                        last_use[ref] = i
            frees: list[list[str]] = [[] for _ in steps]
            for name, i in last_use.items():
                if name not in names:
                    frees[i].append(name)
            self._programs[names] = (steps, frees)
            return steps, frees

    def _feed(self, input_feed: dict[str, Any]) -> dict[str, torch.Tensor]:
        if not isinstance(input_feed, dict):
            raise SwatError(f"input_feed must be a dict name -> array, got {type(input_feed).__name__}; "
                            f"e.g. {{'{self._inputs[0].name if self._inputs else 'input'}': x}}")
        expected = {v.name: v for v in self._inputs}
        extra = [k for k in input_feed if k not in expected]
        if extra:
            raise SwatError(f"unknown input(s) {extra}; the model's inputs are {list(expected)}")
        env: dict[str, torch.Tensor] = {}
        for name, vi in expected.items():
            if name not in input_feed:
                raise SwatError(f"missing input '{name}'; pass it in input_feed (inputs: {list(expected)})")
            env[name] = _check_input(vi, input_feed[name])
        return env


def _check_input(vi: ValueInfo, value: Any) -> torch.Tensor:
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    want = vi.dtype
    if arr.dtype != want:
        raise SwatError(f"input '{vi.name}' must be {vi.type} ({want}), got {arr.dtype}; "
                        f"convert with x.astype(np.{want.name})")
    if vi.shape is not None:
        if arr.ndim != len(vi.shape):
            raise SwatError(f"input '{vi.name}' must have rank {len(vi.shape)} (shape {vi.shape}), "
                            f"got shape {list(arr.shape)}; reshape the input")
        for i, (dim, got) in enumerate(zip(vi.shape, arr.shape)):
            if isinstance(dim, int) and dim != got:
                raise SwatError(f"input '{vi.name}' dim {i} must be {dim} (shape {vi.shape}), "
                                f"got shape {list(arr.shape)}; resize the input")
    return to_torch(arr)


def _tune_budget_s() -> float | None:
    """Seconds the first run of a new input shape may spend tuning layers (SWAT_TUNE_BUDGET_S,
    default 8; 0 or less: no limit). Layers past it run on the rule's kernel until a later run."""
    raw = os.environ.get("SWAT_TUNE_BUDGET_S", "8")
    try:
        v = float(raw)
    except ValueError:
        raise SwatError(f"SWAT_TUNE_BUDGET_S={raw!r} is not a number of seconds; unset it or give e.g. 8") from None
    return v if v > 0 else None


def _time_candidates(runs: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """name -> ms per run over a short interleaved timing (up to about a second).

    The lower quartile, not the median, where a second gives many rounds: the choice sticks for
    the session, and a burst of other load during these few rounds (measured: one run in 15
    picked one thread on an idle machine and ran 1.6x slower for its whole life) must not decide
    it. The median where runs are long (batch 64: a second holds 3 rounds): there the lower
    quartile is the second-best call, and our kernels' calls spread more than onnxruntime's
    (int8 ResNet-18 at 70 %, batch 64: 83-134 ms a call, median 110, against onnxruntime's
    steady 101), so the lower quartile picked our kernels in 3 processes of 4 and ran 10 %
    slower than onnxruntime for the session's life.
    """
    from .timing import lower_quartile, time_interleaved

    def stat(values: list[float]) -> float:  # 16 values = 8 rounds of 2 timed calls per turn
        return lower_quartile(values) if len(values) >= 16 else statistics.median(values)

    timed = time_interleaved(runs, repeats=15, budget_s=1.0, stat=stat)
    return {k: sec * 1e3 for k, (sec, _) in timed.items()}


# ------------------------------------------------------------------ QDQ fusion (int8 kernels)
# A quantised (QDQ) graph whose convs fit swat's sparse int8 kernels runs here instead of being
# handed whole to onnxruntime: swat_deploy/kernels/int8_qdq.py fuses DQ -> Conv -> Q into one
# uint8 -> uint8 step and runs the other Q / DQ as torch ops; the planner then times it against
# onnxruntime on the same file, as for float32. SWAT_INT8=0 keeps the old delegation.

def _qdq_graph(source: Graph, kernel: str | None) -> Graph | None:
    """The fused QDQ graph, or None (not fusable, int8 kernels missing, a forced float kernel)."""
    if kernel is not None or os.environ.get("SWAT_INT8", "1").strip().lower() in ("0", "off", "false"):
        return None
    from .kernels.int8_qdq import build_graph

    try:
        built = build_graph(source, REGISTRY)
    except SwatError:
        return None
    return None if built is None else built[0]


def _qdq_ops() -> dict:
    from .kernels.int8_qdq import OPS

    return OPS
