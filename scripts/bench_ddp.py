"""Training step time on 1 process vs N processes (torch DDP over gloo), same global batch.

    python scripts/bench_ddp.py                    # lenet5/digits b32 and resnet20/synthetic b64, 3 rounds
    python scripts/bench_ddp.py --rounds 5 --cases resnet20

Method: every measurement is the real Trainer (SWAT layers, for DDP also the gradient all-reduce
and the per-step BN / threshold / NaN-flag all-reduce) in fresh spawned processes: epoch 0 warms
up (numba kernels, allocator), epoch 1 is timed on rank 0 between two barriers and divided by
its number of steps. Configurations per case:

    1p x C threads   one process using every core (the usual single-process run)
    1p x 1 thread    one process, one core
    Np x C/N threads N DDP processes (2 on this 2-core machine: one thread each)

The configurations take turns round by round (interleaved, so load from other processes hits
all alike); the figure is the median over rounds, with speed-ups against ``1p x C`` and ``1p x 1``. Startup
(imports, data loading, process group) is excluded: it is a fixed cost per run, not per step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from training import distributed as ddp  # noqa: E402

CASES = {
    "lenet5": {"model": "lenet5", "dataset": "digits", "batch_size": 32},
    "resnet20": {"model": "resnet20", "dataset": "synthetic", "batch_size": 64},
}


def _measure(ctx: ddp.DistContext, case: dict, distributed: bool) -> dict:
    from training.config import TrainConfig
    from training.trainer import Trainer

    cfg = TrainConfig(mode="swat", sparsity=0.7, epochs=2, seed=0, device="cpu", **case)
    trainer = Trainer(cfg, Path("/nonexistent"), log=lambda s: None, dist=ctx if distributed else None)
    trainer.train_epoch(0)
    dist.barrier()
    t0 = time.perf_counter()
    trainer.train_epoch(1)
    dist.barrier()
    seconds = time.perf_counter() - t0
    n = len(trainer.train_ds)
    if distributed:
        n -= n % ctx.world_size
    steps = -(-n // int(cfg.batch_size))
    return {"step_ms": 1000 * seconds / steps, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    configs = [(f"1p x {cores} threads", 1, cores, False), ("1p x 1 thread", 1, 1, False),
               (f"{args.nproc}p x {max(1, cores // args.nproc)} thread(s) DDP", args.nproc,
                max(1, cores // args.nproc), True)]
    print(f"cores {cores}, load average before: {os.getloadavg()}")
    for name in args.cases.split(","):
        case = CASES[name]
        times: dict[str, list[float]] = {c[0]: [] for c in configs}
        for r in range(args.rounds):
            for label, nproc, threads, distributed in configs:
                res = ddp.launch(_measure, nproc, case, distributed, threads=threads)
                times[label].append(res["step_ms"])
                print(f"  {name} round {r + 1} {label:<28} {res['step_ms']:8.2f} ms/step ({res['steps']} steps)",
                      flush=True)
        base = statistics.median(times[configs[0][0]])
        one = statistics.median(times[configs[1][0]])
        print(f"{name} (global batch {case['batch_size']}), median of {args.rounds} rounds "
              f"(speed-up = time of the reference / time of the row):")
        for label, *_ in configs:
            med = statistics.median(times[label])
            print(f"  {label:<28} {med:8.2f} ms/step   x{base / med:5.2f} vs 1p x {cores} threads   "
                  f"x{one / med:5.2f} vs 1p x 1 thread")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
