"""One study run in its own process: ``python -m training.study.worker SPEC.json``.

A separate process per run gives each run exactly one torch thread and lets the study run two
at a time.  The run trains with :class:`training.trainer.Trainer` exactly as ``swat train`` with
the same options does (the recorded command); the only difference is that the per-epoch test
evaluation is skipped (it does not touch the weights, the RNG or the SWAT state - the final
evaluation on the full test set is the result), which saves a 10k-image pass per epoch.

The worker follows its parent: when the study process is stopped (SIGSTOP, e.g. while a
benchmark runs) the worker pauses at its next step; when the parent dies the worker exits and
the run is redone on the next start.  Step times are recorded per step (wall and CPU), and the
median is reported, so pauses do not inflate them.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["main", "run"]


class _ParentWatch:
    """Pause while the parent is stopped; exit if it is gone."""

    def __init__(self) -> None:
        self.ppid = os.getppid()
        self.stat = Path(f"/proc/{self.ppid}/stat")

    def _state(self) -> str:
        try:
            text = self.stat.read_text()
            return text[text.rindex(")") + 2]
        except (OSError, ValueError, IndexError):
            return "?"

    def check(self) -> None:
        if os.getppid() != self.ppid:
            os._exit(3)  # orphaned: the study was killed; its next start redoes this run
        while self._state() in ("T", "t"):
            time.sleep(0.5)
            if os.getppid() != self.ppid:
                os._exit(3)


def _layer_records(trainer: Any, history: list[dict[str, Any]], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Per prunable layer: forward MACs per sample and the recorded weight / activation /
    gradient sparsity (means over the training epochs)."""
    from training import measure

    import models
    import torch

    info, cfg = trainer.info, trainer.config
    with torch.device("meta"):  # the plain architecture: shapes only, no SWAT work
        plain = models.build(cfg.model, num_classes=info.num_classes, in_channels=info.in_channels, **cfg.model_cfg)
    costs = {c.name: c for c in measure.trace_layers(plain, (info.in_channels, *info.image_size))}
    fo = spec["train"].get("forward_only", "")
    out = []
    from torch import nn

    for name, m in trainer.model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        per_epoch = [row["layers"].get(name) for row in history if row.get("layers")]
        per_epoch = [p for p in per_epoch if p]

        def mean(field: str) -> Any:
            vals = [p[field] for p in per_epoch if p.get(field) is not None]
            return sum(vals) / len(vals) if vals else None

        rec: dict[str, Any] = {"name": name, "macs": costs[name].macs if name in costs else None,
                               "weight_numel": m.weight.numel()}
        if per_epoch:
            rec.update(mode=per_epoch[-1]["mode"], weight_sparsity=per_epoch[-1]["weight_sparsity"],
                       weight_sparsity_train=mean("weight_sparsity_train_mean"),
                       act_sparsity=mean("act_sparsity_mean"), grad_sparsity=mean("grad_sparsity_mean"))
        elif fo and hasattr(m, "fo_sparsity"):
            rec.update(mode=f"forward-{fo}", nominal_sparsity=m.fo_sparsity)
        else:
            rec.update(mode="dense")
        out.append(rec)
    return out


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the run ``spec`` describes and return its result record (also written to the run dir)."""
    import torch

    torch.set_num_threads(int(spec.get("threads", 1)))
    from training.config import TrainConfig
    from training.errors import SwatError
    from training.fileio import atomic_write_json
    from training.trainer import Trainer

    run_dir = Path(spec["run_dir"])
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)  # a run killed mid-way is redone from scratch
    run_dir.mkdir(parents=True)
    cfg = TrainConfig(**spec["train"])
    trainer = Trainer(cfg, run_dir, log=lambda line: None, progress=False)
    watch = _ParentWatch() if spec.get("follow_parent") else None
    nan = float("nan")
    trainer.evaluate_test = lambda: {"accuracy": nan, "loss": nan, "n": 0}  # type: ignore[method-assign]
    steps_wall: list[float] = []
    steps_cpu: list[float] = []
    last = [time.perf_counter(), time.process_time()]

    def pre_step(opt: Any, args: Any, kwargs: Any) -> None:
        if watch is not None:
            watch.check()

    def post_step(opt: Any, args: Any, kwargs: Any) -> None:
        now = (time.perf_counter(), time.process_time())
        steps_wall.append(now[0] - last[0])
        steps_cpu.append(now[1] - last[1])
        last[0], last[1] = now
        if watch is not None:
            watch.check()
            last[0], last[1] = time.perf_counter(), time.process_time()

    if watch is not None:  # every forward (training and evaluation batches) checks the parent too
        trainer.model.register_forward_pre_hook(lambda m, args: watch.check())
    trainer.optimizer.register_step_pre_hook(pre_step)
    trainer.optimizer.register_step_post_hook(post_step)
    warnings.filterwarnings("ignore")
    t0, c0 = time.perf_counter(), time.process_time()
    error = None
    acc = None
    try:
        last[0], last[1] = time.perf_counter(), time.process_time()
        result = trainer.fit()
        acc = result.test_accuracy
    except SwatError as e:  # a diverged run is a result (meProp at high sparsity), not a crash
        error = str(e)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    history = trainer.history
    skip = min(len(steps_wall) // 10, 5)  # the first steps pay for JIT compilation and caches
    rec: dict[str, Any] = {
        "key": spec["key"], "seed": cfg.seed, "config": spec["config"], "preset": spec["preset"],
        "test_accuracy": acc, "test_n": len(trainer.test_ds), "train_n": len(trainer.train_ds),
        "error": error,
        "epochs": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()
                    if k in ("epoch", "lr", "loss", "train_accuracy", "seconds")} for r in history],
        "layers": _layer_records(trainer, history, spec),
        "steps": len(steps_wall),
        "step_seconds_median": statistics.median(steps_wall[skip:]) if steps_wall[skip:] else None,
        "step_cpu_seconds_median": statistics.median(steps_cpu[skip:]) if steps_cpu[skip:] else None,
        "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
        "command": spec["command"], "run_dir": str(run_dir), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    atomic_write_json(run_dir / "study_result.json", rec)
    return rec


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    run(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
