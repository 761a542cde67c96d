"""Verdicts from seeds: the mean and 95 % confidence interval of each difference a claim is about.

Each comparison is ``d = acc(A) - acc(B)`` in accuracy points (pt), paired by seed (the same seed
gives both runs the same initial weights and data order, so the pairing removes that shared
noise), over the seeds both configurations have.  The interval is Student's t with n - 1
degrees of freedom on the n paired differences.  A comparison claims ``d > bound`` (or, for
"~", ``|d| < bound``):

* **holds** - the whole interval lies on the claimed side;
* **contradicted** - the whole interval lies on the other side;
* **inconclusive** - the interval straddles the bound (or fewer than 2 seeds are in).

A claim made of several comparisons holds when all hold, is contradicted when any is, and is
inconclusive otherwise.  A diverged run counts as accuracy 0.1 (chance on 10 classes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

__all__ = ["Comparison", "Claim", "CLAIMS", "t_quantile", "interval", "paired", "judge", "verdicts", "accuracy"]

CHANCE = 0.1

# two-sided 95 % Student t quantiles (t_{0.975, df}), df = 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile(df: int) -> float:
    """t_{0.975, df}; the normal 1.96 beyond the table (df > 30 is within 0.05 of it)."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 samples")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def interval(values: Sequence[float]) -> tuple[float, Optional[float], Optional[float]]:
    """(mean, low, high) of the 95 % t interval of the mean; low/high None with < 2 values."""
    n = len(values)
    if n == 0:
        return math.nan, None, None
    m = sum(values) / n
    if n < 2:
        return m, None, None
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    h = t_quantile(n - 1) * sd / math.sqrt(n)
    return m, m - h, m + h


def accuracy(rec: dict[str, Any]) -> float:
    a = rec.get("test_accuracy")
    return CHANCE if a is None else float(a)


def paired(runs: dict[str, dict[str, Any]], a: str, b: str) -> list[tuple[int, float]]:
    """(seed, acc(a) - acc(b) in pt) for every seed both configurations finished."""
    by: dict[str, dict[int, float]] = {}
    for r in runs.values():
        by.setdefault(r["key"], {})[int(r["seed"])] = accuracy(r)
    sa, sb = by.get(a, {}), by.get(b, {})
    return [(s, 100.0 * (sa[s] - sb[s])) for s in sorted(set(sa) & set(sb))]


def judge(low: Optional[float], high: Optional[float], bound: float, kind: str = ">") -> str:
    """holds / contradicted / inconclusive for ``d > bound`` (kind ">") or ``|d| < bound`` ("~")."""
    if low is None or high is None:
        return "inconclusive"
    if kind == ">":
        return "holds" if low > bound else ("contradicted" if high < bound else "inconclusive")
    if kind == "~":
        if -bound < low and high < bound:
            return "holds"
        return "contradicted" if (low > bound or high < -bound) else "inconclusive"
    raise ValueError(f"unknown comparison kind {kind!r}")


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    bound: float  # pt
    kind: str = ">"  # ">": acc(a) - acc(b) > bound;  "~": |acc(a) - acc(b)| < bound

    def rule(self) -> str:
        if self.kind == "~":
            return f"|{self.a} - {self.b}| < {self.bound:g} pt"
        return f"{self.a} - {self.b} > {self.bound:+g} pt"


@dataclass(frozen=True)
class Claim:
    id: str
    text: str  # the paper's claim
    comparisons: tuple[Comparison, ...]
    rule: str  # how it is judged, in words


CLAIMS: tuple[Claim, ...] = (
    Claim("swat70-vs-dense", "SWAT at 70 % loses less than 1 pt against dense",
          (Comparison("swat-70", "dense", -1.0),), "the 95 % CI of SWAT-70 - dense lies above -1.0 pt"),
    Claim("swat90-vs-dense", "SWAT at 90 % loses less than 2.5 pt against dense",
          (Comparison("swat-90", "dense", -2.5),), "the 95 % CI of SWAT-90 - dense lies above -2.5 pt"),
    Claim("swat-vs-saw", "SWAT ~ SAW (a sparse forward costs little on top of a sparse backward)",
          tuple(Comparison(f"swat-{s}", f"saw-{s}", 1.0, "~") for s in (50, 70, 80, 90)),
          "at each of 50/70/80/90 %, the 95 % CI of SWAT - SAW lies inside (-1, +1) pt"),
    Claim("saw-swat-vs-meprop", "SAW and SWAT >> meProp at high sparsity (70 %)",
          (Comparison("saw-70", "meprop-70", 1.0), Comparison("swat-70", "meprop-70", 1.0)),
          "the 95 % CI of SAW-70 - meProp-70 and of SWAT-70 - meProp-70 lies above +1 pt"),
    Claim("topk-nchw-vs-chw", "Top-K over the whole tensor (nchw) >= per sample / filter (chw), SAW 70 %",
          (Comparison("saw-70", "saw-70-chw", -0.5),), "the 95 % CI of nchw - chw lies above -0.5 pt"),
    Claim("topk-chw-vs-hw", "chw > hw (per sample and channel), SAW 70 %",
          (Comparison("saw-70-chw", "saw-70-hw", 0.0),), "the 95 % CI of chw - hw lies above 0"),
    Claim("topk-hw-vs-random", "hw >> random selection, SAW 70 %",
          (Comparison("saw-70-hw", "saw-70-random", 1.0),), "the 95 % CI of hw - random lies above +1 pt"),
    Claim("caching-harmless", "Threshold caching is harmless (refresh every 20 / 100 steps vs every step, SWAT 70 %)",
          (Comparison("swat-70-r20", "swat-70", -0.5), Comparison("swat-70-r100", "swat-70", -0.5)),
          "the 95 % CI of refresh-N - refresh-1 lies above -0.5 pt for N = 20 and 100"),
    Claim("erk-vs-uniform", "ERK budget >= uniform at 90 % (SWAT)",
          (Comparison("swat-90-erk", "swat-90", -0.5),), "the 95 % CI of ERK - uniform lies above -0.5 pt"),
    # not the paper's claim but this project's: blocks buy speed (see the sparse backend) and
    # should cost little accuracy
    Claim("blocks-vs-unstructured", "Blocks of 4 output channels cost less than 1 pt against unstructured "
          "SWAT at 70 % (this project's claim)",
          (Comparison("swat-70-b4", "swat-70", -1.0),), "the 95 % CI of SWAT-70 blocks of 4 - SWAT-70 lies "
          "above -1.0 pt"),
)


def _combine(verdicts: list[str]) -> str:
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    if any(v == "contradicted" for v in verdicts):
        return "contradicted"
    return "inconclusive"


def verdicts(runs: dict[str, dict[str, Any]], claims: Sequence[Claim] = CLAIMS) -> list[dict[str, Any]]:
    """One dict per claim: id, text, rule, verdict, and per comparison n, mean, CI, verdict."""
    out = []
    for cl in claims:
        rows = []
        for c in cl.comparisons:
            diffs = paired(runs, c.a, c.b)
            mean, lo, hi = interval([d for _, d in diffs])
            rows.append({"a": c.a, "b": c.b, "rule": c.rule(), "n": len(diffs), "seeds": [s for s, _ in diffs],
                         "diffs": [d for _, d in diffs], "mean": mean, "low": lo, "high": hi,
                         "verdict": judge(lo, hi, c.bound, c.kind)})
        verdict = _combine([r["verdict"] for r in rows])
        if any(r["n"] < 2 for r in rows) and verdict != "contradicted":
            verdict = "inconclusive"
        out.append({"id": cl.id, "claim": cl.text, "rule": cl.rule, "verdict": verdict, "comparisons": rows})
    return out
