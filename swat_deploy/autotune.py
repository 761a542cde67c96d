"""Pick the fastest kernel for one layer on this machine, and remember the pick.

Which kernel wins depends on sparsity, shape, batch, thread count and the CPU (the
break-even sparsity of a sparse kernel moves by 10 points between a 4x4 and a 32x32 feature
map), so a fixed rule leaves speed on the table and can be slower than dense. Instead, at op
creation with a known input shape, every applicable kernel is timed on that shape
(interleaved rounds, median, a small budget per layer) and the fastest kept; dense wins ties.
Results are cached in a JSON file per machine (CPU model + thread count) so a model loads fast
the second time.

Environment:
  SWAT_AUTOTUNE=0           no timing: choose by the sparsity rule (deterministic; for tests).
  SWAT_AUTOTUNE_CACHE=PATH  cache file (default ~/.cache/swat/autotune.json).
  SWAT_AUTOTUNE_BUDGET_MS   timing budget per layer (default 50).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .kernels.base import Kernel, LayerSpec, Prepared, thread_scope

CACHE_VERSION = 2  # bump when kernels change speed: old timings no longer hold
# A sparse kernel must be at least this much faster than dense to be chosen: timing noise
# must not trade a sure dense result for a sparse one that is slower on average.
DENSE_MARGIN = 0.97
_MIN_ROUNDS, _MAX_ROUNDS = 3, 15


def enabled() -> bool:
    """False when SWAT_AUTOTUNE=0 (or off/false/no): kernels are then chosen by `rule_choice`."""
    return os.environ.get("SWAT_AUTOTUNE", "1").strip().lower() not in ("0", "off", "false", "no")


def cache_path() -> Path:
    env = os.environ.get("SWAT_AUTOTUNE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "swat" / "autotune.json"


def _budget_s() -> float:
    try:
        return max(1.0, float(os.environ.get("SWAT_AUTOTUNE_BUDGET_MS", "50"))) / 1000.0
    except ValueError:
        warnings.warn("SWAT_AUTOTUNE_BUDGET_MS is not a number; using 50 ms", stacklevel=2)
        return 0.05


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(threads: int | None) -> str:
    """Cache partition: the same layer may pick differently on another CPU or thread count."""
    n = threads if threads is not None else torch.get_num_threads()
    return f"{_cpu_model()}|cores={os.cpu_count()}|threads={n}|torch={torch.__version__}"


def layer_key(spec: LayerSpec) -> str:
    """Cache key of a layer: kind, shapes, conv geometry, sparsity to 2 decimals, input shape."""
    parts = [spec.kind, "w=" + "x".join(map(str, spec.weight_shape)), f"s={spec.sparsity:.2f}",
             "in=" + ("x".join(map(str, spec.input_shape)) if spec.input_shape else "?")]
    if spec.kind == "conv2d":
        parts += ["st=" + ",".join(map(str, spec.stride)), "p=" + ",".join(map(str, spec.padding)),
                  "d=" + ",".join(map(str, spec.dilation)), f"g={spec.groups}"]
    return "|".join(parts)


def rule_choice(spec: LayerSpec, candidates: list[Kernel]) -> Kernel:
    """Deterministic choice without timing: the most specialised kernel whose threshold is met.

    Each kernel declares ``rule_min_sparsity`` (None = never chosen by rule); dense has 0.
    """
    best: Kernel | None = None
    for k in candidates:
        thr = getattr(k, "rule_min_sparsity", None)
        if thr is None or spec.sparsity < thr:
            continue
        if best is None or thr > getattr(best, "rule_min_sparsity"):
            best = k
    if best is None:
        raise ValueError(f"no kernel supports this {spec.kind} layer with weight {spec.weight_shape}")
    return best


# ----------------------------------------------------------------------------- cache file
def load_cache(path: Path | None = None) -> dict[str, Any]:
    """The cache as a dict; a missing file is empty, a corrupt one is ignored with a warning."""
    path = path or cache_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {"version": CACHE_VERSION, "machines": {}}
    except OSError as e:
        warnings.warn(f"cannot read autotune cache {path} ({e}); timing kernels afresh", stacklevel=2)
        return {"version": CACHE_VERSION, "machines": {}}
    try:
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("version"), int) and data["version"] != CACHE_VERSION:
            return {"version": CACHE_VERSION, "machines": {}}  # timings of other kernels: retime, replace
        if not isinstance(data, dict) or not isinstance(data.get("machines"), dict):
            raise ValueError("unexpected layout")
    except ValueError as e:
        warnings.warn(f"ignoring corrupt autotune cache {path} ({e}); delete it or set "
                      "SWAT_AUTOTUNE_CACHE to another file", stacklevel=2)
        return {"version": CACHE_VERSION, "machines": {}}
    return data


def _store(machine: str, key: str, entry: dict[str, Any], path: Path | None = None) -> None:
    """Merge one entry into the cache file, atomically (temp file in the same dir + os.replace)."""
    path = path or cache_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # already warned on the read that preceded timing
        data = load_cache(path)
    data["machines"].setdefault(machine, {})[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".autotune.", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(f"cannot write autotune cache {path} ({e}); choices will be re-timed next time",
                      stacklevel=2)


def lookup(spec: LayerSpec, threads: int | None, path: Path | None = None) -> dict[str, Any] | None:
    """The cached entry for this layer on this machine, or None."""
    entry = load_cache(path)["machines"].get(machine_key(threads), {}).get(layer_key(spec))
    return entry if isinstance(entry, dict) and isinstance(entry.get("kernel"), str) else None


# ----------------------------------------------------------------------------- timing
def time_prepared(runners: dict[str, Prepared], x: torch.Tensor, budget_s: float,
                  threads: int | None) -> dict[str, float]:
    """Median seconds per call of the runners still in the race on `x` (interleaved rounds).

    Interleaving spreads frequency and cache drift over all candidates alike. One warm-up
    call each sizes the rounds to `budget_s` (at least 3 when calls are fast, at least 2
    when even one round overruns the budget). After the first timed round, a candidate
    whose best call so far is more than 2.5x the best of all is timed no further: it cannot
    win, and at batch 64 one call can take 30 ms.
    """
    first: dict[str, float] = {}
    with thread_scope(threads), torch.inference_mode():
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn(x)
            first[name] = time.perf_counter() - t0
        per_round = sum(first.values())
        rounds = int(min(_MAX_ROUNDS, max(_MIN_ROUNDS if per_round * _MIN_ROUNDS <= 4 * budget_s else 2,
                                          budget_s // max(per_round, 1e-7))))
        live = list(runners)
        times: dict[str, list[float]] = {n: [] for n in live}
        for r in range(rounds):
            order = live if r % 2 == 0 else live[::-1]
            for name in order:
                fn = runners[name]
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
            if r == 0:
                best = {n: min(first[n], times[n][0]) for n in live}
                floor = min(best.values())
                live = [n for n in live if best[n] <= 2.5 * floor or n.split("@")[0] == "dense"]
                times = {n: times[n] for n in live}
    return {n: statistics.median(v) for n, v in times.items()}


def _example_input(spec: LayerSpec) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(tuple(spec.input_shape or ()), generator=g, dtype=torch.float32)


class _Serial:
    """A prepared kernel run with one thread: the same object, timed as its own candidate."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.nbytes = prepared.nbytes

    uses_torch_threads = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with thread_scope(1, torch_threads=False):
            return self.prepared(x)


SERIAL_SUFFIX = "@1"


def choose(spec: LayerSpec, candidates: list[Kernel], weight: torch.Tensor, bias: torch.Tensor | None,
           threads: int | None) -> tuple[str, Prepared, int | None]:
    """(kernel name, prepared kernel, threads to run it with): cached pick, timed pick, or rule.

    With more than one thread each numba kernel is also timed on one thread ("name@1"): a layer whose
    work is a few hundred microseconds often loses more to the thread pool's wake-up and
    barrier than it gains, and on a loaded machine a barrier can wait for a descheduled thread
    for a whole timeslice. Timing both lets the data decide per layer.
    """
    if not candidates:
        raise ValueError(f"no kernel supports this {spec.kind} layer with weight {spec.weight_shape}")
    by_name = {k.name: k for k in candidates}
    n_threads = threads if threads is not None else torch.get_num_threads()
    if spec.input_shape is None or not enabled() or len(candidates) == 1:
        k = rule_choice(spec, candidates)
        with thread_scope(threads):
            return k.name, k.prepare(weight, bias, spec), threads
    cached = lookup(spec, threads)
    if cached is not None and cached["kernel"] in by_name:
        k = by_name[cached["kernel"]]
        run_threads = 1 if cached.get("serial") else threads
        with thread_scope(threads):
            return k.name, k.prepare(weight, bias, spec), run_threads

    with thread_scope(threads):
        prepared = {k.name: k.prepare(weight, bias, spec) for k in candidates}
    x = _example_input(spec)
    ref_name = "dense" if "dense" in prepared else next(iter(prepared))
    with torch.inference_mode(), thread_scope(threads):
        ref = prepared[ref_name](x)
        for name in list(prepared):
            if name == ref_name:
                continue
            y = prepared[name](x)
            # A kernel that disagrees with dense on this layer is a bug; never let speed pick it.
            if y.shape != ref.shape or not torch.allclose(y, ref, rtol=1e-3, atol=1e-3 * (1 + float(ref.abs().max()))):
                warnings.warn(f"kernel {name!r} disagrees with {ref_name!r} on {layer_key(spec)}; not using it",
                              stacklevel=3)
                del prepared[name]
    runners: dict[str, Prepared] = dict(prepared)
    if n_threads > 1:
        # numba kernels only: a one-thread torch kernel would have to resize torch's team.
        runners.update({name + SERIAL_SUFFIX: _Serial(p) for name, p in prepared.items()
                        if not getattr(p, "uses_torch_threads", True)})
    times = time_prepared(runners, x, _budget_s(), threads)
    best = min(times, key=times.__getitem__)
    dense_best = min((n for n in times if n.split(SERIAL_SUFFIX)[0] == ref_name), key=times.__getitem__,
                     default=None)
    if dense_best is not None and best.split(SERIAL_SUFFIX)[0] != ref_name \
            and times[best] > DENSE_MARGIN * times[dense_best]:
        best = dense_best
    serial = best.endswith(SERIAL_SUFFIX)
    name = best[: -len(SERIAL_SUFFIX)] if serial else best
    _store(machine_key(threads), layer_key(spec),
           {"kernel": name, "serial": serial, "times_us": {n: round(t * 1e6, 2) for n, t in times.items()}})
    return name, prepared[name], 1 if serial else threads
