"""Benchmark every kernel against dense torch (and dense onnxruntime) per layer shape.

Layers: the resnet18 CIFAR-stem 3x3 convs at 32x32 input (64ch@32x32, 128@16, 256@8,
512@4), a Linear 512->10 and a Linear 4096x4096, with random unstructured weights at each
sparsity. For each (threads, batch, layer, sparsity) all kernels run interleaved in one
process; the table shows the median time and speed-up over dense torch next to the FLOP
ideal 1/(1-s), and which kernel the autotuner picks.

    /work/venv/bin/python scripts/bench_kernels.py                 # the full table
    /work/venv/bin/python scripts/bench_kernels.py --batch 1 --threads 2 --sparsity 0.9 0.95 --ort
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

from swat_deploy.kernels import KERNELS, make_conv2d, make_linear
from swat_deploy.kernels.base import LayerSpec, thread_scope


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str
    shape: tuple[int, ...]  # weight shape
    hw: int = 0  # input H = W for convs

    def input_shape(self, batch: int) -> tuple[int, ...]:
        if self.kind == "linear":
            return (batch, self.shape[1])
        return (batch, self.shape[1], self.hw, self.hw)

    def flops(self, batch: int) -> int:
        if self.kind == "linear":
            return 2 * batch * self.shape[0] * self.shape[1]
        o, i, kh, kw = self.shape
        return 2 * batch * o * i * kh * kw * self.hw * self.hw


LAYERS = [
    Layer("conv64@32", "conv2d", (64, 64, 3, 3), 32),
    Layer("conv128@16", "conv2d", (128, 128, 3, 3), 16),
    Layer("conv256@8", "conv2d", (256, 256, 3, 3), 8),
    Layer("conv512@4", "conv2d", (512, 512, 3, 3), 4),
    Layer("fc512->10", "linear", (10, 512)),
    Layer("fc4096", "linear", (4096, 4096)),
]


def _weight(layer: Layer, sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(layer.shape, generator=g)
    k = round(w.numel() * sparsity)
    if k:
        # unstructured, exactly s zeros: the smallest |w| go, as Top-K pruning does
        idx = w.abs().flatten().argsort()[:k]
        w.view(-1)[idx] = 0
    return w


def _make(layer: Layer, w: torch.Tensor, b: torch.Tensor, batch: int, kernel: str | None, threads: int):  # noqa: ANN202
    if layer.kind == "linear":
        return make_linear(w, b, input_shape=layer.input_shape(batch), kernel=kernel, threads=threads)
    return make_conv2d(w, b, 1, 1, input_shape=layer.input_shape(batch), kernel=kernel, threads=threads)


def _ort_runner(layer: Layer, w: torch.Tensor, b: torch.Tensor, threads: int) -> Callable[[torch.Tensor], object] | None:
    """Dense onnxruntime on a one-node model (Conv or Gemm), the lead's reference runtime."""
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    inits = [numpy_helper.from_array(w.numpy(), "W"), numpy_helper.from_array(b.numpy(), "B")]
    if layer.kind == "linear":
        node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)
        xin = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", layer.shape[1]])
    else:
        node = helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1], strides=[1, 1])
        xin = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", layer.shape[1], layer.hw, layer.hw])
    yout = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([node], "g", [xin], [yout], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": np.ascontiguousarray(x.numpy())})


def _time(runners: dict[str, Callable], x: torch.Tensor, repeats: int, threads: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in runners}
    with thread_scope(threads), torch.inference_mode():
        for f in runners.values():
            f(x)
        for r in range(repeats):
            order = list(runners.items())
            if r % 2:
                order.reverse()
            for name, f in order:
                t0 = time.perf_counter()
                f(x)
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layers", nargs="+", default=[layer.name for layer in LAYERS],
                    help="subset of: " + ", ".join(layer.name for layer in LAYERS))
    ap.add_argument("--repeats", type=int, default=0, help="timed rounds (default: 25 at batch 1, 7 above)")
    ap.add_argument("--ort", action="store_true", help="also time dense onnxruntime")
    ap.add_argument("--no-auto", action="store_true", help="skip the autotuner column")
    ap.add_argument("--json", help="write all measurements to this file")
    args = ap.parse_args(argv)
    layers = [layer for layer in LAYERS if layer.name in args.layers]
    if not layers:
        ap.error(f"no known layer in {args.layers}")

    # The autotuner column must reflect a fresh decision, not an old cache.
    os.environ["SWAT_AUTOTUNE_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="swat-bench-"), "autotune.json")
    rows = []
    print(f"torch {torch.__version__}; times are medians in ms; xK = dense torch time / kernel time; "
          "ideal = 1/(1-s)", flush=True)
    for threads in args.threads:
        for batch in args.batch:
            repeats = args.repeats or (25 if batch == 1 else 7)
            for layer in layers:
                for s in args.sparsity:
                    w = _weight(layer, s)
                    b = torch.randn(layer.shape[0], generator=torch.Generator().manual_seed(1))
                    spec = LayerSpec(layer.kind, layer.shape)
                    names = [k.name for k in KERNELS if k.supports(spec)]
                    t0 = time.perf_counter()
                    runners: dict[str, Callable] = {n: _make(layer, w, b, batch, n, threads) for n in names}
                    prep_s = time.perf_counter() - t0
                    if args.ort:
                        ort_run = _ort_runner(layer, w, b, threads)
                        if ort_run is not None:
                            runners["ort_dense"] = ort_run
                    auto = "-" if args.no_auto else _make(layer, w, b, batch, None, threads).kernel_name
                    x = torch.rand(layer.input_shape(batch), generator=torch.Generator().manual_seed(2))
                    t = _time(runners, x, repeats, threads)
                    base = t["dense"]
                    row = {"threads": threads, "batch": batch, "layer": layer.name, "sparsity": s,
                           "ideal": 1 / (1 - s), "auto": auto, "prepare_s": prep_s,
                           "ms": {k: v * 1e3 for k, v in t.items()}, "speedup": {k: base / v for k, v in t.items()}}
                    rows.append(row)
                    cells = "  ".join(f"{k} {v * 1e3:8.3f} x{base / v:5.2f}" for k, v in t.items() if k != "dense")
                    print(f"th={threads} N={batch:<3d} {layer.name:<11s} s={s:.2f} ideal {1 / (1 - s):5.1f} | "
                          f"dense {base * 1e3:8.3f} | {cells} | auto={auto}", flush=True)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
