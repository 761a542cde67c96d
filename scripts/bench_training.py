"""Step time and saved-for-backward memory of SWAT training vs dense, on a ResNet-20 step.

    python scripts/bench_training.py --threads 1     # one core, ~3 minutes on a loaded machine
    python scripts/bench_training.py                 # threads 1 and 2
    python scripts/bench_training.py --threads 1 --rounds 10 --no-variants   # quick look

Method: one process, every configuration its own copy of the same initial network and its
own SGD optimiser; the configurations take turns step by step (interleaved, so load spikes
from other processes hit all of them alike); the figure is the median over rounds, reported
as a ratio to dense.  Both wall-clock and process CPU time are reported: on a shared machine
CPU time is the steadier of the two.

Threshold caching with N > 1 recomputes the exact K-th magnitude only on every N-th step, so
a plain median would hide the refresh cost.  The amortised figure is
((N-1) * median(cached steps) + median(refresh steps)) / N, where the refresh-step cost is
the N=1 configuration's (every N=1 step is exactly such a refresh step).

Memory: bytes autograd keeps for backward (training.memory.saved_bytes, each storage counted
once) for one training-mode forward at batch 64, dense vs each mode and sparsity.
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# First, as in `swat train`: swat_native shortens libgomp's idle spin, which only takes effect
# before torch loads libgomp (measured: without it a SWAT-90 step at 2 threads ran 0.92-0.98x
# dense instead of 0.81-0.83x).
import swat_native  # noqa: E402,F401
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from training import memory, sparse_products  # noqa: E402
from training.memory import saved_bytes  # noqa: E402
from training.swatify import swat_layers, swatify  # noqa: E402


# ----------------------------------------------------------------------- local ResNet-20
class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.short(x))


def local_resnet20(num_classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for i, w in enumerate((16, 32, 64)):
        for j in range(3):
            layers.append(_Block(cin, w, 2 if i > 0 and j == 0 else 1))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def build_net() -> tuple[nn.Module, str]:
    try:
        import models
        return models.build("resnet20"), "models.build('resnet20')"
    except Exception:  # models/ not importable: the local copy has the same layer shapes
        return local_resnet20(), "local resnet20"


# ---------------------------------------------------------------------------- timing
MAIN = [("dense", dict(mode="torch")),
        ("swat N=1", dict(mode="swat", refresh_every=1)),
        ("swat N=20", dict(mode="swat", refresh_every=20)),
        ("swat N=100", dict(mode="swat", refresh_every=100)),
        ("saw N=1", dict(mode="saw", refresh_every=1)),
        ("saw N=20", dict(mode="saw", refresh_every=20)),
        ("meprop", dict(mode="meprop"))]
# The sparse-kernel products (training.sparse_products) next to today's dense-torch products:
# "sp" is the sparse-product mode ("off" = dense torch products, as every MAIN config runs).
SPARSE = [("dense", dict(mode="torch")),
          # swatify's dense mode: dense products, but swat's compiled BatchNorm passes (training/batchnorm.py),
          # so the table shows how much of a sparse ratio is the BatchNorm alone
          ("dense, swat BN", dict(mode="dense")),
          ("swat-70 N=20 torch", dict(mode="swat", refresh_every=20, sparsity=0.7)),
          ("swat-90 N=20 torch", dict(mode="swat", refresh_every=20, sparsity=0.9))]
for _s in (0.7, 0.8, 0.9):
    for _n in (1, 20):
        SPARSE.append((f"swat-{_s:.0%} N={_n} sparse".replace("%", ""),
                       dict(mode="swat", refresh_every=_n, sparsity=_s, sp="auto")))
SPARSE += [("swat-90 block4 N=1 sparse", dict(mode="swat", refresh_every=1, sparsity=0.9, block=4, sp="auto")),
           ("swat-90 block4 N=20 sparse", dict(mode="swat", refresh_every=20, sparsity=0.9, block=4, sp="auto")),
           # the bitmask passes on the numba loops instead of the compiled C (what they replaced)
           ("swat-90 N=20 sparse, numba bits", dict(mode="swat", refresh_every=20, sparsity=0.9, sp="auto",
                                                    bits="numba"))]
SPARSE_TARGETS = [("swat-90 N=20 sparse", 0.75), ("swat-80 N=20 sparse", 0.90), ("swat-70 N=20 sparse", 1.00),
                  ("swat-90 block4 N=20 sparse", 0.60)]
VARIANTS = [("swat chw N=1", dict(mode="swat", topk="chw", refresh_every=1)),
            ("swat chw N=20", dict(mode="swat", topk="chw", refresh_every=20)),
            ("swat hw N=1", dict(mode="swat", topk="hw", refresh_every=1)),
            ("swat hw N=20", dict(mode="swat", topk="hw", refresh_every=20)),
            ("swat random", dict(mode="swat", topk="random"))]


def _refresh_due(net: nn.Module, n: int) -> bool:
    layers = swat_layers(net)
    return bool(layers) and layers[0][1].swat_step % n == 0


def time_steps(base: nn.Module, configs: list[tuple[str, dict[str, Any]]], sparsity: float, x: torch.Tensor,
               y: torch.Tensor, rounds: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    runs = []
    for name, kw in configs:
        opts = {k: v for k, v in kw.items() if k not in ("sp", "sparsity", "bits")}
        net = copy.deepcopy(base).train()
        if kw["mode"] != "torch":  # "torch": the plain model, torch's own layers throughout
            swatify(net, kw.get("sparsity", sparsity), **opts)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        runs.append((name, kw, net, opt))

    def step(net: nn.Module, opt: torch.optim.Optimizer) -> None:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    samples: dict[str, list[tuple[float, float, bool]]] = {name: [] for name, *_ in runs}
    for r in range(warmup + rounds):
        order = runs[r % len(runs):] + runs[:r % len(runs)]  # rotate who goes first
        for name, kw, net, opt in order:
            refresh = kw.get("mode") in ("swat", "saw") and _refresh_due(net, kw.get("refresh_every", 1))
            with sparse_products.use_mode(kw.get("sp", "off")), memory.use_backend(kw.get("bits", "auto")):
                w0, c0 = time.perf_counter(), time.process_time()
                step(net, opt)
                w1, c1 = time.perf_counter(), time.process_time()
            if r >= warmup:
                samples[name].append((w1 - w0, c1 - c0, refresh))

    out: dict[str, dict[str, float]] = {}
    for name, kw, *_ in runs:
        s = samples[name]
        wall = statistics.median(v[0] for v in s)
        cpu = statistics.median(v[1] for v in s)
        out[name] = {"wall": wall, "cpu": cpu, "n": kw.get("refresh_every", 1)}
    # amortise refresh steps (module docstring)
    for name, kw, *_ in runs:
        n = kw.get("refresh_every", 1)
        if kw.get("mode") not in ("swat", "saw") or n == 1 or kw.get("topk") == "random":
            continue
        exact = name.replace(f"N={n}", "N=1")
        own_refresh = [v for v in samples[name] if v[2]]
        cached = [v for v in samples[name] if not v[2]] or samples[name]
        for i, key in ((0, "wall"), (1, "cpu")):
            if exact in out:
                refresh_cost = out[exact][key]
            elif own_refresh:
                refresh_cost = statistics.median(v[i] for v in own_refresh)
            else:
                continue
            c = statistics.median(v[i] for v in cached)
            out[name][key + "_amortised"] = ((n - 1) * c + refresh_cost) / n
    return out


def print_times(res: dict[str, dict[str, float]], threads: int) -> None:
    d = res["dense"]
    print(f"\n## step time, torch threads={threads} (median; ratio = / dense)")
    print("| config | wall ms | wall ratio | cpu ms | cpu ratio | amortised wall ratio | amortised cpu ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, r in res.items():
        am_w = r.get("wall_amortised")
        am_c = r.get("cpu_amortised")
        amw = f"{am_w / d['wall']:.3f}" if am_w else "-"
        amc = f"{am_c / d['cpu']:.3f}" if am_c else "-"
        print(f"| {name} | {1e3 * r['wall']:.1f} | {r['wall'] / d['wall']:.3f} | {1e3 * r['cpu']:.1f} | "
              f"{r['cpu'] / d['cpu']:.3f} | {amw} | {amc} |")


def memory_table(base: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    dense = saved_bytes(base, x, y)
    dense_act = saved_bytes(base, x, y, exclude_parameters=True)
    print(f"\n## saved-for-backward bytes, batch {x.shape[0]} (dense: {dense / 2**20:.2f} MiB, "
          f"{dense_act / 2**20:.2f} MiB without model-owned tensors)")
    print("| config | MiB | ratio | ratio w/o model-owned |")
    print("|---|---|---|---|")
    rows: list[tuple[str, Callable[[], nn.Module]]] = []
    for s in (0.5, 0.7, 0.9):
        rows.append((f"swat {s:.0%}", lambda s=s: swatify(copy.deepcopy(base), s, "swat")))
    rows.append(("saw 70%", lambda: swatify(copy.deepcopy(base), 0.7, "saw")))
    rows.append(("meprop 70%", lambda: swatify(copy.deepcopy(base), 0.7, "meprop")))
    at70 = float("nan")
    for name, make in rows:
        net = make()
        b = saved_bytes(net, x, y)
        a = saved_bytes(net, x, y, exclude_parameters=True)
        print(f"| {name} | {b / 2**20:.2f} | {b / dense:.3f} | {a / dense_act:.3f} |")
        if name == "swat 70%":
            at70 = b / dense
    return at70


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown CPU"


def _isa() -> str:
    try:
        import swat_native
        return swat_native.isa() if swat_native.available() else "not built"
    except ImportError:
        return "not built"


def print_choices() -> None:
    """How many (product, layer shape) keys the timed choice sent to the sparse kernel."""
    picks = sparse_products.choices()
    for prod in ("fwd", "dgrad", "dgrad-s", "wgrad"):
        mine = [v for k, v in picks.items() if k.split("|", 1)[0] == prod]
        if mine:
            print(f"- {prod}: sparse kernel chosen for {sum(mine)} of {len(mine)} (layer shape, density) keys")


def _only(configs: list[tuple[str, dict[str, Any]]], globs: list[str] | None) -> list[tuple[str, dict[str, Any]]]:
    """The dense baselines plus the configurations matching any glob (all of them without globs)."""
    if not globs:
        return configs
    names = {c[0] for c in configs if c[0].startswith("dense") or any(fnmatch.fnmatchcase(c[0], g) for g in globs)}
    # a cached-threshold config's refresh cost is its N=1 twin's step (module docstring): keep the twin
    names |= {n.replace(f"N={c.get('refresh_every', 1)}", "N=1") for n, c in configs if n in names}
    keep = [c for c in configs if c[0] in names]
    if len(keep) == sum(c[0].startswith("dense") for c in configs):
        raise SystemExit(f"--configs {' '.join(globs)} matches no configuration; names: "
                         + ", ".join(c[0] for c in configs))
    return keep


def _verdict(what: str, value: float, limit: float) -> str:
    return f"{what}: {value:.3f} (target <= {limit:.2f}) {'MET' if value <= limit else 'MISSED'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--no-variants", action="store_true", help="skip the chw/hw/random Top-K variants")
    ap.add_argument("--tables", choices=("all", "main", "sparse"), default="all",
                    help="main: today's configurations (dense torch products); sparse: the sparse-kernel "
                         "products (training.sparse_products) at 70/80/90 %% next to today's")
    ap.add_argument("--configs", nargs="+", metavar="GLOB",
                    help="time only the configurations whose names match (fnmatch, e.g. 'swat-90 block4*'), "
                         "next to the dense ones: fewer models taking turns keep their caches warmer, as one "
                         "training run does")
    args = ap.parse_args()

    torch.manual_seed(0)
    base, source = build_net()
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    print(f"# SWAT training benchmark: {source}, batch {args.batch}, 32x32, sparsity {args.sparsity}, "
          f"torch {torch.__version__}")
    cpu = _cpu_name()
    print(f"# CPU: {cpu}; compiled kernels ISA: {_isa()}")
    verdicts = [_verdict("resnet20 saved-for-backward bytes at 70%, / dense", memory_table(base, x, y), 0.70)]
    for t in args.threads:
        torch.set_num_threads(t)
        if args.tables != "sparse":
            res = time_steps(base, _only(MAIN, args.configs), args.sparsity, x, y, args.rounds)
            print_times(res, t)
            r20, d = res.get("swat N=20"), res["dense"]
            if r20 is not None:
                verdicts.append(_verdict(f"SWAT-{args.sparsity:.0%} N=20 amortised step (cpu time) / dense, "
                                         f"{t} thread(s)", r20["cpu_amortised"] / d["cpu"], 1.15))
            if not args.no_variants and t == args.threads[0]:
                res = time_steps(base, [MAIN[0]] + VARIANTS, args.sparsity, x, y, max(args.rounds // 2, 5))
                print_times(res, t)
        if args.tables != "main":
            res = time_steps(base, _only(SPARSE, args.configs), args.sparsity, x, y, args.rounds)
            print_times(res, t)
            print_choices()
            d, dbn = res["dense"], res["dense, swat BN"]
            for name, limit in SPARSE_TARGETS:
                r = res.get(name)
                if r is None:
                    continue
                verdicts.append(_verdict(f"{name} amortised step (wall) / dense, {t} thread(s)",
                                         r["wall_amortised"] / d["wall"], limit)
                                + f"; / dense with swat's BatchNorm: {r['wall_amortised'] / dbn['wall']:.3f}")
        sys.stdout.flush()
    print("\n## targets")
    for v in verdicts:
        print("- " + v)


if __name__ == "__main__":
    main()
