"""The ``swat`` command: parse, call one library function, print.

Exit codes: 0 success, 1 a failed check (verify) or a failed run, 2 bad usage / bad input.
Library errors (:class:`training.errors.SwatError`) become one line on stderr, never a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from training.errors import SwatError

from cli._app import Names, app, exit_code, handled, layer_sparsity as parse_layer_sparsity, message, names


@app.command(epilog="Example: swat train --model lenet5 --dataset digits --mode swat --sparsity 0.7 --epochs 15 --seed 0 --out runs/demo   "
             "(blocks of 4 output channels: add --block 4; 2 processes: add --nproc 2; several machines: "
             "torchrun --nnodes 2 --nproc-per-node 4 ... -m cli train ...)")
@handled
def train(
    ctx: typer.Context,
    model: str = typer.Option("lenet5", help="architecture (see `swat info --models`)"),
    dataset: str = typer.Option("digits", help="digits | fashion-mnist | mnist | cifar10 | cifar100 | imagefolder | synthetic"),
    mode: str = typer.Option("swat", help="dense | swat | saw | meprop"),
    sparsity: float = typer.Option(0.7, help="fraction of zeros in [0, 1) (the paper's Top-K % is 1 - s)"),
    topk: str = typer.Option("nchw", help="Top-K grouping: nchw | chw | hw | random"),
    refresh_every: int = typer.Option(1, "--refresh-every", help="recompute activation Top-K thresholds every N steps"),
    refresh_weights: bool = typer.Option(False, "--refresh-weights", help="cache the weight Top-K threshold for "
                                         "--refresh-every steps too, as the paper's code does (default: exact "
                                         "weight Top-K every step)"),
    forward_only: Optional[str] = typer.Option(None, "--forward-only", help="weights | activations: sparse forward, "
                                               "dense backward (the paper's Fig. 2a ablation; with --mode dense)"),
    budget: str = typer.Option("uniform", help="per-layer sparsity budget: uniform | erk"),
    block: Optional[int] = typer.Option(None, "--block", help="B consecutive output channels share one weight "
                                        "zero pattern (Top-K over B x 1 block norms; swat / saw, topk nchw | chw "
                                        "| hw; a power of two; default 1 = unstructured)"),
    exclude: Optional[Names] = typer.Option(None, parser=names, metavar="NAME[,NAME...]",
                                            help="comma-separated layer names / globs kept dense, e.g. 'conv1,fc'"),
    layer_sparsity: List[tuple] = typer.Option([], "--layer-sparsity", parser=parse_layer_sparsity, metavar="NAME=S",
                                               help="per-layer override NAME=S (repeatable)"),
    epochs: int = typer.Option(15, help="training epochs"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="default: 32 for digits, 128 otherwise"),
    lr: float = typer.Option(0.1, help="initial learning rate (SGD, momentum 0.9)"),
    momentum: float = typer.Option(0.9),
    weight_decay: float = typer.Option(1e-4, "--weight-decay"),
    schedule: str = typer.Option("step", help="step (/10 at 50% and 75%) | thirds (/10 at 1/3 and 2/3, the shape "
                                 "of the paper's 50/100-of-150) | cosine | constant"),
    seed: int = typer.Option(0),
    workers: int = typer.Option(0, help="data loader worker processes (file-backed data sets)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="where data set files are"),
    limit: Optional[int] = typer.Option(None, help="train on the first N samples only (quick runs)"),
    out: Optional[Path] = typer.Option(None, help="run dir to create"),
    resume: Optional[Path] = typer.Option(None, help="continue the run dir from its last checkpoint"),
    force: bool = typer.Option(False, help="overwrite an existing --out run dir"),
    nproc: int = typer.Option(1, "--nproc", help="train on N local processes with torch DDP (gloo on CPU, nccl on "
                              "GPU); --batch-size stays the global batch. Several machines: run this command "
                              "under torchrun without --nproc"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads per training process "
                                          "(default: torch's own choice, all cores or OMP_NUM_THREADS; with "
                                          "--nproc N: cores / N). On a machine shared with other busy jobs, "
                                          "1 is often fastest"),
) -> None:
    """Train a model with SWAT and write a run dir (weights, run.json, metrics.jsonl, plots)."""
    from training.config import TrainConfig
    from training.launch import resume as resume_run, train as train_run

    settings = dict(model=model, dataset=dataset, data_dir=str(data_dir) if data_dir else None, mode=mode,
                    sparsity=sparsity, topk=topk, refresh_every=refresh_every,
                    cache_weight_threshold=refresh_weights, forward_only=forward_only or "", budget=budget,
                    exclude=tuple(exclude or ()), per_layer=dict(layer_sparsity), epochs=epochs,
                    batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                    schedule=schedule, seed=seed, workers=workers, device=device, limit=limit)
    if resume is not None:
        given = _given(ctx, settings)
        if out is not None and out.resolve() != resume.resolve():
            raise SwatError(f"--out {out} with --resume {resume}: a resumed run stays in its own dir; drop --out")
        if force:
            raise SwatError("--force does not apply to --resume (nothing is overwritten); drop --force, or start "
                            "a new run with --out RUN --force")
        result = resume_run(resume, nproc=nproc, block=block, epochs=given.pop("epochs", None), given=given,
                            threads=threads)
    else:
        if out is None:
            raise SwatError("missing --out RUN (the run dir to create); e.g. --out runs/demo")
        config = TrainConfig(block=1 if block is None else block, **settings)
        result = train_run(config, out, force=force, nproc=nproc, threads=threads)
    if result.is_main:  # under torchrun every rank runs this command; one summary line is enough
        typer.echo(f"test accuracy {result.test_accuracy:.4f}  ({result.seconds:.1f}s)  -> {result.run_dir}")


# CLI option -> TrainConfig field where the names differ
_FIELD_OF = {"refresh_weights": "cache_weight_threshold", "layer_sparsity": "per_layer"}


def _given(ctx: typer.Context, settings: dict) -> dict:
    """The TrainConfig fields whose options were typed on the command line (not defaults):
    with --resume each is checked against the run instead of being silently dropped."""
    given = {}
    for param, source in ((p.name, ctx.get_parameter_source(p.name)) for p in ctx.command.params):
        field = _FIELD_OF.get(param, param)
        # by name: typer >= 0.2x vendors click, whose ParameterSource is then another class
        if field in settings and getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT"):
            given[field] = settings[field]
    return given


@app.command(epilog="Example: swat export runs/demo --format onnx   (int8: add --int8)")
@handled
def export(
    run: Path = typer.Argument(..., help="run dir written by `swat train`"),
    format: str = typer.Option("onnx", "--format", help="onnx | torchscript"),
    out: Optional[Path] = typer.Option(None, help="file to write (default RUN/model.onnx or RUN/model.pt)"),
    force: bool = typer.Option(False, help="overwrite an existing file"),
    weights: str = typer.Option("sparse", "--weights", help="sparse (each layer in its smallest form) | dense"),
    fp16: bool = typer.Option(False, "--fp16", help="ONNX: store weights as float16 (compute stays float32)"),
    int8: bool = typer.Option(False, "--int8", help="ONNX: int8 QDQ model (default RUN/model.int8.onnx), "
                              "calibrated on the run's training images"),
    calib: Optional[int] = typer.Option(None, "--calib", help="--int8: calibration images (default 256)"),
) -> None:
    """Export the pruned model (normalisation inside, BN folded) to ONNX or TorchScript."""
    from swat_deploy.export import export as export_model

    path = export_model(run, format, out, force=force, weights=weights, fp16=fp16, int8=int8, calib=calib)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")


@app.command(epilog="Example: swat verify runs/demo --json")
@handled
def verify(
    run: Path = typer.Argument(..., help="run dir written by `swat train`"),
    model: Optional[Path] = typer.Option(None, help="exported file to check (default: every export in RUN)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="where the data set files are"),
    limit: Optional[int] = typer.Option(None, help="check only the first N test images (quick)"),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="an export recorded in RUN/exports.json "
                                       "but deleted since is listed, not failed"),
) -> None:
    """Check exported files against the run: integrity, exact weights, metadata, sparsity, accuracy,
    agreement. Every export written into RUN is expected. Exit 1 on failure."""
    from swat_deploy.verify import format_report, report_json, verify as verify_run

    report = verify_run(run, model, data_dir=str(data_dir) if data_dir else None, limit=limit,
                        allow_missing=allow_missing)
    typer.echo(report_json(report) if json_out else format_report(report))
    if not report.passed:
        raise typer.Exit(1)


@app.command(epilog="Example: swat prune runs/demo")
@handled
def prune(
    run: Path = typer.Argument(..., help="run dir written by `swat train`"),
    out: Optional[Path] = typer.Option(None, help="file to write (default RUN/sparse.safetensors)"),
    force: bool = typer.Option(False, help="overwrite an existing file"),
) -> None:
    """Write the sparse model (Top-K as trained, BN folded; CSR / BSR / dense per layer) and print its table."""
    from swat_deploy.prune import format_storage, prune as prune_run, save_sparse

    sm = prune_run(run)
    path, rows = save_sparse(sm, out, force=force)
    typer.echo(format_storage(rows))
    typer.echo(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")


# The other command groups, registered explicitly: importing a module adds its @app.command
# functions to the app (a new command module is added here).
from cli import bench, info, study  # noqa: E402,F401


def main() -> None:
    try:
        app()
    except SwatError as e:  # raised outside a command body (should not happen, but never a traceback)
        typer.echo(f"error: {message(e)}", err=True)
        sys.exit(exit_code(e))


if __name__ == "__main__":
    main()
