"""``swat study``: the paper's experiments on real data, resumable, with a verdict per claim.

Every training experiment is one short run of the same model / data / schedule / seed, keyed
by a stable name.  Finished runs go to ``OUT/results.jsonl`` (rewritten atomically after each
run); a rerun skips every key already there, so a killed study continues where it stopped.
The cheap analytic parts (FLOPs, memory, Gaussian angles, measured saved bytes) are recomputed
every time into ``OUT/analytic.json``.  ``OUT/verdicts.json``, ``OUT/summary.md`` and the
plots are derived from both.

How a claim is judged with one seed and short runs: a difference counts only when it exceeds
the noise margin ``max(2 * binomial SE of the difference on the test subset, seed spread,
0.5 pp)``, where the seed spread is |acc(dense, seed 0) - acc(dense, seed 1)| - the one direct
measure of run-to-run noise the study affords.  Inside the margin the verdict is INCONCLUSIVE.
"""
from __future__ import annotations

import json
import math
import shutil
import warnings
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from training.config import TrainConfig
from training.errors import SwatError
from training.fileio import atomic_write_json, atomic_write_text

__all__ = ["Scale", "SCALES", "Experiment", "experiments", "run_study", "load_results", "verdicts", "margin"]

RESULTS = "results.jsonl"
ANALYTIC = "analytic.json"
VERDICTS = "verdicts.json"
SUMMARY = "summary.md"


@dataclass(frozen=True)
class Scale:
    """How big every training run of the study is."""

    model: str = "lenet5"
    dataset: str = "fashion-mnist"
    train_limit: int = 5000
    test_limit: int = 2000
    epochs: int = 3
    batch_size: int = 128
    trace_every: int = 5  # steps between angle samples in traced runs


SCALES = {
    "full": Scale(train_limit=20000, test_limit=5000, epochs=6, trace_every=10),
    "quick": Scale(train_limit=600, test_limit=500, epochs=1, trace_every=2),
}


@dataclass(frozen=True)
class Experiment:
    """One training run; ``mode`` may also be ``forward`` (TopK(W) forward only, dense backward)."""

    key: str
    groups: tuple[str, ...]
    mode: str
    sparsity: float = 0.0
    topk: str = "nchw"
    refresh_every: int = 1
    budget: str = "uniform"
    seed: int = 0
    trace: bool = False  # record per-step thresholds and sparsification angles


def experiments() -> list[Experiment]:
    """The study's runs, most important first (a time-boxed study runs a prefix of them)."""
    exps: dict[str, Experiment] = {}

    def add(mode: str, s: float = 0.0, group: str = "", **kw: Any) -> None:
        topk, refresh, budget, seed = kw.get("topk", "nchw"), kw.get("refresh_every", 1), kw.get("budget", "uniform"), kw.get("seed", 0)
        key = f"{mode}" if mode == "dense" else f"{mode}-s{int(round(s * 100))}"
        if topk != "nchw":
            key += f"-{topk}"
        if refresh != 1:
            key += f"-r{refresh}"
        if budget != "uniform":
            key += f"-{budget}"
        if seed:
            key += f"-seed{seed}"
        old = exps.get(key)
        if old is None:
            exps[key] = Experiment(key, (group,), mode, s, topk, refresh, budget, seed, kw.get("trace", False))
        else:
            exps[key] = Experiment(key, old.groups + (group,), old.mode, old.sparsity, old.topk, old.refresh_every,
                                   old.budget, old.seed, old.trace or kw.get("trace", False))

    add("dense", group="accuracy")
    add("dense", group="noise", seed=1)
    for s in (0.5, 0.7, 0.8, 0.9):
        add("swat", s, "accuracy", trace=(s == 0.7))
        add("saw", s, "accuracy")
    for s in (0.3, 0.5, 0.7):
        add("forward", s, "fwd_bwd")
        add("saw", s, "fwd_bwd")
        add("meprop", s, "fwd_bwd")
    for r in (1, 20, 100):
        add("swat", 0.8, "refresh", refresh_every=r, trace=True)
    for s in (0.8, 0.9):
        add("swat", s, "budget")
        add("swat", s, "budget", budget="erk")
    for mode in ("saw", "swat"):
        for s in (0.5, 0.7, 0.9):
            for t in ("nchw", "chw", "hw", "random"):
                add(mode, s, f"topk_{mode}", topk=t)
    return list(exps.values())


# ------------------------------------------------------------------------------ store
def load_results(out: str | Path) -> dict[str, dict[str, Any]]:
    """Finished experiments by key (a torn last line from a killed study is ignored)."""
    p = Path(out) / RESULTS
    res: dict[str, dict[str, Any]] = {}
    if not p.is_file():
        return res
    for line in p.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "key" in r:
            res[r["key"]] = r
    return res


def _append_result(out: Path, record: dict[str, Any]) -> None:
    p = out / RESULTS
    old = p.read_text() if p.is_file() else ""
    if old and not old.endswith("\n"):
        old = old[: old.rfind("\n") + 1]
    atomic_write_text(p, old + json.dumps(record) + "\n")


# ------------------------------------------------------------------------------ tracing
class _Tracer:
    """Per-step K-th values and sparsification angles of every SWAT layer (forward hooks)."""

    def __init__(self, model: nn.Module, every: int) -> None:
        from training import measure
        from training.swatify import swat_layers

        self.every = max(1, every)
        self.thresholds: dict[str, list[float]] = {}
        self.angles: dict[str, dict[str, list[list[float]]]] = {}
        self.handles = []
        self.calls: dict[str, int] = {}
        for name, m in swat_layers(model):
            self.thresholds[name] = []
            self.angles[name] = {"weight": [], "activation": [], "grad_output": []}
            self.calls[name] = 0
            self.handles.append(m.register_forward_hook(self._fwd(name, measure)))
            self.handles.append(m.register_full_backward_hook(self._bwd(name, measure)))

    def _fwd(self, name: str, measure: Any) -> Callable:
        def hook(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not (m.training and torch.is_grad_enabled()):
                return
            step = self.calls[name]
            self.calls[name] += 1
            thr = m.swat_threshold
            self.thresholds[name].append(float("nan") if thr is None else float(thr.float().mean()))
            if step % self.every == 0:
                s = m.swat_sparsity
                self.angles[name]["weight"].append([step, measure.sparsification_angle(m.weight, s)])
                self.angles[name]["activation"].append([step, measure.sparsification_angle(inputs[0], s)])
        return hook

    def _bwd(self, name: str, measure: Any) -> Callable:
        def hook(m: nn.Module, grad_in: tuple, grad_out: tuple) -> None:
            step = self.calls[name] - 1
            if step % self.every == 0 and grad_out[0] is not None:
                self.angles[name]["grad_output"].append(
                    [step, measure.sparsification_angle(grad_out[0], m.swat_sparsity)])
        return hook

    def close(self) -> dict[str, Any]:
        for h in self.handles:
            h.remove()
        return {"thresholds": self.thresholds, "angles": self.angles}


def _config(exp: Experiment, scale: Scale, data_dir: Optional[str]) -> TrainConfig:
    mode = "dense" if exp.mode == "forward" else exp.mode
    return TrainConfig(model=scale.model, dataset=scale.dataset, data_dir=data_dir, mode=mode,
                       sparsity=exp.sparsity if mode != "dense" else 0.0, topk=exp.topk,
                       refresh_every=exp.refresh_every, budget=exp.budget, epochs=scale.epochs,
                       batch_size=scale.batch_size, seed=exp.seed, limit=scale.train_limit, device="cpu")


def _subset(ds: Any, limit: int) -> Any:
    from training.data import ImageDataset, stratified_subset

    if limit >= len(ds):
        return ds
    idx = torch.from_numpy(stratified_subset(ds.labels.numpy(), limit, seed=0))
    return ImageDataset(ds.images[idx], ds.labels[idx], ds.info, ds.split)


def run_experiment(exp: Experiment, scale: Scale, run_dir: Path, data_dir: Optional[str] = None) -> dict[str, Any]:
    """Train one experiment into ``run_dir`` (overwritten) and return its result record."""
    from training.forward_only import forward_only
    from training.swatify import unswatify
    from training.trainer import Trainer

    if run_dir.exists():
        shutil.rmtree(run_dir)  # a run killed mid-way is redone from scratch
    run_dir.mkdir(parents=True)
    cfg = _config(exp, scale, data_dir)
    trainer = Trainer(cfg, run_dir, log=lambda line: None, progress=False)
    trainer.test_ds = _subset(trainer.test_ds, scale.test_limit)
    if exp.mode == "forward":
        forward_only(unswatify(trainer.model), exp.sparsity, exp.topk)
    tracer = _Tracer(trainer.model, scale.trace_every) if exp.trace else None
    # the first layer's input (the images) needs no gradient; torch warns about that for the hook
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    t0 = time.perf_counter()
    error = None
    try:
        result = trainer.fit()
        acc = result.test_accuracy
    except SwatError as e:  # a diverged run is a result (meProp at high sparsity), not a crash
        error, acc = str(e), None
    seconds = time.perf_counter() - t0
    record: dict[str, Any] = {
        "key": exp.key, "groups": list(exp.groups), "mode": exp.mode, "sparsity": exp.sparsity, "topk": exp.topk,
        "refresh_every": exp.refresh_every, "budget": exp.budget, "seed": exp.seed,
        "scale": scale.__dict__, "test_accuracy": acc, "test_n": len(trainer.test_ds), "error": error,
        "history": [{"epoch": r["epoch"], "test_accuracy": r["test_accuracy"], "loss": r["loss"]}
                    for r in trainer.history],
        "seconds": round(seconds, 1), "run_dir": str(run_dir),
    }
    if exp.budget != "uniform":
        from training.swatify import layer_table
        record["layer_sparsity"] = {r["name"]: r["train_sparsity"] for r in layer_table(trainer.model)}
    if tracer is not None:
        record["trace"] = tracer.close()
    return record


# ------------------------------------------------------------------------------ analytic
PAPER_MODELS = (  # (name, input, classes, cfg): the paper's models at the sizes it reports
    ("resnet18", (3, 224, 224), 1000, {}), ("resnet50", (3, 224, 224), 1000, {}),
    ("resnet101", (3, 224, 224), 1000, {}), ("vgg16_bn", (3, 224, 224), 1000, {}),
    ("densenet121", (3, 224, 224), 1000, {}), ("resnet18", (3, 32, 32), 100, {"stem": "cifar"}),
    ("vgg16_bn", (3, 32, 32), 100, {"head": "cifar"}), ("densenet121", (3, 32, 32), 100, {"stem": "cifar"}),
    ("wrn28_10", (3, 32, 32), 100, {}),
)


def analytic(scale: Scale, quick: bool) -> dict[str, Any]:
    """FLOP / memory tables of the paper's models, Gaussian angles, measured saved bytes."""
    import models
    from training import measure
    from training.memory import saved_bytes
    from training.swatify import swatify

    sparsities = (0.5, 0.7, 0.8, 0.9)
    tables = []
    for name, shape, classes, cfg in PAPER_MODELS:
        with torch.device("meta"):
            net = models.build(name, num_classes=classes, in_channels=shape[0], **cfg)
        layers = measure.trace_layers(net, shape)
        for row in measure.reduction_table(layers, sparsities):
            tables.append({"model": name, "input": f"{shape[1]}x{shape[2]}", **row})
    trials = 200 if quick else 1000
    gauss = measure.gaussian_angles(1000, (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95), trials=trials, seed=0)
    angles = {f"{s:g}": {"mean": float(v.mean()), "std": float(v.std()), "limit": measure.gaussian_angle_limit(s),
                         "hist": np.histogram(v, bins=40, range=(0, 90))[0].tolist()} for s, v in gauss.items()}
    # measured saved-for-backward bytes on the small models vs the analytic model
    saved = []
    batch = 32
    for name in ("lenet5", "resnet20"):
        torch.manual_seed(0)
        x = torch.rand(batch, 1, 28, 28)
        y = torch.randint(0, 10, (batch,))
        base = models.build(name, num_classes=10, in_channels=1)
        layers = measure.trace_layers(base, (1, 28, 28))
        dense_b = saved_bytes(base, x, y, exclude_parameters=True)
        for s in sparsities:
            for mode in ("swat", "saw"):
                net = swatify(models.build(name, num_classes=10, in_channels=1), sparsity=s, mode=mode)
                sb = saved_bytes(net, x, y, exclude_parameters=True)
                saved.append({
                    "model": name, "mode": mode, "sparsity": s, "batch": batch,
                    "measured_dense_bytes": dense_b, "measured_bytes": sb,
                    "measured_reduction": dense_b / sb,
                    "analytic_dense_bytes": measure.activation_bytes(layers, "dense", 0.0, batch),
                    "analytic_bytes_with_mask": measure.activation_bytes(layers, mode, s, batch, index_bits=1),
                    "analytic_reduction": measure.activation_elements(layers, "dense", 0.0)
                    / measure.activation_elements(layers, mode, s),
                    "analytic_reduction_with_mask": measure.activation_elements(layers, "dense", 0.0)
                    / measure.activation_elements(layers, mode, s, index_bits=1),
                })
    return {"reduction": tables, "gaussian_angles": angles, "saved_bytes": saved}


# ------------------------------------------------------------------------------ verdicts
def margin(a: dict[str, Any], b: dict[str, Any], seed_spread: float) -> float:
    """Noise margin for the accuracy difference of two runs (module docstring)."""
    pa, pb = a["test_accuracy"] or 0.0, b["test_accuracy"] or 0.0
    se = math.sqrt(pa * (1 - pa) / max(a["test_n"], 1) + pb * (1 - pb) / max(b["test_n"], 1))
    return max(2.0 * se, seed_spread, 0.005)


def _acc(r: Optional[dict[str, Any]]) -> Optional[float]:
    if r is None:
        return None
    return r["test_accuracy"] if r["test_accuracy"] is not None else 0.0  # diverged: chance or worse


def _compare(res: dict, better: str, worse: str, spread: float, strict: bool = True) -> tuple[str, str]:
    """PASS if ``better`` beats ``worse`` by more than the margin (or, not strict: is not worse)."""
    a, b = res.get(better), res.get(worse)
    if a is None or b is None:
        return "NOT RUN", f"{better} vs {worse}: not run"
    d = _acc(a) - _acc(b)
    m = margin(a, b, spread)
    text = f"{better} {100 * _acc(a):.2f}% vs {worse} {100 * _acc(b):.2f}%: diff {100 * d:+.2f} pp, margin {100 * m:.2f} pp"
    if strict:
        verdict = "PASS" if d > m else ("FAIL" if d < -m else "INCONCLUSIVE")
    else:
        verdict = "PASS" if d >= -m else "FAIL"
    return verdict, text


def _within(res: dict, a_key: str, b_key: str, spread: float, allowed: float = 0.0) -> tuple[str, str]:
    """PASS if ``a`` loses at most ``allowed`` + margin against ``b``."""
    a, b = res.get(a_key), res.get(b_key)
    if a is None or b is None:
        return "NOT RUN", f"{a_key} vs {b_key}: not run"
    d = _acc(a) - _acc(b)
    m = margin(a, b, spread)
    text = (f"{a_key} {100 * _acc(a):.2f}% vs {b_key} {100 * _acc(b):.2f}%: diff {100 * d:+.2f} pp "
            f"(allowed loss {100 * allowed:.1f} pp + margin {100 * m:.2f} pp)")
    return ("PASS" if d >= -(allowed + m) else "FAIL"), text


def verdicts(res: dict[str, dict[str, Any]], ana: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per paper claim: claim, verdict, evidence lines."""
    spread = 0.0
    if "dense" in res and "dense-seed1" in res:
        spread = abs(_acc(res["dense"]) - _acc(res["dense-seed1"]))
    out: list[dict[str, Any]] = []

    def claim(cid: str, text: str, checks: list[tuple[str, str]], rule: str = "all") -> None:
        vs = [v for v, _ in checks]
        ran = [v for v in vs if v != "NOT RUN"]
        if not ran:
            verdict = "NOT RUN"
        elif rule == "all":
            verdict = "FAIL" if "FAIL" in ran else ("PASS" if all(v == "PASS" for v in ran) else "INCONCLUSIVE")
        else:  # "no_fail": a pass unless some check contradicts the claim
            verdict = "FAIL" if "FAIL" in ran else "PASS"
        if verdict == "PASS" and len(ran) < len(vs):
            verdict = "PASS (partial)"
        out.append({"id": cid, "claim": text, "verdict": verdict, "evidence": [t for _, t in checks]})

    claim("fig4-low", "SWAT and SAW at 50% lose (almost) no accuracy against dense (<= 0.5 pp in the paper)",
          [_within(res, f"{m}-s50", "dense", spread, 0.005) for m in ("swat", "saw")])
    claim("fig4-80", "At 80% the loss is < 2.5 pp (SWAT) / < 1.8 pp (SAW)",
          [_within(res, "swat-s80", "dense", spread, 0.025), _within(res, "saw-s80", "dense", spread, 0.018)])
    claim("fig2-meprop", "SAW beats meProp at high sparsity (70%)",
          [_compare(res, "saw-s70", "meprop-s70", spread)])
    claim("fig2-meprop-all", "SAW is not worse than meProp at 30/50/70%",
          [_compare(res, f"saw-s{s}", f"meprop-s{s}", spread, strict=False) for s in (30, 50, 70)], "no_fail")
    claim("fig2a-forward", "Sparse forward weights alone are tolerated (forward-only within 1 pp of dense at 30-70%)",
          [_within(res, f"forward-s{s}", "dense", spread, 0.01) for s in (30, 50, 70)])
    for mode in ("saw", "swat"):
        claim(f"fig3-{mode}-topk", f"{mode.upper()}: nchw >= chw (not worse) at 50/70/90%",
              [_compare(res, f"{mode}-s{s}", f"{mode}-s{s}-chw", spread, strict=False) for s in (50, 70, 90)], "no_fail")
        claim(f"fig3-{mode}-hw", f"{mode.upper()}: chw > hw at 50/70/90%",
              [_compare(res, f"{mode}-s{s}-chw", f"{mode}-s{s}-hw", spread) for s in (50, 70, 90)])
        claim(f"fig3-{mode}-random", f"{mode.upper()}: every Top-K variant >> random at 90%",
              [_compare(res, f"{mode}-s90" + ("" if t == "nchw" else f"-{t}"), f"{mode}-s90-random", spread)
               for t in ("nchw", "chw", "hw")])
    claim("fig6b-refresh", "Threshold caching is harmless: refresh_every 20 / 100 within noise of 1 (SWAT 80%)",
          [_within(res, f"swat-s80-r{r}", "swat-s80", spread) for r in (20, 100)])
    # Figure 9: Gaussian angles
    ga = ana.get("gaussian_angles", {})
    checks = []
    for s, paper in (("0.8", 36.4), ("0.9", 48.0)):
        if s in ga:
            m = ga[s]["mean"]
            checks.append(("PASS" if abs(m - paper) <= 1.0 else "FAIL",
                           f"sparsity {s}: mean angle {m:.2f} deg (paper ~{paper}), limit {ga[s]['limit']:.2f}"))
    claim("fig9-gauss", "1000-dim Gaussian: ~36.4 deg at 80% sparsity, ~48 deg at 90% (within 1 deg)", checks)
    tr = res.get("swat-s70", {}).get("trace")
    if tr:
        worst = {k: max((a for layer in tr["angles"].values() for _, a in layer[k]), default=float("nan"))
                 for k in ("weight", "activation")}
        ok = all(v < 36.0 for v in worst.values())
        claim("fig9e-training", "During SWAT-70% training, weight and activation angles stay < 36 deg in every layer",
              [("PASS" if ok else "FAIL", f"max weight angle {worst['weight']:.1f} deg, max activation angle "
                                          f"{worst['activation']:.1f} deg")])
    else:
        claim("fig9e-training", "During SWAT-70% training, weight and activation angles stay < 36 deg", [])
    # Figures 7 / 8
    red = [r for r in ana.get("reduction", []) if r["mode"] == "swat" and r["input"] == "224x224"]
    checks = []
    for s, paper in ((0.5, 2.0), (0.7, 3.3), (0.8, 5.0)):
        got = [r["compute_reduction"] for r in red if r["sparsity"] == s]
        if got:
            ok = all(abs(g - paper) / paper <= 0.05 for g in got)
            checks.append(("PASS" if ok else "FAIL", f"{int(s * 100)}%: {min(got):.2f}x-{max(got):.2f}x (paper {paper}x)"))
    claim("fig7-compute", "SWAT training compute reduction 2x / 3.3x / 5x at 50 / 70 / 80% (ImageNet models)", checks)
    checks = []
    for s, paper in ((0.5, 1.3), (0.7, 1.5), (0.8, 1.7)):
        got = [r["activation_reduction"] for r in red if r["sparsity"] == s]
        if got:
            ok = all(abs(g - paper) <= 0.15 for g in got)
            checks.append(("PASS" if ok else "FAIL", f"{int(s * 100)}%: {min(got):.2f}x-{max(got):.2f}x (paper ~{paper}x)"))
    claim("fig8-memory", "SWAT activation memory reduction ~1.3x / 1.5x / 1.7x at 50 / 70 / 80% (within 0.15x)", checks)
    return out


# ------------------------------------------------------------------------------ plots
def _plots(out: Path, res: dict[str, dict[str, Any]], ana: dict[str, Any]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        p = out / name
        fig.tight_layout()
        fig.savefig(p, dpi=90)
        plt.close(fig)
        written.append(p)

    def curve(ax: Any, mode: str, sps: tuple[int, ...], label: str, suffix: str = "", **kw: Any) -> None:
        xs, ys = [], []
        for s in sps:
            r = res.get(f"{mode}-s{s}{suffix}")
            if r is not None:
                xs.append(s)
                ys.append(100 * _acc(r))
        if xs:
            ax.plot(xs, ys, label=label, **kw)

    dense = res.get("dense")
    # Figure 4
    fig, ax = plt.subplots(figsize=(5, 4))
    curve(ax, "swat", (50, 70, 80, 90), "SWAT", marker="*", markersize=10)
    curve(ax, "saw", (50, 70, 80, 90), "SAW", marker="o")
    if dense:
        ax.axhline(100 * _acc(dense), linestyle="--", color="k", label="dense")
    ax.set_xlabel("sparsity (%)"); ax.set_ylabel("test accuracy (%)"); ax.legend(); ax.set_title("sparsity vs accuracy")
    save(fig, "study_fig4_accuracy.png")
    # Figure 2
    fig, ax = plt.subplots(figsize=(5, 4))
    curve(ax, "forward", (30, 50, 70), "forward-only TopK(W)", marker="s")
    curve(ax, "saw", (30, 50, 70), "SAW (sparse backward a, W)", marker="o")
    curve(ax, "meprop", (30, 50, 70), "meProp (sparse grad_out)", marker="x")
    if dense:
        ax.axhline(100 * _acc(dense), linestyle="--", color="k", label="dense")
    ax.set_xlabel("sparsity (%)"); ax.set_ylabel("test accuracy (%)"); ax.legend(); ax.set_title("forward / backward sensitivity")
    save(fig, "study_fig2_fwd_bwd.png")
    # Figure 3
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, mode in zip(axes, ("saw", "swat")):
        for t in ("nchw", "chw", "hw", "random"):
            curve(ax, mode, (50, 70, 90), t, "" if t == "nchw" else f"-{t}", marker="o")
        if dense:
            ax.axhline(100 * _acc(dense), linestyle="--", color="k", label="dense")
        ax.set_title(f"Top-K variants, {mode.upper()}"); ax.set_xlabel("sparsity (%)"); ax.set_ylabel("test accuracy (%)")
        ax.legend()
    save(fig, "study_fig3_topk.png")
    # Figure 6b
    tr = res.get("swat-s80", {}).get("trace")
    if tr:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name, ys in tr["thresholds"].items():
            axes[0].plot(range(len(ys)), ys, label=name)
        axes[0].set_xlabel("training step"); axes[0].set_ylabel("K-th largest |a| (threshold)")
        axes[0].set_title("activation threshold per layer (SWAT 80%)"); axes[0].legend(fontsize=7)
        keys = [k for k in ("swat-s80", "swat-s80-r20", "swat-s80-r100") if k in res]
        axes[1].bar(range(len(keys)), [100 * _acc(res[k]) for k in keys])
        axes[1].set_xticks(range(len(keys)), [f"refresh {res[k]['refresh_every']}" for k in keys])
        lo = min(100 * _acc(res[k]) for k in keys)
        axes[1].set_ylim(max(0, lo - 5), 100); axes[1].set_ylabel("test accuracy (%)")
        axes[1].set_title("threshold caching")
        save(fig, "study_fig6b_thresholds.png")
    # Figure 9
    ga = ana.get("gaussian_angles", {})
    tr = res.get("swat-s70", {}).get("trace")
    kinds = ("weight", "activation", "grad_output")
    fig, axes = plt.subplots(1, 4 if tr else 1, figsize=(16 if tr else 5, 3.8), squeeze=False)
    axes = axes[0]
    edges = np.linspace(0, 90, 41)
    for s, d in ga.items():
        axes[0].plot((edges[:-1] + edges[1:]) / 2, d["hist"], label=f"sparsity {s}")
    axes[0].set_xlabel("sparsification angle (deg)"); axes[0].set_ylabel("trials")
    axes[0].set_title("1000-dim Gaussian vectors")
    if ga:
        axes[0].legend(fontsize=7)
    if tr:
        for ax, kind in zip(axes[1:], kinds):
            for name, per in tr["angles"].items():
                pts = per[kind]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
            ax.axhline(36, linestyle="--", color="k", linewidth=0.8)
            ax.set_xlabel("training step"); ax.set_ylabel("angle (deg)")
            ax.set_title(f"{kind} vs its Top-K (SWAT 70%)"); ax.legend(fontsize=6)
    save(fig, "study_fig9_angles.png")
    # Figures 7 / 8
    red = [r for r in ana.get("reduction", []) if r["mode"] == "swat"]
    if red:
        names = sorted({(r["model"], r["input"]) for r in red}, key=lambda t: (t[1], t[0]))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        width = 0.2
        for i, s in enumerate((0.5, 0.7, 0.8, 0.9)):
            vals = {(r["model"], r["input"]): r for r in red if r["sparsity"] == s}
            xs = np.arange(len(names)) + i * width
            axes[0].bar(xs, [vals[n]["compute_reduction"] for n in names], width, label=f"{int(s * 100)}%")
            axes[1].bar(xs, [vals[n]["activation_reduction"] for n in names], width, label=f"{int(s * 100)}%")
        for ax, t in zip(axes, ("training compute reduction (x)", "activation memory reduction (x)")):
            ax.set_xticks(np.arange(len(names)) + 1.5 * width, [f"{m}\n{i}" for m, i in names], fontsize=6)
            ax.set_title(t); ax.legend(fontsize=7)
        save(fig, "study_fig7_8_reduction.png")
    return written


# ------------------------------------------------------------------------------ report
def _summary(res: dict[str, dict[str, Any]], ana: dict[str, Any], ver: list[dict[str, Any]], scale: Scale,
             not_run: list[str]) -> str:
    lines = [f"# swat study summary ({scale.model} on {scale.dataset}: {scale.train_limit} train / "
             f"{scale.test_limit} test images, {scale.epochs} epochs, batch {scale.batch_size}, seed 0)", "",
             "## Verdicts", "", "| claim | verdict | evidence |", "|---|---|---|"]
    for v in ver:
        lines.append(f"| {v['claim']} | **{v['verdict']}** | {'; '.join(v['evidence']) or '-'} |")
    lines += ["", "## Training runs", "", "| key | mode | sparsity | topk | refresh | budget | seed | test acc | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for k, r in res.items():
        acc = "diverged" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.2f}%"
        lines.append(f"| {k} | {r['mode']} | {r['sparsity']:g} | {r['topk']} | {r['refresh_every']} | {r['budget']} | "
                     f"{r['seed']} | {acc} | {r['seconds']:.0f} |")
    if not_run:
        lines += ["", f"Not run (time box): {', '.join(not_run)}"]
    lines += ["", "## Analytic compute / memory reduction (SWAT; SAW in analytic.json)", "",
              "| model | input | sparsity | dense training GMACs | compute x | activation x | activation x (with 1-bit mask) |",
              "|---|---|---|---|---|---|---|"]
    for r in ana.get("reduction", []):
        if r["mode"] == "swat":
            lines.append(f"| {r['model']} | {r['input']} | {r['sparsity']:g} | {r['gmacs_dense']:.2f} | "
                         f"{r['compute_reduction']:.2f} | {r['activation_reduction']:.2f} | "
                         f"{r['activation_reduction_with_mask']:.2f} |")
    lines += ["", "| model (SAW) | input | sparsity | compute x |", "|---|---|---|---|"]
    for r in ana.get("reduction", []):
        if r["mode"] == "saw" and r["input"] == "224x224" and r["model"] == "resnet50":
            lines.append(f"| {r['model']} | {r['input']} | {r['sparsity']:g} | {r['compute_reduction']:.2f} |")
    lines += ["", "## Measured saved-for-backward bytes (batch 32, 1x28x28, parameters excluded)", "",
              "| model | mode | sparsity | measured dense B | analytic dense B | measured sparse B | analytic sparse B "
              "(with mask) | measured x | analytic x (values only) | analytic x (with mask) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ana.get("saved_bytes", []):
        lines.append(f"| {r['model']} | {r['mode']} | {r['sparsity']:g} | {r['measured_dense_bytes']} | "
                     f"{r['analytic_dense_bytes']:.0f} | {r['measured_bytes']} | {r['analytic_bytes_with_mask']:.0f} | "
                     f"{r['measured_reduction']:.2f} | {r['analytic_reduction']:.2f} | "
                     f"{r['analytic_reduction_with_mask']:.2f} |")
    lines += ["", "## Gaussian sparsification angle (1000-dim)", "", "| sparsity | mean deg | std | large-d limit |",
              "|---|---|---|---|"]
    for s, d in ana.get("gaussian_angles", {}).items():
        lines.append(f"| {s} | {d['mean']:.2f} | {d['std']:.2f} | {d['limit']:.2f} |")
    return "\n".join(lines) + "\n"


def run_study(out: str | Path, quick: bool = False, max_minutes: Optional[float] = None,
              data_dir: Optional[str] = None, only: Optional[list[str]] = None,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run (or continue) the study in ``out``; returns the verdicts (also in OUT/verdicts.json).

    ``max_minutes``: start no new training run after this much time; the rest is listed as not
    run and a later call continues with it.  ``only``: experiment keys or group names to run.
    """
    out = Path(out)
    scale = SCALES["quick" if quick else "full"]
    exps = experiments()
    if only:
        known = {e.key for e in exps} | {g for e in exps for g in e.groups}
        bad = [o for o in only if o not in known]
        if bad:
            raise SwatError(f"--only {', '.join(bad)}: no such experiment or group; groups are: "
                            f"{', '.join(sorted({g for e in exps for g in e.groups}))}")
        exps = [e for e in exps if e.key in only or set(e.groups) & set(only)]
    out.mkdir(parents=True, exist_ok=True)
    meta_p = out / "study.json"
    if meta_p.is_file():
        old = json.loads(meta_p.read_text()).get("scale")
        if old and old != scale.__dict__:
            raise SwatError(f"{out} holds a study at another scale ({old}); use another --out or remove it")
    atomic_write_json(meta_p, {"scale": scale.__dict__, "quick": quick})
    t_start = time.perf_counter()
    done = load_results(out)
    not_run = []
    todo = [e for e in exps if e.key not in done]
    log(f"study: {len(exps)} runs, {len(exps) - len(todo)} already done, {len(todo)} to run -> {out}")
    for i, exp in enumerate(todo):
        if max_minutes is not None and (time.perf_counter() - t_start) / 60 > max_minutes:
            not_run = [e.key for e in todo[i:]]
            log(f"time box of {max_minutes} min reached; not run: {', '.join(not_run)}")
            break
        rec = run_experiment(exp, scale, out / "runs" / exp.key, data_dir)
        _append_result(out, rec)
        done[exp.key] = rec
        acc = "diverged" if rec["test_accuracy"] is None else f"{100 * rec['test_accuracy']:.2f}%"
        log(f"[{i + 1}/{len(todo)}] {exp.key}: test {acc} ({rec['seconds']:.0f}s)")
    log("analytic measurements ...")
    ana = analytic(scale, quick)
    atomic_write_json(out / ANALYTIC, ana)
    ver = verdicts(done, ana)
    atomic_write_json(out / VERDICTS, ver)
    _plots(out, done, ana)
    atomic_write_text(out / SUMMARY, _summary(done, ana, ver, scale, not_run))
    for v in ver:
        log(f"{v['verdict']:<15} {v['claim']}")
        for e in v["evidence"]:
            log(f"{'':<15}   {e}")
    return ver
