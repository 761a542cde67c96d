"""The study report (Markdown) and figures, regenerated from ``runs.jsonl`` alone.

Works on a partial file: it says how many of the planned runs are in, and every verdict whose
runs are missing is inconclusive.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from training.fileio import atomic_write_text
from training.study import store
from training.study.configurations import Preset, runs_of
from training.study.figures import summarise, write_figures
from training.study.verdicts import CLAIMS, verdicts

__all__ = ["write_report", "render"]

NOTES = """\
## How to read this

* **Verdict rule.** Each claim is a set of differences `d = acc(A) - acc(B)` in accuracy points,
  paired by seed (same seed: same initial weights and data order). The 95 % confidence interval
  is Student's t over the seeds (n - 1 degrees of freedom). *holds*: the interval lies entirely
  on the claimed side of the bound in the rule column; *contradicted*: entirely on the other
  side; *inconclusive*: it straddles the bound, or fewer than 2 seeds are in. A claim with
  several comparisons holds when all hold and is contradicted when any is. A diverged run
  counts as 10 % (chance). With 3 seeds the t quantile is 4.30: an interval is about
  +-2.5 x the seed-to-seed spread of the difference, so only differences that are large
  against the run-to-run noise get a verdict.
* **Top-K variants** are run under SAW (dense forward, sparse backward), as in the paper's
  Figure 3. **random** is the paper's null hypothesis: each step, for the weights *and* the
  activations, k entries are drawn uniformly among *all* entries (k = the Top-K count); the
  zeros among the drawn activations are not stored (a zero adds nothing to the product), so
  after a ReLU about (1 - s) of the non-zeros survive - the recorded activation sparsity
  shows it. **hw** on a 3x3 kernel would keep round(0.3 x 9) = 3 of 9 per slice (66.7 %
  sparsity); this build keeps the layer's count instead (2 per slice, the remaining places to
  the slices with the largest third entry), so the realised sparsity is the requested one - the
  weight sparsity column shows it.
* **Refresh N** (caching): the weight *and* activation Top-K thresholds are recomputed every N
  steps and reused in between (`--refresh-every N --refresh-weights`), as the paper's code
  does; refresh 1 is the exact computation (that run is swat-70). `swat train`'s default is
  exact weight Top-K every step (`--refresh-weights` off) and `--refresh-every 1`.
* **Compute reduction** is the paper's FLOP model (forward GEMM + two backward GEMMs per
  Conv / Linear) with each term scaled by the density the run *recorded* during training
  (weight Top-K, saved activation Top-K, meProp's gradient Top-K), averaged over layers by
  MACs. It is a count of multiply-accumulates, not a speed: the measured step time next to it
  (median CPU seconds per training step, 1 torch thread) shows what this CPU implementation
  actually costs. Each run measured it with the code of its day: runs started after SWAT's
  sparse training products landed use them where they win (`swat train`'s default), earlier
  runs used dense kernels with masks, and runs share the machine with other work, so step
  times are comparable only roughly, and wall times not at all.
"""


def _pt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:+.2f}"


def _ci(m: float, lo: Optional[float], hi: Optional[float], signed: bool = True) -> str:
    f = "{:+.2f}" if signed else "{:.2f}"
    if lo is None:
        return f.format(m) + " (1 seed)"
    return f"{f.format(m)} [{f.format(lo)}, {f.format(hi)}]"


def _layer_sparsity(runs: list[dict[str, Any]], field: str) -> Optional[float]:
    """MAC-weighted mean of a per-layer recorded sparsity over the layers that have it."""
    num = den = 0.0
    for r in runs:
        for layer in r.get("layers", []):
            v = layer.get(field)
            if v is None and field == "weight_sparsity_train":
                v = layer.get("nominal_sparsity") if layer.get("mode") == "forward-weights" else None
            if v is None or not layer.get("macs"):
                continue
            num += v * layer["macs"]
            den += layer["macs"]
    return num / den if den else None


def render(p: Preset, runs: dict[str, dict[str, Any]], figures: list[str], wall_note: str = "") -> tuple[str, list[str]]:
    """The report text and a few summary lines for the terminal."""
    plan = runs_of(p)
    planned = {store.run_id(c.key, s) for c, s in plan}
    have = [rid for rid in runs if rid in planned]
    summ = summarise({rid: runs[rid] for rid in have})
    keys = {c.key for c, _ in plan}  # a claim about configurations the preset lacks is left out
    claims = [cl for cl in CLAIMS if all(c.a in keys and c.b in keys for c in cl.comparisons)]
    ver = verdicts({rid: runs[rid] for rid in have}, claims)
    wall = sum(r.get("wall_seconds", 0) for r in runs.values())
    lines = [f"# SWAT claims at {p.model} scale: seeds and confidence intervals ({p.name} preset)", "",
             "Generated by `swat study --preset " + p.name + " --report-only` from "
             f"`docs/study/{p.name}/runs.jsonl` (one line per run, with the `swat train` command that reproduces it). "
             "Do not edit by hand.", "",
             f"**{len(have)} of {len(plan)} planned runs are in**" + (" (partial: every claim whose runs are "
                                                                     "missing is inconclusive)." if len(have) < len(plan) else ".")
             + f" Setup: {p.describe()}.", ""]
    if p.note:
        lines += [p.note, ""]
    if wall_note:
        lines += [wall_note, ""]
    lines += [f"Sum of run wall times: {wall / 3600:.2f} h (runs execute two at a time on 2 cores).", "",
              "## Verdicts", "", "| claim | rule | verdict | difference, mean [95 % CI] (pt), n seeds |",
              "|---|---|---|---|"]
    for v in ver:
        ev = "; ".join(f"{c['a']} - {c['b']}: {_ci(c['mean'], c['low'], c['high']) if c['n'] else 'not run'}"
                       f" (n={c['n']})" for c in v["comparisons"])
        lines.append(f"| {v['claim']} | {v['rule']} | **{v['verdict']}** | {ev} |")
    dense = summ.get("dense")
    lines += ["", "## Every configuration", "",
              "| config | what | seeds | test accuracy % mean [95 % CI] | per seed | weight sparsity | activation "
              "sparsity | compute reduction (x) | step ms (CPU) | step / dense |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = [c.key for c in p.configs]
    for key in order:
        s = summ.get(key)
        if s is None:
            continue
        rs = [r for r in runs.values() if r["key"] == key]
        ws = _layer_sparsity(rs, "weight_sparsity_train")
        acts = _layer_sparsity(rs, "act_sparsity")
        step = s["step_cpu"]
        ratio = step / dense["step_cpu"] if step and dense and dense["step_cpu"] else None
        div = f" ({s['diverged']} diverged)" if s["diverged"] else ""
        red = "-" if not s["reduction"] else f"{s['reduction']:.2f}"
        lines.append(f"| {key} | {s['config'].get('what', '')} | {len(s['seeds'])} | "
                     f"{_ci(s['mean'], s['low'], s['high'], signed=False)}{div} | "
                     f"{', '.join(f'{a:.2f}' for a in s['acc'])} | "
                     f"{'-' if ws is None else f'{100 * ws:.1f} %'} | {'-' if acts is None else f'{100 * acts:.1f} %'} | "
                     f"{red} | "
                     f"{'-' if not step else f'{1000 * step:.0f}'} | {'-' if ratio is None else f'{ratio:.2f}'} |")
    missing = [c.key for c in p.configs if c.key not in summ]
    if missing:
        lines += ["", f"Not in yet: {', '.join(missing)}."]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    lines += ["", NOTES, "## Reproducing one run", "",
              "Every line of runs.jsonl has a `command`; e.g. the first run in the file:", ""]
    if have:
        lines += ["```bash", runs[have[0]]["command"], "```", ""]
    lines += ["The study itself trains through the same `Trainer` but skips the per-epoch test pass "
              "(it changes no weight, RNG or SWAT state), so the command gives the same final accuracy.", ""]
    term = [f"{len(have)} of {len(plan)} runs in"] + [f"{v['verdict']:<13} {v['claim']}" for v in ver]
    return "\n".join(lines), term


def write_report(p: Preset, out: str | Path, report: str | Path, wall_note: str = "") -> tuple[Path, list[str]]:
    """Regenerate ``report`` and the figures in ``out`` from ``out/runs.jsonl``."""
    out, report = Path(out), Path(report)
    runs = store.load(out)
    figs = write_figures(summarise({k: v for k, v in runs.items()}), out) if runs else []
    rel = [os.path.relpath(f, report.parent) for f in figs]
    text, term = render(p, runs, rel, wall_note)
    report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report, text + "\n")
    return report, term
