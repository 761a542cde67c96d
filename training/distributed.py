"""Training on several processes or machines with torch DDP, SWAT intact.

Everything that crosses a process boundary goes through ``torch.distributed`` (gloo on CPU, nccl
on GPU) and :class:`~torch.nn.parallel.DistributedDataParallel`; nothing here invents its own
communication. Two ways in, one worker body:

* ``swat train ... --nproc N`` (:func:`launch`, called by :mod:`training.launch`): this machine
  starts N processes with ``torch.multiprocessing.start_processes`` (spawn), each with the same
  ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` variables torchrun
  sets; torch watches them and, when one dies (exception, NaN, signal), terminates the others.
  The first cause is raised here as one :class:`SwatError` line.
* ``torchrun --nnodes M --nproc-per-node N -m cli train ...`` (:func:`init_from_env`): each
  process finds torchrun's variables and joins the group; torchrun's agent ends all workers
  when one fails.

The training worker body (one rank of ``swat train``) is :func:`training.launch.train_worker`;
this module knows nothing of the Trainer.

What stays identical on every rank, and why (checked, see :func:`check_identical`):

* weights and momentum: DDP all-reduces the dense ``grad_W`` the SWAT autograd Functions
  return, so every rank takes the same SGD step, hence the same TopK(W) masks;
* BatchNorm running statistics: BN normalises with per-rank batch statistics (SyncBatchNorm is
  GPU-only in torch, and one code path on CPU and GPU keeps runs comparable); after each step
  the running mean / var are averaged over ranks (:func:`sync_step`), i.e. the running
  estimate follows the mean of the global batch instead of rank 0's shard;
* cached activation thresholds: each rank selects TopK of its own activations (Top-K is per
  mini-batch, so per-rank is the natural unit) and, on a refresh step, the cached threshold
  becomes the mean over ranks, just as a single process caches the mean over the samples of its
  batch. Between refreshes every rank applies that same threshold to its own activations.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from training.errors import BAD_INPUT, FAILED, KINDS, SwatError, option
from training.fileio import sha256_tensors

TIMEOUT_ENV = "SWAT_DIST_TIMEOUT"
CHECK_ENV = "SWAT_DIST_CHECK"
DEFAULT_TIMEOUT_S = 600.0
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the group; passed to the Trainer instead of globals."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ------------------------------------------------------------------------------ group setup
def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (or anything that sets its variables)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def timeout_seconds() -> float:
    """Backstop for a rank that hangs without dying: every collective gives up after this."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise SwatError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds; e.g. {TIMEOUT_ENV}=600")
    return value


def _device_for(device_name: str, local_rank: int, world_size: int) -> torch.device:
    if device_name not in ("auto", "cpu", "cuda"):
        raise SwatError(f"invalid device {device_name!r}; choose one of: auto, cpu, cuda")
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SwatError(f"{option('device')} cuda requested but no CUDA device is available; use "
                        f"{option('device')} cpu or auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise SwatError(f"local rank {local_rank} needs GPU {local_rank} but this machine has {count} "
                        f"(nccl wants one GPU per process); start at most {count} processes per machine "
                        f"or use {option('device')} cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init(device_name: str, rank: int, world_size: int, local_rank: int) -> DistContext:
    """Join the group described by the ``MASTER_ADDR`` / ``MASTER_PORT`` environment (env://)."""
    device = _device_for(device_name, local_rank, world_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_seconds()))
    return DistContext(rank, world_size, local_rank, device, backend)


def init_from_env(device_name: str) -> DistContext:
    """Join the group torchrun set up for this process."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise SwatError("RANK / WORLD_SIZE / LOCAL_RANK are not integers; start the run with torchrun "
                        f"or with {option('nproc')} N") from None
    return init(device_name, rank, world, local)


def shutdown() -> None:
    """Leave the group once every rank is done (success path only).

    The barrier first: a rank that tears gloo down while a peer still talks to it can abort at
    interpreter exit ("terminate called without an active exception").
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ data sharding
def check_world(batch_size: int, world_size: int, n_train: int | None = None) -> None:
    """The batch size is the global batch: it must split evenly, so every rank runs the same steps."""
    if world_size < 1:
        raise SwatError(f"{option('nproc')} {world_size} must be >= 1")
    if batch_size % world_size:
        lo = max(world_size, batch_size // world_size * world_size)
        raise SwatError(f"{option('batch_size')} {batch_size} is the global batch and must be divisible by the "
                        f"{world_size} processes; use {option('batch_size')} {lo} or {lo + world_size}")
    if n_train is not None and n_train < world_size:
        raise SwatError(f"{n_train} training samples cannot feed {world_size} processes; "
                        f"use fewer processes or more data ({option('limit')})")


def shard_order(order: torch.Tensor, batch_size: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's samples of one seeded epoch permutation, in step order.

    Global batch ``b`` is ``order[b*B:(b+1)*B]`` exactly as in one process; rank ``r`` takes
    its ``r``-th contiguous slice of it (B / world samples). The last ``len % world`` samples
    of the permutation (a different few each epoch) are dropped so every rank runs the same
    number of equally sized steps: DDP's mean of per-rank mean losses is then the global mean.
    """
    if world_size == 1:
        return order
    n = len(order) - len(order) % world_size
    order = order[:n]
    full = n // batch_size * batch_size
    local = batch_size // world_size
    head = order[:full].reshape(-1, world_size, local)[:, rank].reshape(-1)
    tail = order[full:].reshape(world_size, -1)[rank]
    return torch.cat([head, tail])


def shard_range(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Contiguous slice of ``range(n)`` for sharded evaluation."""
    return torch.tensor_split(torch.arange(n), world_size)[rank]


def rank_seed(seed: int, rank: int) -> int:
    """Augmentation seed of ``rank`` from the epoch seed: own stream per rank, replayable on resume."""
    return (seed * 6364136223846793005 + (rank + 1) * 1442695040888963407) % (2**63 - 1)


# ------------------------------------------------------------------------------ collectives
def all_reduce_sum(values: Sequence[float], ctx: DistContext) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_floats(values: Sequence[float], ctx: DistContext) -> list[list[float]]:
    t = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    out = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def broadcast_bytes(data: Optional[bytes], ctx: DistContext, src: int = 0) -> bytes:
    """Send raw bytes from ``src`` to every rank (a checkpoint, an error message): no pickle."""
    n = torch.tensor([len(data) if ctx.rank == src and data is not None else 0], dtype=torch.int64,
                     device=ctx.device)
    dist.broadcast(n, src)
    size = int(n.item())
    if ctx.rank == src:
        buf = torch.frombuffer(bytearray(data or b""), dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        buf = buf.to(ctx.device)
    else:
        buf = torch.empty(size, dtype=torch.uint8, device=ctx.device)
    if size:
        dist.broadcast(buf, src)
    return bytes(buf.cpu().numpy().tobytes())


def run_on_main(fn: Callable[[], Any], ctx: DistContext) -> None:
    """Run ``fn`` on rank 0 only; if it fails, every rank raises the same error (no rank hangs)."""
    message, kind = b"", BAD_INPUT
    if ctx.is_main:
        try:
            fn()
        except SwatError as e:
            message, kind = e.template.encode(), e.kind
        except OSError as e:
            message, kind = f"rank 0: {e}".encode(), FAILED
    reply = broadcast_bytes(bytes([KINDS.index(kind)]) + message if message else b"", ctx)
    if reply:
        raise SwatError(reply[1:].decode(), KINDS[reply[0]])


# ------------------------------------------------------------------------------ per-step sync
def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            out += [b for b in (m.running_mean, m.running_var) if b is not None]
    return out


def _refreshed_thresholds(model: nn.Module) -> list[nn.Module]:
    """SWAT layers whose activation threshold was recomputed in the step just taken."""
    from training.swatify import swat_layers

    out = []
    for _, m in swat_layers(model):
        thr = m.swat_threshold
        if thr is not None and thr.numel() and m.swat_step >= 1 and (m.swat_step - 1) % m.swat_refresh_every == 0:
            out.append(m)
    return out


def sync_step(model: nn.Module, loss_finite: bool, ctx: DistContext) -> list[int]:
    """One all-reduce after backward: which ranks saw a non-finite loss, BN stats, thresholds.

    Returns the ranks whose loss was not finite (empty when all is well; then BN running stats
    and freshly refreshed activation thresholds have been replaced by their mean over ranks).
    """
    bufs = _bn_buffers(model)
    layers = _refreshed_thresholds(model)
    thrs = [m.swat_threshold for m in layers]
    flags = torch.zeros(ctx.world_size, dtype=torch.float32, device=ctx.device)
    if not loss_finite:
        flags[ctx.rank] = 1.0
    flat = torch.cat([flags] + [t.detach().reshape(-1).float() for t in bufs + thrs])
    dist.all_reduce(flat)
    bad = [r for r in range(ctx.world_size) if flat[r].item() > 0]
    if bad:
        return bad
    flat = flat[ctx.world_size:] / ctx.world_size
    offset = 0
    with torch.no_grad():
        for t in bufs:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        for m in layers:
            t = m.swat_threshold
            m.swat_threshold = flat[offset:offset + t.numel()].view_as(t).to(t.dtype).clone()
            offset += t.numel()
    return []


def no_forward_buffer_sync() -> dict[str, bool]:
    """DDP keyword that keeps the init-time sync but skips broadcasting buffers every forward."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def state_digest(model: nn.Module) -> bytes:
    """SHA-256 of the weights, buffers and SWAT state (steps, cached thresholds, RNG), by name."""
    from training.swatify import swat_state_dict

    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"swat/{k}": v for k, v in swat_state_dict(model).items()})
    return bytes.fromhex(sha256_tensors(tensors))


def check_identical(model: nn.Module, ctx: DistContext, where: str) -> None:
    """Gather every rank's :func:`state_digest`; raise on all ranks if any differs from rank 0's."""
    mine = torch.frombuffer(bytearray(state_digest(model)), dtype=torch.uint8).to(ctx.device)
    out = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(out, mine)
    differ = [r for r, d in enumerate(out) if not torch.equal(d, out[0])]
    if differ:
        raise SwatError(f"ranks {differ} hold different weights / SWAT state than rank 0 {where}; the "
                        f"processes diverged (mixed torch versions or non-deterministic kernels?) - "
                        f"report this with the command you ran", FAILED)


def checks_every_step() -> bool:
    """Test mode (``SWAT_DIST_CHECK=1``): compare every rank's state digest after every step."""
    return os.environ.get(CHECK_ENV, "") not in ("", "0")


# ------------------------------------------------------------------------------ the spawn launcher
# Starting, watching and stopping the processes is torch's (``torch.multiprocessing.start_processes``:
# spawn, parent-death signal, on the first failure SIGTERM then SIGKILL to the rest). What is ours is
# one small outcome file per rank - rank 0's result, or a failure's message and kind - so that a
# failure reads as one SwatError line instead of a child's traceback.
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_status(status_dir: str, rank: int, payload: dict[str, Any]) -> None:
    from training.fileio import atomic_write_json

    atomic_write_json(Path(status_dir) / f"rank{rank}.json", dict(payload, time=time.time()))


def _read_status(status_dir: str, rank: int) -> Optional[dict[str, Any]]:
    try:
        return json.loads((Path(status_dir) / f"rank{rank}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _child(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, status_dir: str,
           threads: int, device_name: str) -> None:
    """Body of one spawned rank: torchrun's environment, the group, ``fn``, an outcome file."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    code = 1  # the exit status only tells torch's watcher "failed"; the outcome file says why
    try:
        ctx = init(device_name, rank, world_size, rank)
        result = fn(ctx, *args)
        _write_status(status_dir, rank, {"ok": True, "result": result})
        shutdown()
        return
    except SwatError as e:
        _write_status(status_dir, rank, {"ok": False, "message": e.template, "kind": e.kind})
    except KeyboardInterrupt:  # Ctrl-C, or torch's parent-death signal (SIGINT)
        code = 130
        _write_status(status_dir, rank, {"ok": False, "message": "interrupted", "kind": FAILED})
    except BaseException as e:  # a bug or a broken peer: keep the traceback for the user
        traceback.print_exc()
        _write_status(status_dir, rank, {"ok": False, "message": f"{type(e).__name__}: {e}", "kind": FAILED})
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no atexit / group teardown that could wait on a dead peer


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code} without a message"


@contextlib.contextmanager
def _quiet_torch_watcher() -> Iterator[None]:
    """torch logs a warning per rank it terminates; the failure is reported as one line instead."""
    logger = logging.getLogger("torch.multiprocessing.spawn")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def launch(fn: Callable[..., Any], nproc: int, *args: Any, device: str = "cpu",
           threads: Optional[int] = None) -> Any:
    """Run ``fn(ctx, *args)`` on ``nproc`` local processes; return rank 0's (JSON-able) result.

    When a process fails or dies, the others are terminated at once and the first cause is
    raised as a :class:`SwatError` (its kind kept), so the caller never waits on a hang.
    ``fn`` must be importable (a module-level function): children are started with spawn.
    """
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    if nproc < 1:
        raise SwatError(f"{option('nproc')} {nproc} must be >= 1")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // nproc)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="swat-ddp-") as status_dir, _quiet_torch_watcher():
        procs = mp.start_processes(_child, args=(nproc, port, fn, args, status_dir, threads, device),
                                   nprocs=nproc, join=False, start_method="spawn")
        try:
            while not procs.join():
                pass
        except ProcessException as e:
            raise _failure(procs.processes, e.error_index, status_dir, nproc) from None
        finally:  # the caller was interrupted (Ctrl-C): no rank outlives the launcher
            for p in procs.processes:
                if p.is_alive():
                    p.terminate()
            for p in procs.processes:
                p.join()
        status = _read_status(status_dir, 0)
        if not status or not status.get("ok"):
            raise SwatError(f"rank 0 finished without a result; rerun (status: {status})", FAILED)
        return status.get("result")


def _failure(procs: list, first: int, status_dir: str, nproc: int) -> SwatError:
    """The root cause: a rank that died without a word (killed), else the earliest message.

    ``first`` is the rank torch saw fail first; the ranks torch terminated afterwards (SIGTERM)
    are effects, not causes.
    """
    def silent(r: int) -> bool:
        code = procs[r].exitcode
        return code not in (None, 0) and not _read_status(status_dir, r) and (r == first or code != -signal.SIGTERM)

    dead = [r for r in [first] + list(range(nproc)) if silent(r)]
    if dead:
        r = dead[0]
        return SwatError(f"rank {r} of {nproc} {_describe_exit(procs[r].exitcode)}; stopped the other ranks", FAILED)
    notes = sorted((s["time"], r, s) for r in range(nproc)
                   if (s := _read_status(status_dir, r)) and not s.get("ok"))
    if not notes:
        return SwatError(f"rank {first} of {nproc} failed without a message; rerun", FAILED)
    _, r, s = notes[0]
    message = s["message"]
    if not message.startswith("rank "):
        message = f"rank {r} of {nproc}: {message}"
    kind = s.get("kind")
    return SwatError(message, kind if kind in KINDS else FAILED)
