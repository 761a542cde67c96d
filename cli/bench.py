"""``swat bench``: format what :func:`swat_deploy.bench.bench` measured."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cli._app import Floats, Ints, app, floats, handled, ints


@app.command(epilog="Example: swat bench runs/demo --batch-size 1,64 --threads 2 --layers")
@handled
def bench(
    target: Path = typer.Argument(..., help="run dir, sparse.safetensors or .onnx file"),
    batch_size: Ints = typer.Option("1", "--batch-size", parser=ints, metavar="N[,N...]",
                                    help="comma-separated batch sizes, e.g. 1,64"),
    threads: int = typer.Option(2, help="threads for every engine"),
    repeats: int = typer.Option(30, help="timed rounds per batch size (cut to a time budget)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    layers: bool = typer.Option(False, "--layers", help="per-layer table: chosen kernel vs dense"),
    sweep: bool = typer.Option(False, "--sweep", help="re-prune to several sparsities and plot speed-up"),
    sweep_sparsities: Floats = typer.Option("0.5,0.7,0.8,0.9,0.95,0.98", "--sweep-sparsities", parser=floats,
                                            metavar="S[,S...]", help="sparsities for --sweep"),
    sweep_out: Optional[Path] = typer.Option(None, "--sweep-out", help="PNG path (default next to TARGET)"),
) -> None:
    """Time dense torch, onnxruntime float32 and int8, swat's sparse Session and TorchScript on the same inputs."""
    from swat_deploy.bench import bench as run_bench

    png = None
    if sweep:
        png = sweep_out or ((target if target.is_dir() else target.parent) / "bench_sweep.png")
    report = run_bench(target, list(batch_size), threads, repeats=repeats, layers=layers,
                       sweep=sweep, sweep_sparsities=list(sweep_sparsities), sweep_png=png)
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=1))
        return
    from swat_deploy.bench import format_report

    typer.echo(format_report(report))
