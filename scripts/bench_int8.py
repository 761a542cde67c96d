"""The int8 baseline of issue 19: onnxruntime float32 vs onnxruntime int8 (QDQ) on one model, and file sizes;
and (``--synthetic``) swat's sparse int8 Session vs onnxruntime int8 on the same QDQ file.

    python scripts/bench_int8.py RUN                      # a run dir (resnet18 CIFAR stem in the issue)
    python scripts/bench_int8.py RUN --processes 3 --batch-size 1,64 --threads 2
    python scripts/bench_int8.py --synthetic 0.9,0.7      # ResNet-18 CIFAR, weights pruned in 4-blocks

``--synthetic``: a CIFAR-stem ResNet-18 with random weights and BN statistics, every conv with a
multiple of 4 input channels magnitude-pruned per tensor in blocks of 4 consecutive input
channels (one output channel, one tap: the int8 dot product's block), quantised by onnxruntime's
``quantize_static`` (QDQ, `swat_deploy.quantize.quantize_qdq`, 16 random calibration images).
Times ``Session(path)`` (planned: our kernels or onnxruntime, whichever its first run of the
shape measured faster) and ``Session(path, fallback=False)`` (our kernels forced) against
onnxruntime on that file, interleaved, median; ``--layers`` adds where the forced Session's time
goes per op type.

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


def _pruned_qdq(sparsity: float, out: Path, seed: int = 0) -> Path:
    """The synthetic model of ``--synthetic`` (see the module doc), written once to ``out``."""
    if out.is_file():
        return out
    import onnx

    from swat_deploy.quantize import quantize_qdq, random_images

    tmp = _pruned_f32(sparsity, out.with_suffix(".f32.onnx"), seed)
    q = quantize_qdq(onnx.load(str(tmp)), random_images((3, 32, 32), 16, seed))
    part = out.with_suffix(".part")
    onnx.save(q, str(part))
    part.replace(out)
    return out


def _pruned_f32(sparsity: float, out: Path, seed: int = 0) -> Path:
    """The float32 model the int8 one of `_pruned_qdq` is quantised from (same seed, same weights)."""
    if out.is_file():
        return out
    import torch

    import models

    torch.manual_seed(seed)
    m = models.build("resnet18", num_classes=10, stem="cifar").eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
        if isinstance(mod, torch.nn.Conv2d) and mod.in_channels % 4 == 0:
            w = mod.weight.data
            o, i, kh, kw = w.shape
            blocks = w.permute(0, 2, 3, 1).reshape(o, kh, kw, i // 4, 4)
            score = blocks.abs().sum(-1)
            k = int(round(sparsity * score.numel()))
            keep = score > score.flatten().kthvalue(k).values if k > 0 else torch.ones_like(score, dtype=torch.bool)
            mod.weight.data = (blocks * keep.unsqueeze(-1)).reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()
    part = out.with_suffix(".part")
    torch.onnx.export(m, (torch.rand(1, 3, 32, 32),), str(part), opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    part.replace(out)
    return out


def _time_steps(sess, x, rounds: int) -> dict[str, float]:  # noqa: ANN001
    """ms per op type over the Session's steps (min over rounds), for --layers."""
    import time

    import torch

    names = tuple(v.name for v in sess.get_outputs())
    steps, _ = sess._program(names)
    best: dict[int, float] = {}
    for _ in range(rounds):
        env = sess._feed({"input": x})
        with torch.no_grad():
            for i, st in enumerate(steps):
                args = [env[r] if k == "value" else r if k == "const" else None for k, r in st.inputs]
                t0 = time.perf_counter()
                outs = st.fn(args)
                best[i] = min(best.get(i, 1e9), time.perf_counter() - t0)
                for n, v in zip(st.outputs, outs):
                    env[n] = v
    per: dict[str, float] = {}
    for i, st in enumerate(steps):
        per[st.node.op_type] = per.get(st.node.op_type, 0.0) + best[i] * 1e3
    return per


def synthetic(sparsities: list[float], batches: list[int], threads: int, rounds: int, out_dir: Path,
              layers: bool, float32: bool = False) -> None:
    import numpy as np

    from swat_deploy import Session
    from swat_deploy.cpu import describe
    from swat_deploy.ort import ort_session
    from swat_deploy.timing import time_interleaved

    print(f"CPU: {describe()}; {threads} threads; median of {rounds} interleaved rounds (batch 1), "
          f"{max(3, rounds // 6)} (larger batches)")
    print(f"{'weights':>8} {'batch':>5} {'ORT int8 ms':>12} {'Session (planned) ms':>21} {'speedup':>8} "
          f"{'our kernels forced ms':>22} {'speedup':>8}  plan")
    out_dir.mkdir(parents=True, exist_ok=True)
    for sp in sparsities:
        path = _pruned_qdq(sp, out_dir / f"resnet18_cifar_b4_{round(sp * 100)}.int8.onnx")
        sess = Session(str(path), threads=threads, fallback=False)  # our kernels forced
        planned = Session(str(path), threads=threads)  # what a user gets: onnxruntime where it is faster
        ort = ort_session(str(path), threads)
        for b in batches:
            x = np.random.default_rng(0).random((b, 3, 32, 32), dtype=np.float32)
            feed = {"input": x}
            sess.run(None, feed)  # plan (our kernels on 1 or all threads) and warm-up
            planned.run(None, feed)  # plan: our kernels vs onnxruntime, timed on this shape
            ort.run(None, feed)
            t = time_interleaved({"ort": lambda: ort.run(None, feed), "plan": lambda: planned.run(None, feed),
                                  "swat": lambda: sess.run(None, feed)},
                                 rounds if b == 1 else max(3, rounds // 6), budget_s=60)
            ms = {k: v[0] * 1e3 for k, v in t.items()}
            p = planned.plans()[-1]
            how = f"{p['engine']}/{p['threads']}" if p["engine"] == "swat" else p["engine"]
            print(f"{sp:>7.0%} {b:>5} {ms['ort']:>12.3f} {ms['plan']:>21.3f} {ms['ort'] / ms['plan']:>7.2f}x "
                  f"{ms['swat']:>22.3f} {ms['ort'] / ms['swat']:>7.2f}x  {how}")
            if float32:  # the README table's float32 row: the same weights before quantisation
                f32 = str(_pruned_f32(sp, path.with_name(path.name.replace(".int8.onnx", ".f32.onnx"))))
                fs, fo = Session(f32, threads=threads), ort_session(f32, threads)
                fs.run(None, feed)
                fo.run(None, feed)
                t = time_interleaved({"ort": lambda: fo.run(None, feed), "plan": lambda: fs.run(None, feed)},
                                     rounds if b == 1 else max(3, rounds // 6), budget_s=60)
                f = {k: v[0] * 1e3 for k, v in t.items()}
                p = fs.plans()[-1]
                how = f"{p['engine']}/{p['threads']}" if p["engine"] == "swat" else p["engine"]
                print(f"{'float32':>13} {f['ort']:>12.3f} {f['plan']:>21.3f} {f['ort'] / f['plan']:>7.2f}x "
                      f"{'':>22} {'':>8}  {how}")
            if layers:
                per = _time_steps(sess, x, 5 if b == 1 else 2)
                print("         per op type (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))


def main() -> None:
    from swat_deploy.cpu import describe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?")
    ap.add_argument("--synthetic", default="", help="sparsities, e.g. 0.9,0.7 (no run dir needed)")
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/swat-bench-int8"))
    ap.add_argument("--layers", action="store_true")
    ap.add_argument("--float32", action="store_true", help="--synthetic: also onnxruntime and the Session on the "
                    "float32 model the int8 one was quantised from")
    ap.add_argument("--batch-size", default="1,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    if args.synthetic:
        synthetic([float(v) for v in args.synthetic.split(",")], [int(b) for b in args.batch_size.split(",")],
                  args.threads, args.repeats, args.out_dir, args.layers, args.float32)
        return
    if args.run is None:
        ap.error("give a run dir, or --synthetic SPARSITIES")
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
