"""Distributed training (torch DDP over gloo, 2 CPU processes): sharding, failure handling, SWAT sync.

The spawned helpers below are module-level so ``torch.multiprocessing`` (spawn) can import them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from training import distributed as ddp
from training.config import TrainConfig
from training.errors import FAILED, SwatError
from training.fileio import load_tensors

from conftest import run_swat, swat_env

ENV = swat_env()
LIMIT = "600"  # digits samples for the quick runs: 2 epochs in a few seconds on 2 busy cores


def swat(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run_swat(*args, env=env or ENV, check=check)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_tensors(run / "model.safetensors")[0]


# ----------------------------------------------------------------------------- sharding (no processes)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_rebuild_each_global_batch_of_the_seeded_permutation(world: int) -> None:
    batch, n = 6, 23
    order = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    shards = [ddp.shard_order(order, batch, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1, "every rank must run the same number of samples"
    kept = n - n % world
    local = batch // world
    steps = [[s[i:i + local] for i in range(0, len(s), local)] for s in shards]
    assert len({len(st) for st in steps}) == 1
    rebuilt = torch.cat([torch.cat([steps[r][i] for r in range(world)]) for i in range(len(steps[0]))])
    # step i of all ranks together is exactly global batch i of the one-process order (same samples)
    assert torch.equal(rebuilt, order[:kept])
    for i in range(len(steps[0])):
        assert torch.equal(torch.cat([steps[r][i] for r in range(world)]), order[i * batch:min((i + 1) * batch, kept)])


def test_batch_size_must_split_over_the_processes() -> None:
    with pytest.raises(SwatError, match="`batch_size` 32 or 34"):
        ddp.check_world(33, 2)
    with pytest.raises(SwatError, match="cannot feed"):
        ddp.check_world(4, 4, n_train=3)
    ddp.check_world(32, 2, n_train=100)


# ----------------------------------------------------------------------------- launcher, failures
def _collectives(ctx: ddp.DistContext) -> dict:
    total = ddp.all_reduce_sum([ctx.rank + 1.0], ctx)[0]
    blob = ddp.broadcast_bytes(b"from rank 0 \x00\xff" if ctx.is_main else None, ctx)
    gathered = ddp.all_gather_floats([float(ctx.rank)], ctx)
    return {"rank": ctx.rank, "world": ctx.world_size, "sum": total, "blob": blob.hex(), "gathered": gathered,
            "backend": ctx.backend, "threads": torch.get_num_threads(), "env": [os.environ["RANK"], os.environ["WORLD_SIZE"]]}


def _fail_on_rank1(ctx: ddp.DistContext, how: str) -> None:
    if ctx.rank == 1:
        time.sleep(0.5)  # rank 0 is waiting in the collective below by now
        if how == "raise":
            raise SwatError("rank 1 found a broken shard; fix the data", FAILED)
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # would wait for the dead rank until the group timeout without the launcher
    time.sleep(60)


def test_launch_runs_torchrun_style_ranks_and_returns_rank0_result() -> None:
    res = ddp.launch(_collectives, 2)
    assert res["rank"] == 0 and res["world"] == 2 and res["backend"] == "gloo"
    assert res["sum"] == 3.0 and bytes.fromhex(res["blob"]) == b"from rank 0 \x00\xff"
    assert res["gathered"] == [[0.0], [1.0]] and res["env"] == ["0", "2"]
    assert res["threads"] == max(1, (os.cpu_count() or 1) // 2)


@pytest.mark.parametrize("how,needle", [
    ("raise", "rank 1 found a broken shard; fix the data"),
    ("kill", "rank 1 of 2 was killed by SIGKILL; stopped the other ranks"),
])
def test_a_failing_rank_ends_all_ranks_with_its_message(how: str, needle: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(SwatError) as e:
        ddp.launch(_fail_on_rank1, 2, how)
    assert needle in str(e.value) and e.value.kind == FAILED
    assert time.perf_counter() - t0 < 45, "the surviving rank was not stopped promptly"


def _nan_on_rank1(ctx: ddp.DistContext) -> None:
    from training.trainer import Trainer

    # dense mode: this is about the failure path, and it spares the children the SWAT kernel warm-up
    cfg = TrainConfig(model="lenet5", dataset="digits", mode="dense", epochs=1, batch_size=16, limit=64, seed=1)
    trainer = Trainer(cfg, Path("/nonexistent-run-dir"), dist=ctx, log=lambda s: None)
    if ctx.rank == 1:  # one machine's copy of the data is damaged
        trainer.train_ds.images = torch.full(trainer.train_ds.images.shape, float("nan"))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    try:
        trainer.train_epoch(0)
    finally:  # the bad step was not taken: the weights are those of the last good step
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


@pytest.mark.slow  # two ranks in subprocesses (5 s); the single-process NaN stop is in the default suite
def test_nan_loss_on_one_rank_stops_every_rank_before_the_step() -> None:
    with pytest.raises(SwatError) as e:
        ddp.launch(_nan_on_rank1, 2)
    assert "loss became non-finite on rank 1 of 2 at epoch 1 batch 1" in str(e.value), str(e.value)
    assert e.value.kind == FAILED


def _diverge_on_rank1(ctx: ddp.DistContext) -> None:
    from training.swatify import swatify

    torch.manual_seed(0)
    model = swatify(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)),
                    sparsity=0.5)
    ddp.check_identical(model, ctx, "at start")  # same seed, same model: passes
    if ctx.rank == 1:
        with torch.no_grad():
            model[1].running_mean[3] += 1e-6  # one buffer element, one ulp-ish change
    ddp.check_identical(model, ctx, "after the change")


def test_state_check_catches_a_one_element_difference() -> None:
    with pytest.raises(SwatError, match=r"ranks \[1\] hold different weights / SWAT state than rank 0 after the change"):
        ddp.launch(_diverge_on_rank1, 2)


# ----------------------------------------------------------------------------- the real command
@pytest.fixture(scope="module")
def two_proc_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("ddp") / "run"
    env = dict(ENV, SWAT_DIST_CHECK="1")
    proc = swat("train", "--model", "lenet5", "--dataset", "digits", "--epochs", "2", "--limit", LIMIT,
                "--schedule", "constant", "--lr", "0.05", "--seed", "0", "--nproc", "2", "--out", str(run), env=env)
    return run, proc


def test_two_processes_keep_every_rank_identical_and_write_once(two_proc_run) -> None:
    run, proc = two_proc_run
    steps = 2 * (int(LIMIT) // 32 + 1)  # global batch 32 (digits default); 600 = 18 full + 1 partial
    assert f"identical on all 2 ranks after each of {steps} steps" in proc.stdout
    assert proc.stdout.count(f"-> {run}") == 1 and proc.stdout.count("epoch   1/2") == 1, proc.stdout
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    meta = json.loads((run / "run.json").read_text())
    assert meta["world_size"] == 2 and meta["config"]["batch_size"] == 32
    assert rows[-1]["test_accuracy"] == meta["test_accuracy"] > 0.2  # chance is 0.1; accuracy: the slow test


@pytest.mark.slow  # a 2-process run dir is the same format (checked above); export / verify of it: ~15 s
def test_two_process_run_dir_exports_and_verifies(two_proc_run) -> None:
    run, _ = two_proc_run
    swat("export", str(run), "--format", "onnx")
    report = json.loads(swat("verify", str(run), "--json").stdout)
    assert report["passed"] and report["agreement"] == 1.0
    assert report["exported_accuracy"] == pytest.approx(report["train_accuracy"], abs=1e-3)


@pytest.mark.slow  # ~15 s; resuming with --nproc is also covered, bit for bit, by the slow test below
def test_resume_distributed_continues_the_run(two_proc_run, tmp_path: Path) -> None:
    run, _ = two_proc_run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("checkpoint.safetensors", "metrics.jsonl"):
        (copy / name).write_bytes((run / name).read_bytes())
    proc = subprocess.run([sys.executable, "-c", "from training.launch import resume; import sys; "
                           f"r = resume(sys.argv[1], epochs=3, nproc=2); print('acc', r.test_accuracy)", str(copy)],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout and "epoch   3/3" in proc.stdout and "epoch   1/3" not in proc.stdout
    assert [json.loads(l)["epoch"] for l in (copy / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((copy / "run.json").read_text())["epochs"] == 3


def test_nproc_bad_usage_is_one_line(tmp_path: Path) -> None:
    proc = swat("train", "--batch-size", "33", "--nproc", "2", "--epochs", "1", "--out", str(tmp_path / "x"),
                check=False)
    assert proc.returncode == 2 and "divisible" in proc.stderr and "Traceback" not in proc.stderr
    from training.launch import train

    with pytest.raises(SwatError, match="`nproc` 0 must be an integer >= 1"):
        train(TrainConfig(epochs=1), tmp_path / "y", nproc=0)
    assert not (tmp_path / "y").exists()


# ----------------------------------------------------------------------------- slow: resume, torchrun, accuracy
@pytest.mark.slow
def test_distributed_resume_is_bit_identical(two_proc_run, tmp_path: Path) -> None:
    run, _ = two_proc_run
    straight = tmp_path / "straight"
    swat("train", "--model", "lenet5", "--dataset", "digits", "--epochs", "3", "--limit", LIMIT, "--schedule",
         "constant", "--lr", "0.05", "--seed", "0", "--nproc", "2", "--out", str(straight))
    cont = tmp_path / "cont"
    cont.mkdir()
    (cont / "checkpoint.safetensors").write_bytes((run / "checkpoint.safetensors").read_bytes())
    proc = subprocess.run([sys.executable, "-c", "from training.launch import resume; import sys; "
                           "resume(sys.argv[1], epochs=3, nproc=2)", str(cont)], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    a, b = weights(straight), weights(cont)
    assert all(torch.equal(a[k], b[k]) for k in a), "2 epochs + resume to 3 differs from 3 straight epochs"


@pytest.mark.slow
def test_torchrun_entry_point(tmp_path: Path) -> None:
    run = tmp_path / "tr"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "cli", "train", "--model", "lenet5", "--dataset", "digits", "--epochs", "1",
                           "--limit", "200", "--out", str(run)], capture_output=True, text=True,
                          env=dict(ENV, SWAT_DIST_CHECK="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"-> {run}") == 1 and "identical on all 2 ranks" in proc.stdout
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    # a process that torchrun started must not spawn ranks of its own
    env = dict(ENV, RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    bad = swat("train", "--nproc", "2", "--out", str(tmp_path / "bad"), env=env, check=False)
    assert bad.returncode == 2 and "leave --nproc out" in bad.stderr, bad.stderr


@pytest.mark.slow
def test_two_processes_match_one_process_accuracy(tmp_path: Path) -> None:
    common = ["train", "--model", "lenet5", "--dataset", "digits", "--mode", "swat", "--sparsity", "0.7",
              "--epochs", "15", "--batch-size", "32", "--seed", "0"]
    swat(*common, "--out", str(tmp_path / "one"))
    swat(*common, "--nproc", "2", "--out", str(tmp_path / "two"))
    one = json.loads((tmp_path / "one" / "run.json").read_text())["test_accuracy"]
    two = json.loads((tmp_path / "two" / "run.json").read_text())["test_accuracy"]
    assert abs(one - two) <= 0.01, (one, two)
