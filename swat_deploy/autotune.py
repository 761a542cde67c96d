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

import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

import swat_native as native
from .threads import thread_scope

if TYPE_CHECKING:  # types only: the kernel package imports this module, not the other way
    from .kernels.base import Kernel, LayerSpec, Prepared

CACHE_VERSION = 6  # bump when kernels change speed: old timings no longer hold
# A sparse kernel must be at least this much faster than dense to be chosen: timing noise
# must not trade a sure dense result for a sparse one that is slower on average.
DENSE_MARGIN = 0.97
# A kernel on another thread pool than the rule's pick (see `rule_choice`, `pick`) must be at least
# this much faster than the best kernel on the rule's pool. Why: a layer timed alone cannot see
# what it costs the graph around it. The rule picks the one-call C kernels, which share one
# thread pool; a numba kernel (im2col) between them makes the pools contend (each spins while the
# other runs). Measured on ResNet-18 (CIFAR, 90 %, batch 1, AMD EPYC, one process, interleaved):
# per-layer timed picks 4.0-5.1 ms a run, the rule's 3.5-4.4 ms, though each timed pick had won
# its own layer by a few per cent; ResNet-50 at 224 (80 %, blocks of 4, 2 threads) mixed
# im2col into 15 of 53 layers until the margin was taken against every kernel on the C pool.
RULE_MARGIN = 0.90
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
    from .cpu import cpu_info

    return str(cpu_info()["model"])


def machine_key(threads: int | None) -> str:
    """Cache partition: the same layer may pick differently on another CPU, thread count or kernel
    build (see swat_native.build_id)."""
    n = threads if threads is not None else torch.get_num_threads()
    return (f"{_cpu_model()}|cpu={native.cpu_signature()}|isa={native.isa()}|cores={os.cpu_count()}|threads={n}"
            f"|torch={torch.__version__}|kernels={native.build_id()}")


def layer_key(spec: LayerSpec) -> str:
    """Cache key of a layer: kind, shapes, conv geometry, sparsity to 2 decimals, input shape."""
    parts = [spec.kind, "w=" + "x".join(map(str, spec.weight_shape)), f"s={spec.sparsity:.2f}",
             "in=" + ("x".join(map(str, spec.input_shape)) if spec.input_shape else "?")]
    if spec.block > 1:
        parts.append(f"b={spec.block}")
    if spec.kind == "conv2d":
        parts += ["st=" + ",".join(map(str, spec.stride)), "p=" + ",".join(map(str, spec.padding)),
                  "d=" + ",".join(map(str, spec.dilation)), f"g={spec.groups}"]
    return "|".join(parts)


def rule_choice(spec: LayerSpec, candidates: list[Kernel]) -> Kernel:
    """Deterministic choice without timing: the most specialised kernel whose threshold is met.

    Each kernel declares ``rule_min_sparsity`` (None = never chosen by rule); dense has 0.
    Block weights (B >= 4) reuse each input load B times, so their threshold is 0.2 lower.
    """
    best: Kernel | None = None
    relief = 0.2 if spec.block >= 4 else 0.0
    for k in candidates:
        thr = getattr(k, "rule_min_sparsity", None)
        if thr is None or spec.sparsity < (max(0.0, thr - relief) if thr > 0 else 0.0):
            continue
        if best is None or thr > getattr(best, "rule_min_sparsity"):
            best = k
    if best is None:
        raise ValueError(f"no kernel supports this {spec.kind} layer with weight {spec.weight_shape}")
    return best


# ----------------------------------------------------------------------------- cache file
# The cache is untrusted input: any process (or person) may have written it. A bad entry (wrong
# type, unknown layout, bytes that are not UTF-8) is dropped with one warning per file and
# process, and the cleaned cache is written back; a bad file never breaks a run. Writers merge
# under an exclusive lock on a sibling ``.lock`` file (fcntl), so concurrent processes keep
# every entry.
_warned: set[str] = set()


def _empty() -> dict[str, Any]:
    return {"version": CACHE_VERSION, "machines": {}}


def _valid_entry(entry: Any) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("kernel"), str) or not entry["kernel"]:
        return False
    if not isinstance(entry.get("serial", False), bool):
        return False
    cands = entry.get("candidates", [])
    if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands):
        return False
    times = entry.get("times_us", {})
    return isinstance(times, dict) and all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in times.items())


def _clean(data: Any) -> tuple[dict[str, Any], int]:
    """(the valid part of a parsed cache, how many pieces were dropped)."""
    if not isinstance(data, dict) or not isinstance(data.get("machines"), dict):
        return _empty(), 1
    if data.get("version") != CACHE_VERSION:
        return _empty(), 0  # timings of other kernels (or a future layout): retime, replace quietly
    clean, bad = _empty(), 0
    for machine, layers in data["machines"].items():
        if not isinstance(machine, str) or not isinstance(layers, dict):
            bad += 1
            continue
        kept = {k: v for k, v in layers.items() if isinstance(k, str) and _valid_entry(v)}
        bad += len(layers) - len(kept)
        if kept:
            clean["machines"][machine] = kept
    return clean, bad


def _parse(path: Path) -> tuple[dict[str, Any], int, str]:
    """(clean cache, pieces dropped, why the whole file was unusable or '')."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return _empty(), 0, ""
    except OSError as e:
        return _empty(), 0, f"unreadable ({e.strerror or e})"
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return _empty(), 1, f"not JSON text ({type(e).__name__})"
    clean, bad = _clean(data)
    return clean, bad, ""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock for a read-merge-write of ``path`` (no-op where fcntl or the dir is unavailable)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: last writer wins, as before
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError:
        yield  # the write that follows fails too, and says so
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write(path: Path, data: dict[str, Any]) -> None:
    """Atomically replace ``path`` (temp file in the same dir + os.replace), mode from the umask."""
    from training.fileio import new_file_mode

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".autotune.", suffix=".json", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode(path))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _warn_once(path: Path, message: str) -> None:
    key = str(path)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def load_cache(path: Path | None = None) -> dict[str, Any]:
    """The cache as a dict; a missing file is empty; bad entries are dropped, warned about once
    and the file rewritten without them."""
    path = path or cache_path()
    data, bad, why = _parse(path)
    if why.startswith("unreadable"):
        _warn_once(path, f"cannot read autotune cache {path} ({why}); timing kernels afresh")
        return data
    if not bad:
        return data
    what = why or f"{bad} bad entr{'y' if bad == 1 else 'ies'}"
    try:
        with _locked(path):
            data, still_bad, _ = _parse(path)  # another process may have repaired or extended it meanwhile
            if still_bad:
                _write(path, data)
        _warn_once(path, f"autotune cache {path} held {what}; ignored {'it' if why else 'them'} and rewrote "
                         f"the file")
    except OSError as e:
        _warn_once(path, f"autotune cache {path} held {what} (ignored); it cannot be rewritten "
                         f"({e.strerror or e}) - delete it or set SWAT_AUTOTUNE_CACHE to another file")
    return data


def _store(machine: str, key: str, entry: dict[str, Any], path: Path | None = None) -> None:
    """Merge one entry into the cache file: locked read + merge + atomic replace."""
    path = path or cache_path()
    try:
        with _locked(path):
            data, _, _ = _parse(path)
            data["machines"].setdefault(machine, {})[key] = entry
            _write(path, data)
    except OSError as e:
        _warn_once(path, f"cannot write autotune cache {path} ({e.strerror or e}); choices will be re-timed "
                         f"next time")


def lookup(spec: LayerSpec, threads: int | None, path: Path | None = None) -> dict[str, Any] | None:
    """The cached entry for this layer on this machine, or None."""
    entry = load_cache(path)["machines"].get(machine_key(threads), {}).get(layer_key(spec))
    return entry if _valid_entry(entry) else None


# ----------------------------------------------------------------------------- whole-graph plans
def lookup_plan(key: str, threads: int | None, path: Path | None = None) -> str | None:
    """The engine a Session chose for this model and input shape on this machine before, or None."""
    entry = load_cache(path)["machines"].get(machine_key(threads), {}).get("plan|" + key)
    return entry["kernel"] if _valid_entry(entry) else None


def store_plan(key: str, choice: str, ms: dict[str, float], threads: int | None, path: Path | None = None) -> None:
    """Remember a Session's whole-graph choice (kept in the same cache file as layer choices)."""
    _store(machine_key(threads), "plan|" + key,
           {"kernel": choice, "serial": False, "times_us": {n: round(v * 1e3, 2) for n, v in ms.items()}}, path)


# ----------------------------------------------------------------------------- tuning budget
_deadline = threading.local()


@contextlib.contextmanager
def tuning_budget(seconds: float | None) -> Iterator[None]:
    """Within the block, layer tuning stops after `seconds` (this thread): layers met later are
    chosen by `rule_choice` and not cached, so a later run still times them.

    Why: the first run of a new shape tunes every layer; on a 53-conv ResNet-50 at 224x224
    that must stay within seconds, not minutes. None means no limit."""
    old = getattr(_deadline, "at", None)
    _deadline.at = None if seconds is None else time.perf_counter() + float(seconds)
    if old is not None and _deadline.at is not None:
        _deadline.at = min(old, _deadline.at)
    try:
        yield
    finally:
        _deadline.at = old


def _out_of_time() -> bool:
    at = getattr(_deadline, "at", None)
    return at is not None and time.perf_counter() > at


def worth_timing(k: Kernel, spec: LayerSpec) -> bool:
    """Candidates that can win this layer; the rest are not prepared or timed (tuning cost).

    Dense always; sparse kernels from 30 % zeros (below that dense wins on every machine
    measured); torch's CSR for Linear only (for convs its im2col costs more than a dense conv)."""
    if k.name == "dense":
        return True
    if spec.sparsity < 0.3:
        return False
    if k.name == "torch_csr":
        return spec.kind == "linear"
    return True


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
    from .timing import time_interleaved

    def rounds_for(per_round: float) -> int:
        least = _MIN_ROUNDS if per_round * _MIN_ROUNDS <= 4 * budget_s else 2
        return int(min(_MAX_ROUNDS, max(least, budget_s // max(per_round, 1e-7))))

    def hopeless(best: dict[str, float]) -> set[str]:
        floor = min(best.values())
        return {n for n, b in best.items() if b > 2.5 * floor and n.split("@")[0] != "dense"}

    with thread_scope(threads), torch.inference_mode():
        timed = time_interleaved({name: (lambda fn=fn: fn(x)) for name, fn in runners.items()}, _MAX_ROUNDS,
                                 budget_s, per_turn=1, rounds_for=rounds_for, drop_after_first=hopeless)
    return {n: median for n, (median, _) in timed.items()}


def _example_input(spec: LayerSpec) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(tuple(spec.input_shape or ()), generator=g, dtype=torch.float32)


def thread_pool(kernel: Kernel) -> str:
    """Which thread pool a kernel's parallel loops run on ("native": the extension's own pool,
    "numba", "torch"). Kernels that do not say are counted as torch's (dense, torch ops)."""
    return str(getattr(kernel, "thread_pool", "torch"))


def pick(times: dict[str, float], pools: dict[str, str], ref_name: str, rule_name: str | None) -> str:
    """The kernel to use given each one's time on the layer alone.

    The fastest, except: it must beat dense (`ref_name`) by DENSE_MARGIN, and a kernel on another
    thread pool than the rule's pick must beat the best kernel on the rule's pool by RULE_MARGIN.
    Kernels sharing the rule's pool compete on time alone (e.g. the two one-call C kernels), since
    switching between them costs the graph nothing."""
    def fastest(names: list[str]) -> str:
        return min(names, key=times.__getitem__)

    best = fastest(list(times))
    if rule_name in times and pools[best] != pools[rule_name]:
        home = fastest([n for n in times if pools[n] == pools[rule_name]])
        if times[best] > RULE_MARGIN * times[home]:
            best = home
    if ref_name in times and best != ref_name and times[best] > DENSE_MARGIN * times[ref_name]:
        best = ref_name
    return best


def choose(spec: LayerSpec, candidates: list[Kernel], weight: torch.Tensor, bias: torch.Tensor | None,
           threads: int | None) -> tuple[str, Prepared, int | None]:
    """(kernel name, prepared kernel, threads to run it with): cached pick, timed pick, or rule.

    Layers are timed on the caller's thread count only. Earlier each kernel was also timed on one
    thread and a layer could run serially between layers on the pool; in a graph that mix lost
    (ResNet-18 CIFAR 90 %, batch 1, AMD EPYC, one process, interleaved: 3.8-4.4 ms a run with
    per-layer one-thread picks, 3.5-3.9 ms without, 3.4-3.7 ms by rule). A whole graph on one
    thread is still a candidate of the Session's plan, where it can win as a whole.
    """
    if not candidates:
        raise ValueError(f"no kernel supports this {spec.kind} layer with weight {spec.weight_shape}")
    by_name = {k.name: k for k in candidates}
    if spec.input_shape is None or not enabled() or len(candidates) == 1 or _out_of_time():
        k = rule_choice(spec, candidates)
        with thread_scope(threads):
            return k.name, k.prepare(weight, bias, spec), threads
    cached = lookup(spec, threads)
    timed = [k for k in candidates if worth_timing(k, spec)]
    # A pick made before a kernel was added never met it: time again (once) when the cached
    # entry lacks one of today's candidates.
    if (cached is not None and cached["kernel"] in by_name
            and {k.name for k in timed} <= set(cached.get("candidates", cached.get("times_us", {}))) | {cached["kernel"]}):
        k = by_name[cached["kernel"]]  # "serial" is always false since layers are timed on the caller's threads
        with thread_scope(threads):
            return k.name, k.prepare(weight, bias, spec), threads

    if len(timed) == 1:
        with thread_scope(threads):
            return timed[0].name, timed[0].prepare(weight, bias, spec), threads
    with thread_scope(threads):
        prepared = {k.name: k.prepare(weight, bias, spec) for k in timed}
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
    times = time_prepared(dict(prepared), x, _budget_s(), threads)
    try:
        rule_name: str | None = rule_choice(spec, [by_name[n] for n in prepared]).name
    except ValueError:  # no timed kernel meets a rule threshold
        rule_name = None
    best = pick(times, {n: thread_pool(by_name[n]) for n in times}, ref_name, rule_name)
    _store(machine_key(threads), layer_key(spec),
           {"kernel": best, "serial": False, "times_us": {n: round(t * 1e6, 2) for n, t in times.items()},
            "candidates": sorted(k.name for k in timed)})  # times_us omits those dropped early
    return best, prepared[best], threads
