"""Run a study: every (configuration, seed) not yet in ``runs.jsonl``, ``jobs`` at a time.

Each run is a worker process (:mod:`training.study.worker`) with one torch thread; this process
only schedules, appends one line per finished run to ``runs.jsonl`` and prints one progress line.
Killing the study (any signal) loses only the runs in flight: a restart skips every run already
in ``runs.jsonl`` and redoes the others from scratch.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from training.errors import SwatError, option
from training.fileio import atomic_write_json
from training.study import store
from training.study.configurations import Config, Preset, runs_of

__all__ = ["train_options", "command", "run_study"]


def train_options(p: Preset, c: Config, seed: int, data_dir: Optional[str] = None) -> dict[str, Any]:
    """The TrainConfig fields of one run."""
    opts = {"model": p.model, "dataset": p.dataset, "data_dir": data_dir, "epochs": p.epochs,
            "batch_size": p.batch_size, "lr": p.lr, "schedule": p.schedule, "seed": seed,
            "limit": p.train_limit, "exclude": tuple(p.exclude), "device": "cpu", **c.train_options()}
    if c.mode == "dense" and not c.forward_only:
        opts["sparsity"] = 0.0
    return opts


def command(p: Preset, c: Config, seed: int, run_dir: str, data_dir: Optional[str] = None) -> str:
    """The ``swat train`` command that trains this run (same weights, same final accuracy)."""
    o = train_options(p, c, seed, data_dir)
    args = ["swat", "train", "--model", o["model"], "--dataset", o["dataset"], "--mode", o["mode"],
            "--sparsity", f"{o['sparsity']:g}", "--epochs", str(o["epochs"]), "--seed", str(seed),
            "--batch-size", str(o["batch_size"]), "--lr", f"{o['lr']:g}", "--schedule", o["schedule"]]
    if o["limit"]:
        args += ["--limit", str(o["limit"])]
    if o["topk"] != "nchw":
        args += ["--topk", o["topk"]]
    if o["refresh_every"] != 1:
        args += ["--refresh-every", str(o["refresh_every"])]
    if o["cache_weight_threshold"]:
        args += ["--refresh-weights"]
    if o["budget"] != "uniform":
        args += ["--budget", o["budget"]]
    if o["forward_only"]:
        args += ["--forward-only", o["forward_only"]]
    if o.get("block", 1) != 1:
        args += ["--block", str(o["block"])]
    if o["exclude"]:
        args += ["--exclude", ",".join(o["exclude"])]
    if data_dir:
        args += ["--data-dir", data_dir]
    args += ["--device", "cpu", "--out", run_dir]
    return "OMP_NUM_THREADS=1 " + " ".join(shlex.quote(a) for a in args)


def worker_argv(spec_path: Path) -> list[str]:
    """The process that trains one run (a function so tests can substitute a fake one)."""
    return [sys.executable, "-m", "training.study.worker", str(spec_path)]


def _spec(p: Preset, c: Config, seed: int, runs_dir: Path, data_dir: Optional[str]) -> dict[str, Any]:
    run_dir = runs_dir / f"{c.key}-seed{seed}"
    o = train_options(p, c, seed, data_dir)
    o["exclude"] = list(o["exclude"])
    return {"key": c.key, "run_dir": str(run_dir), "train": o, "threads": 1, "follow_parent": True,
            "config": {k: v for k, v in c.__dict__.items()},
            "preset": {"name": p.name, **setup_of(p)},
            "command": command(p, c, seed, str(run_dir), data_dir)}


def setup_of(p: Preset) -> dict[str, Any]:
    """What every run of a study shares; runs with another setup must not be mixed in."""
    return {"model": p.model, "dataset": p.dataset, "train_limit": p.train_limit, "epochs": p.epochs,
            "batch_size": p.batch_size, "lr": p.lr, "schedule": p.schedule, "exclude": list(p.exclude)}


def _check_same_setup(p: Preset, out: Path) -> None:
    """Refuse to append runs of another setup to a ``runs.jsonl`` (their verdicts would mix)."""
    meta = out / "study.json"
    want = setup_of(p)
    if meta.is_file():
        have = json.loads(meta.read_text()).get("setup")
        if have != want:
            raise SwatError(f"{out} holds runs of another setup ({have}); this preset is {want}. Use another "
                            f"{option('out')}, or move {out / store.RUNS} away to start over")
    else:
        atomic_write_json(meta, {"preset": p.name, "setup": want})


def _fmt(rec: dict[str, Any]) -> str:
    acc = "diverged" if rec.get("test_accuracy") is None else f"{100 * rec['test_accuracy']:.2f}%"
    step = rec.get("step_cpu_seconds_median")
    return f"{rec['key']} seed {rec['seed']}: test {acc}, {rec['wall_seconds']:.0f}s" + (
        f", step {1000 * step:.0f} ms cpu" if step else "")


def run_study(p: Preset, out: str | Path, runs_dir: str | Path, *, jobs: int = 2, data_dir: Optional[str] = None,
              only: Optional[list[str]] = None, max_minutes: Optional[float] = None,
              log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run (or continue) the study; returns every finished run by id (``store.run_id``)."""
    if not isinstance(jobs, int) or jobs < 1:
        raise SwatError(f"{option('jobs')} {jobs!r}: use an integer >= 1 (2 on a 2-core machine)")
    out, runs_dir = Path(out), Path(runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    _check_same_setup(p, out)
    plan = runs_of(p, only)
    done = store.load(out)
    todo = [(c, s) for c, s in plan if store.run_id(c.key, s) not in done]
    total_planned = len(runs_of(p))
    log(f"study {p.name}: {len(plan)} runs planned, {len(plan) - len(todo)} already in {out / store.RUNS}, "
        f"{len(todo)} to run, {jobs} at a time")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    running: dict[str, tuple[subprocess.Popen, dict[str, Any]]] = {}
    t_start = time.monotonic()
    stop = {"sig": None}

    def on_signal(signum: int, frame: Any) -> None:
        stop["sig"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    finished = 0
    failed: list[str] = []
    try:
        queue = list(todo)
        while (queue or running) and stop["sig"] is None:
            while queue and len(running) < jobs and stop["sig"] is None:
                if max_minutes is not None and (time.monotonic() - t_start) / 60 > max_minutes:
                    log(f"time box of {max_minutes} min reached; {len(queue)} runs left for the next start")
                    queue.clear()
                    break
                c, seed = queue.pop(0)
                spec = _spec(p, c, seed, runs_dir, data_dir)
                Path(spec["run_dir"]).parent.mkdir(parents=True, exist_ok=True)
                spec_path = runs_dir / f"{c.key}-seed{seed}.spec.json"
                atomic_write_json(spec_path, spec)
                with open(runs_dir / f"{c.key}-seed{seed}.err", "w") as err:
                    proc = subprocess.Popen(worker_argv(spec_path), env=env, stdout=subprocess.DEVNULL, stderr=err)
                running[store.run_id(c.key, seed)] = (proc, spec)
            time.sleep(1.0)
            for rid, (proc, spec) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[rid]
                res = Path(spec["run_dir"]) / "study_result.json"
                if rc != 0 or not res.is_file():
                    if stop["sig"] is not None:
                        continue  # terminated by our own shutdown
                    err_file = runs_dir / f"{spec['key']}-seed{spec['train']['seed']}.err"
                    tail = err_file.read_text().strip().splitlines()[-1:] if err_file.is_file() else []
                    failed.append(rid)
                    log(f"FAILED {rid} (exit {rc}): {tail[0] if tail else 'no output'}; full log {err_file}; "
                        f"the other runs continue, the next start retries it")
                    continue
                rec = json.loads(res.read_text())
                store.append(out, rec)
                done[rid] = rec
                finished += 1
                log(f"[{len(done)}/{total_planned}] {_fmt(rec)}")
    finally:
        for proc, _ in running.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for s, h in old.items():
            signal.signal(s, h)
    if failed:
        log(f"{len(failed)} runs failed: {', '.join(failed)}; fix the cause and start the study again "
            f"(finished runs are kept)")
    if stop["sig"] is not None:
        log(f"stopped by signal {stop['sig']}: {finished} runs finished in this start; start again to continue")
    return done
