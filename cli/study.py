"""``swat study``: the paper's claims tested with seeds and 95 % confidence intervals (resumable)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli._app import Names, app, handled, names


@app.command(epilog="Example: nice -n 19 swat study --preset resnet20 --jobs 2   (rerun the same command to "
                    "continue; add --report-only to rebuild the report from runs.jsonl)")
@handled
def study(
    preset: str = typer.Option("lenet5", help="resnet20 (hours) | lenet5 (quick) | tiny (seconds, checks the machinery)"),
    jobs: int = typer.Option(2, help="runs at a time, each with 1 torch thread"),
    out: Optional[Path] = typer.Option(None, help="where runs.jsonl and the figures go (default docs/study/PRESET)"),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="scratch run dirs (default runs/study/PRESET)"),
    report: Optional[Path] = typer.Option(None, help="report file (default docs/RESULTS_PRESET.md)"),
    report_only: bool = typer.Option(False, "--report-only", help="train nothing; rebuild report and figures"),
    only: Optional[Names] = typer.Option(None, parser=names, metavar="KEY[,KEY...]",
                                         help="comma-separated configuration keys, e.g. 'dense,swat-70'"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="start no new run after N minutes"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="where the data set files are"),
) -> None:
    """Train every configuration x seed of a preset not yet in runs.jsonl, then write the report.

    Verdicts (holds / contradicted / inconclusive) are findings about the paper, not failures:
    the exit status is 0 whenever the study ran.
    """
    from training.study import preset as get_preset, run_study, write_report

    p = get_preset(preset)
    out = out or Path("docs/study") / p.name
    if not report_only:
        run_study(p, out, runs_dir or Path("runs/study") / p.name, jobs=jobs,
                  data_dir=str(data_dir) if data_dir else None, only=list(only) if only else None,
                  max_minutes=max_minutes, log=typer.echo)
    path, lines = write_report(p, out, report or Path(f"docs/RESULTS_{p.name}.md"))
    for line in lines:
        typer.echo(line)
    typer.echo(f"report: {path}")
