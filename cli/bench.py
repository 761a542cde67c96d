"""``swat bench``: format what :func:`swat_deploy.bench.bench` measured."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from training.errors import SwatError

from cli._app import _csv, app, handled


def _ints(value: str, what: str) -> list[int]:
    try:
        return [int(v) for v in _csv(value)]
    except ValueError:
        raise SwatError(f"{what} {value!r} is not a comma-separated list of integers; e.g. 1,64") from None


def _floats(value: str) -> list[float]:
    try:
        return [float(v) for v in _csv(value)]
    except ValueError:
        raise SwatError(f"--sweep-sparsities {value!r} is not a comma-separated list of numbers; e.g. 0.5,0.9") from None


@app.command(epilog="Example: swat bench runs/demo --batch-size 1,64 --threads 2 --layers")
@handled
def bench(
    target: Path = typer.Argument(..., help="run dir, sparse.safetensors or .onnx file"),
    batch_size: str = typer.Option("1", "--batch-size", help="comma-separated batch sizes, e.g. 1,64"),
    threads: int = typer.Option(2, help="threads for every engine"),
    repeats: int = typer.Option(30, help="timed rounds per batch size (cut to a time budget)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    layers: bool = typer.Option(False, "--layers", help="per-layer table: chosen kernel vs dense"),
    sweep: bool = typer.Option(False, "--sweep", help="re-prune to several sparsities and plot speed-up"),
    sweep_sparsities: str = typer.Option("0.5,0.7,0.8,0.9,0.95,0.98", "--sweep-sparsities"),
    sweep_out: Optional[Path] = typer.Option(None, "--sweep-out", help="PNG path (default next to TARGET)"),
) -> None:
    """Time dense torch, onnxruntime float32 and int8, swat's sparse Session and TorchScript on the same inputs."""
    from swat_deploy.bench import bench as run_bench

    png = None
    if sweep:
        png = sweep_out or ((target if target.is_dir() else target.parent) / "bench_sweep.png")
    report = run_bench(target, _ints(batch_size, "--batch-size"), threads, repeats=repeats, layers=layers,
                       sweep=sweep, sweep_sparsities=_floats(sweep_sparsities), sweep_png=png)
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=1))
        return
    from swat_deploy.bench import format_report

    typer.echo(format_report(report))
