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
    load = ", ".join(f"{v:.2f}" for v in report.load)
    from swat_deploy.cpu import describe

    typer.echo(f"{report.model}  ({report.target})  weight sparsity {report.sparsity:.3f}  "
               f"FLOP ideal {report.ideal:.2f}x  threads {report.threads}  load avg {load}")
    typer.echo(f"CPU: {describe(report.cpu)}")
    if report.int8_source:
        typer.echo(f"onnxruntime-int8: {report.int8_source}")
    typer.echo(f"{'engine':<16} {'batch':>5} {'median ms':>10} {'img/s':>10} {'vs ORT':>7} {'vs int8':>7} {'rounds':>6}")
    for r in report.results:
        ratio = "" if r.vs_onnxruntime is None else f"{r.vs_onnxruntime:.2f}x"
        ratio8 = "" if r.vs_onnxruntime_int8 is None else f"{r.vs_onnxruntime_int8:.2f}x"
        plan = f"  ({r.plan})" if r.plan else ""
        typer.echo(f"{r.engine:<16} {r.batch:>5} {r.median_ms:>10.3f} {r.throughput:>10.1f} {ratio:>7} {ratio8:>7} "
                   f"{r.repeats:>6}{plan}")
    if report.layers:
        typer.echo("")
        typer.echo(f"{'layer':<34} {'weight':<16} {'input':<16} {'sparsity':>8} {'kernel':<11} "
                   f"{'dense us':>9} {'ours us':>9} {'speedup':>7} {'ideal':>6}")
        for l in report.layers:
            typer.echo(f"{l.name[-34:]:<34} {'x'.join(map(str, l.weight_shape)):<16} "
                       f"{'x'.join(map(str, l.input_shape or [])):<16} {l.sparsity:>8.3f} {l.kernel:<11} "
                       f"{l.dense_us:>9.1f} {l.chosen_us:>9.1f} {l.speedup:>6.2f}x {l.ideal:>5.1f}x")
    if report.sweep:
        typer.echo("")
        typer.echo(f"{'sparsity':>8} {'batch':>5} {'ORT ms':>9} {'swat ms':>9} {'speedup':>7} {'ideal':>6}")
        for p in report.sweep:
            plan = f"  ({p.plan})" if p.plan else ""
            typer.echo(f"{p.sparsity:>8.2f} {p.batch:>5} {p.onnxruntime_ms:>9.3f} {p.swat_ms:>9.3f} "
                       f"{p.speedup:>6.2f}x {p.ideal:>5.1f}x{plan}")
    if report.sweep_png:
        typer.echo(f"wrote {report.sweep_png}")
    for note in report.notes:
        typer.echo(f"note: {note}")
