"""The int8 baseline of issue 19: onnxruntime float32 vs onnxruntime int8 (QDQ) on one model, and file sizes.

    python scripts/bench_int8.py RUN                      # a run dir (resnet18 CIFAR stem in the issue)
    python scripts/bench_int8.py RUN --processes 3 --batch-size 1,64 --threads 2

Writes RUN/model.onnx, RUN/model.int8.onnx (compact) and, for the size table and the speed check
of compact int8 storage, RUN/bench-int8/{dense.onnx,dense.int8.onnx} (plain weights) unless they
exist. Then, in ``--processes`` fresh processes, times onnxruntime on the float32 file, the compact
int8 file and the plain int8 file, interleaved (`swat_deploy.timing.time_interleaved`, median),
and prints per batch size the median over processes with its range, plus the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, sys
import numpy as np
from swat_deploy.ort import ort_session
from swat_deploy.timing import time_interleaved
files, batches, threads, repeats = json.loads(sys.argv[1])
sess = {k: ort_session(v, threads) for k, v in files.items()}
out = {}
for b in batches:
    x = np.random.default_rng(0).random((b, *sess["float32"].get_inputs()[0].shape[1:]), dtype=np.float32)
    t = time_interleaved({k: (lambda s=s: s.run(None, {"input": x})) for k, s in sess.items()}, repeats, budget_s=30)
    out[b] = {k: v[0] * 1e3 for k, v in t.items()}
print(json.dumps(out))
"""


def _swat(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"swat {' '.join(args)} failed: {r.stderr.strip()}")


def main() -> None:
    from swat_deploy.cpu import describe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--batch-size", default="1,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    run, extra = args.run, args.run / "bench-int8"
    files = {"float32": run / "model.onnx", "int8": run / "model.int8.onnx",
             "int8-plain": extra / "dense.int8.onnx", "float32-plain": extra / "dense.onnx"}
    how = {"float32": [], "int8": ["--int8"], "int8-plain": ["--int8", "--weights", "dense"],
           "float32-plain": ["--weights", "dense"]}
    for k, path in files.items():
        if not path.is_file():
            _swat("export", str(run), *how[k], "--out", str(path), "--force")
    print(f"CPU: {describe()}; {args.threads} threads; {args.processes} processes x median of "
          f"{args.repeats} rounds")
    print("file sizes: " + ", ".join(f"{k} {path.stat().st_size / 2**20:.2f} MiB" for k, path in files.items()))
    timed = {k: str(v) for k, v in files.items() if k != "float32-plain"}
    batches = [int(b) for b in args.batch_size.split(",")]
    per: dict[int, dict[str, list[float]]] = {}
    for _ in range(args.processes):
        r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([timed, batches, args.threads, args.repeats])],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"timing failed: {r.stderr.strip()[-500:]}")
        for b, ms in json.loads(r.stdout).items():
            for k, v in ms.items():
                per.setdefault(int(b), {}).setdefault(k, []).append(v)
    print(f"{'batch':>5} {'ORT fp32 ms':>12} {'ORT int8 ms':>12} {'int8 vs fp32':>13} {'range':>12} "
          f"{'plain int8 ms':>14} {'compact/plain':>13}  load avg {os.getloadavg()[0]:.2f}")
    for b, ms in sorted(per.items()):
        ratios = [f / i for f, i in zip(ms["float32"], ms["int8"])]
        same = [c / p for c, p in zip(ms["int8"], ms["int8-plain"])]
        print(f"{b:>5} {statistics.median(ms['float32']):>12.2f} {statistics.median(ms['int8']):>12.2f} "
              f"{statistics.median(ratios):>12.2f}x {min(ratios):>5.2f}-{max(ratios):<5.2f}x "
              f"{statistics.median(ms['int8-plain']):>14.2f} {statistics.median(same):>12.2f}x")


if __name__ == "__main__":
    main()
