"""Sparse inference targets: our Session vs dense onnxruntime (and its int8) on the same file.

    python scripts/bench_inference_targets.py                                 # resnet18-cifar, 90 / 95 %
    python scripts/bench_inference_targets.py --block 4 --sparsity 0.7 0.8 0.9
    python scripts/bench_inference_targets.py --model resnet50 --image-size 224 --batch-size 1 \\
        --source magnitude --sparsity 0.9
    python scripts/bench_inference_targets.py --model mobilenet_v2 --image-size 224 --block 4 \\
        --source magnitude --sparsity 0.8 --batch-size 1

Weights come from one of two sources:
* ``train`` (32x32 only): `swat train --dataset synthetic --epochs 1 --limit 256 [--block B]`,
  i.e. the weights and per-layer sparsity SWAT leaves, exported by `swat export`;
* ``magnitude``: the registry model, freshly initialised, every conv / linear but the first
  conv magnitude-pruned per tensor (in blocks of B output channels for --block B, by the L2
  norm of each block) and exported densely with torch.onnx - a model pruned elsewhere, whose
  block structure the Session must find by itself.
Each file is then timed by `swat bench --json` in several fresh processes. Why several: on a
shared 2-core VM one process's timings are steady (interleaved, median of repeats), but the
level moves by up to 25 % from one process (or minute) to the next. The table gives the
median ratio over processes and its range, and names the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# Targets vs dense onnxruntime: (model, structured?, sparsity, batch) -> ratio
TARGETS = {
    ("resnet18", False, 0.9, 1): 2.0, ("resnet18", False, 0.9, 64): 1.6,
    ("resnet18", False, 0.95, 1): 3.0, ("resnet18", False, 0.95, 64): 2.2,
    ("resnet18", True, 0.7, 1): 1.5, ("resnet18", True, 0.7, 64): 1.3,
    ("resnet18", True, 0.8, 1): 2.0, ("resnet18", True, 0.8, 64): 1.7,
    ("resnet18", True, 0.9, 1): 3.0, ("resnet18", True, 0.9, 64): 2.5,
    ("resnet50", False, 0.9, 1): 1.5, ("resnet50", True, 0.8, 1): 1.8,
    ("mobilenet_v2", True, 0.8, 1): 1.2,
}
for _s in (0.5, 0.6, 0.7, 0.8):
    for _b in (1, 64):
        TARGETS[("resnet18", False, _s, _b)] = 0.97  # moderately sparse: never slower (fallback)


def _swat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, check=False)


def _trained(work: Path, model: str, sparsity: float, block: int) -> Path:
    run = work / f"{model}-s{sparsity:g}-b{block}"
    if not (run / "model.onnx").is_file():
        r = _swat("train", "--model", model, "--dataset", "synthetic", "--epochs", "1", "--limit", "256",
                  "--sparsity", str(sparsity), "--block", str(block), "--seed", "0", "--out", str(run), "--force")
        if r.returncode:
            sys.exit(f"training {run} failed: {r.stderr.strip().splitlines()[-1:]}")
        r = _swat("export", str(run), "--force")
        if r.returncode:
            sys.exit(f"exporting {run} failed: {r.stderr.strip().splitlines()[-1:]}")
    return run


def _magnitude(work: Path, model: str, size: int, sparsity: float, block: int) -> Path:
    path = work / f"{model}-{size}px-s{sparsity:g}-b{block}.onnx"
    if path.is_file():
        return path
    import torch

    import models

    torch.manual_seed(0)
    cfg = models.small_input_cfg(model) if size <= 32 else {}
    net = models.build(model, num_classes=10 if size <= 32 else 1000, in_channels=3, **cfg).eval()
    first = True
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                if first:  # the first conv sees the image; it stays dense, as in training
                    first = False
                    continue
                w = m.weight
                groups = getattr(m, "groups", 1)
                b = block if (w.shape[0] // groups) % block == 0 and groups == 1 else 1
                scores = w.reshape(w.shape[0] // b, b, -1).norm(dim=1)
                keep = int(round(scores.numel() * (1 - sparsity)))
                if keep < scores.numel():
                    thr = scores.flatten().kthvalue(scores.numel() - keep).values
                    mask = (scores > thr).unsqueeze(1).expand(-1, b, -1).reshape(w.shape)
                    w.mul_(mask.to(w.dtype))
        # BatchNorm statistics of a fresh model are trivial; give them spread so folding is exercised
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(net, torch.rand(1, 3, size, size), str(tmp), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    os.replace(tmp, path)
    return path


def _cpu() -> str:
    import swat_native as native

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        name = "?"
    return f"{name}, kernels at {native.isa()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.95])
    ap.add_argument("--block", type=int, default=1, help="B output channels share one zero pattern (1: unstructured)")
    ap.add_argument("--source", choices=("train", "magnitude"), default=None,
                    help="train: swat train on synthetic 32x32 data; magnitude: prune a fresh model (default for >32 px)")
    ap.add_argument("--batch-size", default="1,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-targets"))
    args = ap.parse_args()
    source = args.source or ("train" if args.image_size <= 32 else "magnitude")
    if source == "train" and args.image_size != 32:
        sys.exit("--source train makes 32x32 runs only; use --source magnitude for other image sizes")
    rows = []
    for s in args.sparsity:
        target_file = (_trained(args.work, args.model, s, args.block) if source == "train"
                       else _magnitude(args.work, args.model, args.image_size, s, args.block))
        per_batch: dict[int, list[tuple[float, float, float, float, str]]] = {}
        for _ in range(args.processes):
            r = _swat("bench", str(target_file), "--batch-size", args.batch_size, "--threads", str(args.threads),
                      "--repeats", str(args.repeats), "--json")
            if r.returncode:
                sys.exit(f"swat bench {target_file} failed: {r.stderr.strip()}")
            rep = json.loads(r.stdout)
            for e in rep["results"]:
                if e["engine"] != "swat":
                    continue
                ort = next(o for o in rep["results"] if o["engine"] == "onnxruntime" and o["batch"] == e["batch"])
                q8 = next((o for o in rep["results"] if o["engine"] == "onnxruntime-int8" and o["batch"] == e["batch"]),
                          None)
                vs_int8 = ort["median_ms"] / q8["median_ms"] if q8 else float("nan")
                per_batch.setdefault(e["batch"], []).append(
                    (e["vs_onnxruntime"], ort["median_ms"], e["median_ms"], vs_int8, e.get("plan", "")))
        for b, vals in sorted(per_batch.items()):
            ratios = [v[0] for v in vals]
            rows.append((s, b, statistics.median(ratios), min(ratios), max(ratios),
                         statistics.median(v[1] for v in vals), statistics.median(v[2] for v in vals),
                         statistics.median(v[3] for v in vals), sorted({v[4] for v in vals}),
                         TARGETS.get((args.model, args.block > 1, s, b))))
    print(f"{args.model} {args.image_size}x{args.image_size}, weights: {source}, block {args.block}, "
          f"{args.threads} threads, {args.processes} processes x median of {args.repeats} rounds")
    print(f"CPU: {_cpu()}; load avg at end {os.getloadavg()[0]:.2f}")
    print(f"{'sparsity':>8} {'batch':>5} {'ORT ms':>8} {'swat ms':>8} {'swat vs ORT':>11} {'range':>13} "
          f"{'int8 vs ORT':>11} {'target':>11}  plan")
    for s, b, med, lo, hi, ort_ms, swat_ms, q8, plans, target in rows:
        mark = "" if target is None else (f">={target:g} " + ("ok" if med >= target else "MISS"))
        print(f"{s:>8.2f} {b:>5} {ort_ms:>8.2f} {swat_ms:>8.2f} {med:>10.2f}x {lo:>5.2f}-{hi:<5.2f}x "
              f"{q8:>10.2f}x {mark:>11}  {', '.join(plans)}")


if __name__ == "__main__":
    main()
