"""The study's figures (PNG), drawn from ``runs.jsonl`` alone; partial data draws what it has."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from training.study.reduction import compute_reduction
from training.study.verdicts import accuracy, interval

__all__ = ["summarise", "write_figures"]


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configuration key: seeds, accuracies (pt), mean and 95 % CI, compute reduction, step time."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs.values():
        by.setdefault(r["key"], []).append(r)
    out = {}
    for key, rs in by.items():
        rs.sort(key=lambda r: r["seed"])
        accs = [100 * accuracy(r) for r in rs]
        mean, lo, hi = interval(accs)
        red = [x for x in (compute_reduction(r) for r in rs) if x]
        steps = [r["step_cpu_seconds_median"] for r in rs if r.get("step_cpu_seconds_median")]
        out[key] = {"config": rs[0]["config"], "seeds": [r["seed"] for r in rs], "acc": accs, "mean": mean,
                    "low": lo, "high": hi, "diverged": sum(r.get("test_accuracy") is None for r in rs),
                    "reduction": sum(red) / len(red) if red else None,
                    "step_cpu": sum(steps) / len(steps) if steps else None,
                    "wall": sum(r.get("wall_seconds", 0) for r in rs)}
    return out


def _err(s: dict[str, Any]) -> Optional[float]:
    return None if s["low"] is None else s["mean"] - s["low"]


def write_figures(summary: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        p = out / name
        fig.tight_layout()
        fig.savefig(p, dpi=90)
        plt.close(fig)
        written.append(p)

    dense = summary.get("dense")
    # accuracy vs sparsity (the paper's Figure 4, with meProp from Figure 2b)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for mode, sps, mk in (("swat", (50, 70, 80, 90), "*"), ("saw", (50, 70, 80, 90), "o"), ("meprop", (30, 50, 70), "x")):
        pts = [(s, summary[f"{mode}-{s}"]) for s in sps if f"{mode}-{s}" in summary]
        if pts:
            ax.errorbar([s for s, _ in pts], [p["mean"] for _, p in pts],
                        yerr=[_err(p) or 0 for _, p in pts], marker=mk, capsize=3, label=mode.upper() if mode != "meprop" else "meProp")
    if dense:
        ax.axhline(dense["mean"], color="k", linestyle="--", label="dense")
        if dense["low"] is not None:
            ax.axhspan(dense["low"], dense["high"], color="k", alpha=0.1)
    ax.set_xlabel("sparsity (%)"); ax.set_ylabel("test accuracy (%), mean and 95 % CI")
    ax.set_title("accuracy vs sparsity"); ax.legend()
    save(fig, "accuracy_vs_sparsity.png")
    # ablations: Top-K variants, caching, budget, forward-only, blocks
    groups = [("Top-K, SAW 70 %", [("nchw", "saw-70"), ("chw", "saw-70-chw"), ("hw", "saw-70-hw"),
                                    ("random", "saw-70-random")]),
              ("refresh, SWAT 70 %", [("1", "swat-70"), ("20", "swat-70-r20"), ("100", "swat-70-r100")]),
              ("budget, SWAT 90 %", [("uniform", "swat-90"), ("ERK", "swat-90-erk")]),
              ("forward-only 70 %", [("dense", "dense"), ("TopK(W)", "fwd-weights-70"), ("TopK(a)", "fwd-activations-70")]),
              ("blocks of 4, SWAT", [("70", "swat-70"), ("70 b4", "swat-70-b4"), ("90", "swat-90"), ("90 b4", "swat-90-b4")])]
    groups = [(t, [(lab, k) for lab, k in items if k in summary]) for t, items in groups]
    groups = [(t, items) for t, items in groups if items]
    if groups:
        fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 4), squeeze=False)
        for ax, (title, items) in zip(axes[0], groups):
            ms = [summary[k]["mean"] for _, k in items]
            ax.bar(range(len(items)), ms, yerr=[_err(summary[k]) or 0 for _, k in items], capsize=3)
            ax.set_xticks(range(len(items)), [lab for lab, _ in items], fontsize=8)
            lo = min(min(ms), dense["mean"] if dense else min(ms))
            ax.set_ylim(max(0, lo - 4), min(100, max(ms) + 2))
            if dense:
                ax.axhline(dense["mean"], color="k", linestyle="--", linewidth=0.8)
            ax.set_title(title, fontsize=9)
        axes[0][0].set_ylabel("test accuracy (%), mean and 95 % CI")
        save(fig, "ablations.png")
    # measured compute reduction next to measured step time
    pts = [(k, s) for k, s in summary.items() if s["reduction"] and s["step_cpu"]]
    if pts and dense and dense["step_cpu"]:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for k, s in pts:
            ax.scatter(s["reduction"], s["step_cpu"] / dense["step_cpu"])
            ax.annotate(k, (s["reduction"], s["step_cpu"] / dense["step_cpu"]), fontsize=6)
        ax.axhline(1.0, color="k", linewidth=0.6)
        ax.set_xlabel("training MAC reduction from recorded sparsity (x)")
        ax.set_ylabel("measured step time / dense (CPU, 1 thread)")
        ax.set_title("compute reduction (FLOP model) vs measured time")
        save(fig, "compute_vs_time.png")
    return written
