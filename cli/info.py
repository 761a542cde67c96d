"""``swat info``: layers, sparsity, storage and metadata of an exported file or a run dir."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli._app import app, handled
from training.errors import SwatError


@app.command(epilog="Example: swat info runs/demo/model.onnx   (or: swat info runs/demo, swat info --models)")
@handled
def info(
    target: Optional[Path] = typer.Argument(None, help="exported .onnx / .pt file, or a run dir"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    models: bool = typer.Option(False, "--models", help="list the model architectures and exit"),
) -> None:
    """Show per-layer shape, sparsity, storage format and bytes, and the embedded metadata."""
    if models:
        import models as registry

        typer.echo("\n".join(registry.names()))
        return
    if target is None:
        raise SwatError("missing FILE or RUN; e.g. `swat info runs/demo/model.onnx` or `swat info --models`")
    from swat_deploy.info import format_info, info as info_of, info_json

    items = info_of(target)
    typer.echo(info_json(items) if json_out else format_info(items))
