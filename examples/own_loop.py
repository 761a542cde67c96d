"""SWAT in your own code: a model swat does not know, trained by a loop swat did not write.

A small MobileNet-style network (inverted residuals with depthwise convolutions and
squeeze-excite) is defined here, made sparse with ``training.swatify``, trained with a plain
PyTorch loop on scikit-learn's 8x8 digits, exported straight from the module to ONNX, run in
stock onnxruntime and in swat's sparse ``Session`` (their logits must match), and checked with
``swat_deploy.verify_module`` (the file against the module, on the test images).

    python examples/own_loop.py --epochs 8 --out runs/own_loop

Takes about 20 s of CPU on one core (8 epochs). Exit status 0 iff both runtimes agree and the verify passes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import swat_deploy
from training import swatify


# -------------------------------------------------------------------------- the model
class SqueezeExcite(nn.Module):
    """Channel attention: scale each channel by a gate computed from its global average."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // reduction, 1)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(self.act(self.reduce(s))))


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> squeeze-excite -> 1x1 project (+ identity when shapes allow)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, expand: int = 2) -> None:
        super().__init__()
        hidden = c_in * expand
        self.expand = nn.Sequential(nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU())
        self.se = SqueezeExcite(hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class TinyMobileNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(InvertedResidual(16, 16), InvertedResidual(16, 24, stride=2),
                                    InvertedResidual(24, 24))
        self.head = nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean((2, 3)))


# --------------------------------------------------------------------------- the data
def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as float images in [0, 1] (pixel / 16), 80 / 20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


# --------------------------------------------------------------------------- the loop
def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mean: float, std: float, epochs: int,
          seed: int = 0) -> None:
    """A hand-written loop: nothing of swat here but the swatified layers inside ``model``."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=max(steps, 1))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = nn.functional.cross_entropy(model((x[idx] - mean) / std), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    ap.add_argument("--out", default="runs/own_loop", help="folder for model.onnx (default runs/own_loop)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing OUT/model.onnx")
    ap.add_argument("--sparsity", type=float, default=0.7, help="SWAT sparsity (default 0.7)")
    args = ap.parse_args(argv)
    target = Path(args.out) / "model.onnx"
    if target.exists() and not args.force:  # before minutes of training, not after
        raise swat_deploy.SwatError(f"{target} already exists; pass --force to overwrite it or --out DIR")
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits()
    mean, std = float(x_train.mean()), float(x_train.std())

    # 1. any nn.Module: swatify in place (its Conv2d / Linear layers stay Conv2d / Linear)
    model = swatify(TinyMobileNet(), sparsity=args.sparsity, mode="swat")
    t0 = time.perf_counter()
    train(model, x_train, y_train, mean, std, args.epochs)
    seconds = time.perf_counter() - t0

    # 2. export straight from the module; normalisation goes inside the graph
    target.parent.mkdir(parents=True, exist_ok=True)
    path = swat_deploy.export_onnx(model, target, example_input=x_test[:1], normalize=([mean], [std]),
                                   class_names=[str(d) for d in range(10)], name="TinyMobileNet",
                                   force=args.force)

    # 3. the same file in stock onnxruntime and in swat's sparse Session
    import onnxruntime as ort

    feed = {"input": x_test.numpy()}
    ort_logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    # fallback=False: always swat's sparse kernels (by default a Session also times onnxruntime
    # on the first run of each input shape and keeps whichever is faster)
    swat_logits = swat_deploy.Session(path, fallback=False).run(None, feed)[0]
    diff = float(np.abs(ort_logits - swat_logits).max())
    same = int((ort_logits.argmax(1) == swat_logits.argmax(1)).sum())

    # 4. the file against the module, on batches of a loader (here: test images with labels)
    loader = [(x_test[i:i + 128], y_test[i:i + 128]) for i in range(0, len(x_test), 128)]
    report = swat_deploy.verify_module(model, path, loader)
    layers = report.to_dict()["layers"]

    print(f"trained TinyMobileNet (swat, sparsity {args.sparsity}) for {args.epochs} epochs in {seconds:.1f} s: "
          f"test accuracy {report.module_accuracy:.4f}")
    print(f"exported {path} ({path.stat().st_size / 1024:.1f} KiB, {len(layers)} sparse layers, "
          f"{sum(l['measured_sparsity'] for l in layers) / max(len(layers), 1):.2f} mean sparsity)")
    print(f"onnxruntime vs swat Session: max |logit diff| {diff:.2g}, same top-1 on {same}/{len(x_test)} images")
    if not report.passed:
        print(report.format())
    print(f"verify_module: {'PASSED' if report.passed else 'FAILED'} "
          f"({sum(c.passed for c in report.rows)}/{len(report.rows)} checks)")
    return 0 if report.passed and diff <= 1e-4 and same == len(x_test) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except swat_deploy.SwatError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
