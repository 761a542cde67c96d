"""``swat study``: the paper's claims tested with seeds and confidence intervals.

One module per job: :mod:`.configurations` (presets and the configurations each claim needs),
:mod:`.runner` (resumable, ``jobs`` runs at a time) with :mod:`.worker` (one run per process)
and :mod:`.store` (``runs.jsonl``), :mod:`.verdicts` (paired t intervals -> holds /
contradicted / inconclusive), :mod:`.reduction` (compute reduction from recorded sparsity),
:mod:`.figures` and :mod:`.report` (regenerated from ``runs.jsonl`` alone).
"""
from __future__ import annotations

from training.study.configurations import PRESETS, Config, Preset, preset, runs_of
from training.study.runner import command, run_study
from training.study.store import load as load_runs
from training.study.verdicts import CLAIMS

__all__ = ["PRESETS", "Config", "Preset", "preset", "runs_of", "command", "run_study", "load_runs", "CLAIMS",
           "write_report"]


def write_report(*args, **kwargs):  # noqa: ANN002, ANN003 - see training.study.report.write_report
    from training.study.report import write_report as _w
    return _w(*args, **kwargs)
