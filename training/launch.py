"""Start a training run: in this process, on N local processes, or as one rank under torchrun.

:func:`train` (a new run) and :func:`resume` (continue from the last checkpoint) are what
``swat train`` calls. Why its own module: the :class:`~training.trainer.Trainer` runs one
process's training; choosing how many processes run it, and checking a resume before any work,
sit above it and above :mod:`training.distributed` (the DDP machinery), so neither imports the
other's caller.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from training import distributed as ddp
from training.checkpoint import checkpoint_config, checkpoint_header
from training.config import TrainConfig
from training.errors import BAD_INPUT, SwatError, option
from training.fileio import check_writable_dir
from training.progress import Logger, print_logger
from training.resume_rules import RESUME_MAY_CHANGE, check_resume_epochs, resume_config
from training.rundir import CHECKPOINT, prepare_out_dir
from training.trainer import Trainer, TrainResult

__all__ = ["train", "resume", "train_worker"]


def _from_worker(res: dict[str, Any]) -> TrainResult:
    return TrainResult(Path(res["run_dir"]), float(res["test_accuracy"]), float(res["seconds"]), res["meta"] or {},
                       bool(res.get("is_main", True)))


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads for the block (None: leave torch's own choice), then restored.

    Why a knob: torch takes every core by default, and on a machine shared with another busy
    process a LeNet-5 step at 2 threads took 7x its 1-thread time.
    """
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise SwatError(f"{option('threads')} {threads!r} must be an integer >= 1 (torch threads per process)")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_nproc(nproc: int) -> None:
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise SwatError(f"{option('nproc')} {nproc!r} must be an integer >= 1 (the number of training processes)")
    if nproc != 1 and ddp.launched_by_torchrun():
        raise SwatError(f"{option('nproc')} starts processes itself, but this process was started by torchrun; "
                        f"leave {option('nproc')} out (torchrun's --nproc-per-node sets the count)")


def train(config: TrainConfig, out: str | Path, *, force: bool = False, log: Logger = print_logger,
          progress: bool | None = None, nproc: int = 1, threads: int | None = None) -> TrainResult:
    """``swat train``: a new run in ``out`` (refuses a non-empty dir unless ``force``).

    ``nproc > 1`` trains on that many local processes (DDP; ``config.batch_size`` is the global
    batch); under torchrun this process is one rank of torchrun's group. Spawned ranks print
    their own log lines (``log`` is used in this process only). ``threads``: torch intra-op
    threads per process (None: torch's default in one process, cores / nproc when spawning).
    """
    config.validate()
    _check_nproc(nproc)
    with _torch_threads(threads):
        if ddp.launched_by_torchrun():
            spec = {"config": config.to_json(), "out": str(out), "force": force, "progress": progress}
            return _from_worker(_run_from_env(spec, config.device, log))
        created = not Path(out).exists()
        if nproc > 1:
            ddp.check_world(int(config.batch_size), nproc)
            out = prepare_out_dir(out, force)
            spec = {"config": config.to_json(), "out": str(out), "prepared": True, "progress": progress}
            with _remove_if_left_empty(out, created):
                return _from_worker(_spawn(spec, nproc, config.device, threads))
        out = prepare_out_dir(out, force)
        with _remove_if_left_empty(out, created):
            trainer = Trainer(config, out, log=log, progress=progress)
            return trainer.fit()


@contextlib.contextmanager
def _remove_if_left_empty(out: Path, created: bool) -> Iterator[None]:
    """A run that fails before writing anything (data set missing, loss NaN in the first epoch)
    leaves no empty dir behind - only one this call created."""
    try:
        yield
    except BaseException:
        if created:
            try:
                out.rmdir()  # only succeeds when empty
            except OSError:
                pass
        raise


def resume(run_dir: str | Path, *, log: Logger = print_logger, progress: bool | None = None,
           epochs: int | None = None, nproc: int = 1, block: int | None = None,
           given: Mapping[str, Any] | None = None, threads: int | None = None) -> TrainResult:
    """``swat train --resume RUN``: continue from the last checkpoint (optionally to more epochs).

    A run may be resumed with another ``nproc`` than it started with (the global batch stays).
    ``block``: what the caller asked for (None: the run's own); another value than the run was
    trained with is refused - the weights' zero pattern cannot change block size midway.
    ``epochs``: train to N epochs (>= those done; recorded in run.json's ``epoch_changes``).
    ``given``: other TrainConfig fields the user set explicitly, checked by :func:`resume_config`.
    ``threads``: as for :func:`train` (not part of the run: may differ from the first part's).
    """
    _check_nproc(nproc)
    with _torch_threads(threads):
        return _resume(run_dir, log, progress, epochs, nproc, block, given, threads)


def _resume(run_dir: str | Path, log: Logger, progress: bool | None, epochs: int | None, nproc: int,
            block: int | None, given: Mapping[str, Any] | None, threads: int | None) -> TrainResult:
    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINT
    given = dict(given or {})
    if ckpt.is_file():  # every check before any work (torchrun ranks without the file skip them)
        header = checkpoint_header(ckpt)
        cfg = resume_config(checkpoint_config(ckpt), given, run_dir)
        if epochs is not None:
            check_resume_epochs(epochs, int(header.get("epoch", 0)), cfg.epochs, run_dir)
        check_writable_dir(run_dir, "run dir")
    updates = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}
    spec = {"resume": True, "out": str(run_dir), "epochs": epochs, "progress": progress, "updates": updates}
    trained = checkpoint_config(ckpt).block if block is not None and ckpt.is_file() else block
    if block != trained:
        raise SwatError(f"{run_dir} was trained with {option('block')} {trained}; resume it with {option('block')} "
                        f"{trained} (or without {option('block')}), or start a new run in another "
                        f"{option('out')} for {option('block')} {block}")
    if ddp.launched_by_torchrun():  # rank 0 reads the checkpoint and sends it to the others
        device = checkpoint_config(ckpt).device if ckpt.is_file() else "auto"
        return _from_worker(_run_from_env(spec, updates.get("device", device), log))
    if not ckpt.is_file():
        raise SwatError(f"no {CHECKPOINT} in {run_dir}; nothing to resume (start a run with {option('out')} {run_dir})")
    if nproc > 1:
        ddp.check_world(int(cfg.validate().batch_size), nproc)
        return _from_worker(_spawn(spec, nproc, cfg.device, threads))
    trainer = Trainer(cfg, run_dir, log=log, progress=progress)
    trainer.restore(epochs=epochs)
    return trainer.fit()


# ------------------------------------------------------------------------------ one rank
def train_worker(ctx: ddp.DistContext, spec: dict[str, Any], log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """One rank of ``swat train`` (new run or resume); returns rank 0's result as JSON."""
    out = Path(spec["out"])
    ckpt_tmp: Optional[str] = None
    try:
        if spec.get("resume"):
            ckpt = out / CHECKPOINT

            def read() -> None:
                if not ckpt.is_file():
                    raise SwatError(f"no {CHECKPOINT} in {out}; nothing to resume (start a run with "
                                    f"{option('out')} {out})")
            ddp.run_on_main(read, ctx)
            # rank 0's bytes go to every rank: other machines need no shared file system
            blob = ddp.broadcast_bytes(ckpt.read_bytes() if ctx.is_main else None, ctx)
            if not ctx.is_main:
                fd, ckpt_tmp = tempfile.mkstemp(prefix="swat-ckpt-", suffix=".safetensors")
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                ckpt = Path(ckpt_tmp)
            cfg = checkpoint_config(ckpt)
            if spec.get("updates"):  # --workers / --device / --data-dir given with --resume
                cfg = dataclasses.replace(cfg, **spec["updates"]).validate()
            trainer = Trainer(cfg, out, log=log or print_logger, progress=spec.get("progress"), dist=ctx,
                              check_every_step=ddp.checks_every_step())
            trainer.restore(ckpt, epochs=spec.get("epochs"))
        else:
            cfg = TrainConfig.from_json(spec["config"])
            if not spec.get("prepared"):
                ddp.run_on_main(lambda: prepare_out_dir(out, bool(spec.get("force"))), ctx)
            trainer = Trainer(cfg, out, log=log or print_logger, progress=spec.get("progress"), dist=ctx,
                              check_every_step=ddp.checks_every_step())
        result = trainer.fit()
    finally:
        if ckpt_tmp:
            os.unlink(ckpt_tmp)
    return {"run_dir": str(result.run_dir), "test_accuracy": result.test_accuracy, "seconds": result.seconds,
            "meta": result.meta, "is_main": ctx.is_main}


def _run_from_env(spec: dict[str, Any], device_name: str, log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """torchrun entry: this process is one rank; torchrun ends the others if it fails."""
    ctx = ddp.init_from_env(device_name)
    result = train_worker(ctx, spec, log)
    ddp.shutdown()
    return result


def _spawn(spec: dict[str, Any], nproc: int, device: str = "auto", threads: int | None = None) -> dict[str, Any]:
    """``swat train --nproc N``: the training worker on N local processes."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):  # fail before spawning
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < nproc:
            raise SwatError(f"{option('nproc')} {nproc} on {option('device')} {device} needs {nproc} GPUs (nccl "
                            f"wants one per process), this machine has {count}; use {option('nproc')} "
                            f"{max(count, 1)} or {option('device')} cpu")
    try:
        return ddp.launch(train_worker, nproc, spec, device=device, threads=threads)
    except SwatError as e:
        if e.kind == BAD_INPUT or not (Path(spec["out"]) / CHECKPOINT).is_file():
            raise
        raise SwatError(f"{e.template}; the last checkpoint is kept - resume it with {option('resume')} "
                        f"{spec['out']} {option('nproc')} {nproc}", e.kind) from None
