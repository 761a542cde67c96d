"""The Trainer: SWAT training with per-epoch evaluation, metrics, checkpoints and resume.

Determinism is by construction, not by saving generator states: the data order, augmentation
and every other random draw of epoch ``e`` come from generators seeded with ``(seed, e)``. A run
killed mid-epoch and resumed from the last checkpoint therefore replays exactly the same epoch
and ends with bit-identical weights on CPU.
"""
from __future__ import annotations


import json
import math
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training import data as datasets
from training import distributed as ddp
from training import sparse_choices
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.errors import FAILED, SwatError, option
from training.evaluation import evaluate, iterate_batches
from training.fileio import (HASH_SCHEME, atomic_write_json, atomic_write_text, load_tensors,
                             save_tensors, sha256_tensors)
from training.progress import EpochProgress, Logger, print_logger
from training.resume_rules import check_resume_epochs
from training.rundir import (CHECKPOINT, METRICS, RUN_FORMAT_VERSION, RUN_JSON, SWAT_STATE, WEIGHTS,
                             build_model, read_metrics)
from training.schedule import lr_at
from training.swatify import layer_stats, layer_table, load_swat_state_dict, swat_state_dict
from training.version import SWAT_VERSION

@dataclass
class TrainResult:
    run_dir: Path
    test_accuracy: float
    seconds: float
    meta: dict[str, Any]
    is_main: bool = True  # False on the other ranks of a distributed run (they write nothing)


def epoch_seed(seed: int, epoch: int) -> int:
    """Independent, reproducible stream per (seed, epoch); large odd multiplier avoids overlaps."""
    return (seed * 1_000_003 + epoch * 7919 + 12345) % (2**63 - 1)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SwatError(f"{option('device')} cuda requested but no CUDA device is available; use "
                        f"{option('device')} cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


SMALL_IMAGE = 32  # largest side for which ImageNet-layout families get their CIFAR stem/head


def _adapt_to_image_size(config: TrainConfig, image_size: tuple[int, int]) -> TrainConfig:
    """Small images get the CIFAR stem/head unless the user set ``model_cfg`` themselves.

    A stride-4 ImageNet stem turns a 32x32 image into 8x8 before the first block, which wastes
    most of resnet18's capacity; the choice is written to run.json with the rest of the config,
    so export/verify rebuild the same network.
    """
    import models

    if config.model_cfg or max(image_size) > SMALL_IMAGE:
        return config
    cfg = models.small_input_cfg(config.model)
    return replace(config, model_cfg=cfg) if cfg else config


class Trainer:
    """Owns one run: data, model, optimizer and the run dir it writes.

    With ``dist`` (one rank of a DDP group, see :mod:`training.distributed`) the model is wrapped
    in DistributedDataParallel, each rank trains on its shard of the global batch, and only rank 0
    writes; ``check_every_step`` compares every rank's weights + SWAT state after each step.
    """

    def __init__(self, config: TrainConfig, out: str | Path, *, log: Logger = print_logger,
                 progress: bool | None = None, is_main: bool = True, dist: ddp.DistContext | None = None,
                 check_every_step: bool = False) -> None:
        self.dist = dist
        if dist is not None:
            is_main = dist.is_main
        self.config = config.validate()
        self.out = Path(out)
        self.log = log if is_main else (lambda line: None)
        self.progress = progress if is_main else False
        self.is_main = is_main
        self.device = dist.device if dist is not None else resolve_device(config.device)
        options = {"limit": config.limit} if config.limit else {}
        self.train_ds = datasets.load(config.dataset, "train", config.data_dir, **options)
        self.test_ds = datasets.load(config.dataset, "test", config.data_dir)
        self.info = self.train_ds.info
        self.config = config = _adapt_to_image_size(self.config, self.info.image_size)
        torch.manual_seed(config.seed)
        self.model = build_model(config, self.info.num_classes, self.info.in_channels).to(self.device)
        self.net: nn.Module = self.model  # what the training step calls: the model, or its DDP wrapper
        if dist is not None:
            ddp.check_world(int(config.batch_size), dist.world_size, len(self.train_ds))
            # buffers are not broadcast from rank 0 each forward: BN running stats are averaged
            # over ranks after each step instead (ddp.sync_step), so every rank holds the same
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                **ddp.no_forward_buffer_sync())
        self.check_every_step = check_every_step and dist is not None
        self.steps_checked = 0
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.start_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.seconds_before = 0.0  # training time of earlier sessions of this run (resume)
        self.seconds_done = 0.0  # ... and up to the last finished epoch of this one
        self.epoch_changes: list[dict[str, int]] = []  # --resume --epochs N extensions, for run.json

    # -- resume ---------------------------------------------------------------------------
    def restore(self, checkpoint: str | Path | None = None, epochs: int | None = None) -> None:
        """Continue from RUN/checkpoint.safetensors; the epoch in flight when it died is redone.

        ``checkpoint``: read this copy instead (a rank on another machine gets rank 0's bytes).
        ``epochs``: train to this many epochs instead of the run's (at least the epochs done);
        the change is recorded in run.json's ``epoch_changes``.
        """
        ckpt = Path(checkpoint) if checkpoint is not None else self.out / CHECKPOINT
        if not ckpt.is_file():
            raise SwatError(f"{self.out} has no {CHECKPOINT} to resume from; start a new run in another "
                            f"{option('out')}")
        header, swat = load_checkpoint(ckpt, self.model, self.optimizer)
        load_swat_state_dict(self.model, {k: v.to(self.device) for k, v in swat.items()})
        sparse_choices.pin(header.get("sparse_products"))  # the killed run's kernel choices, exactly
        try:
            self.start_epoch = int(header["epoch"])
            changes = list(header.get("epoch_changes") or [])
            seconds = header.get("train_seconds")
        except (KeyError, TypeError, ValueError):
            raise SwatError(f"{ckpt} has a damaged header (no epoch); it cannot be resumed - start a new run "
                            f"in another {option('out')}") from None
        self.epoch_changes = [c for c in changes if isinstance(c, dict)]
        if epochs is not None and epochs != self.config.epochs:
            check_resume_epochs(epochs, self.start_epoch, self.config.epochs, self.out)
            self.epoch_changes.append({"after_epoch": self.start_epoch, "from": self.config.epochs, "to": epochs})
            self.log(f"changing the run's length from {self.config.epochs} to {epochs} epochs after epoch "
                     f"{self.start_epoch} (recorded in run.json as epoch_changes)")
            self.config = replace(self.config, epochs=epochs)
        bad: list[int] = []
        rows = read_metrics(self.out, bad)
        if bad and self.is_main:
            self.log(f"warning: {self.out / METRICS} line(s) {', '.join(map(str, bad[:5]))} are not JSON rows; "
                     f"skipped them and kept the {len(rows)} valid rows")
        # metrics written after the checkpoint (a killed epoch) are dropped and redone
        self.history = [r for r in rows if r["epoch"] <= self.start_epoch]
        # time of the earlier sessions: the checkpoint's own count, else the epochs' sum (older runs)
        self.seconds_before = float(seconds) if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) \
            else float(sum(r.get("seconds", 0.0) for r in self.history if isinstance(r.get("seconds"), (int, float))))
        if self.is_main:
            atomic_write_text(self.out / METRICS, "".join(json.dumps(r) + "\n" for r in self.history))
        self.seconds_done = self.seconds_before
        self.log(f"resuming {self.out} after epoch {self.start_epoch}/{self.config.epochs}")

    # -- one epoch ------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.config
        lr = lr_at(cfg, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        seed = epoch_seed(cfg.seed, epoch)
        torch.manual_seed(seed)  # any global draw inside SWAT layers (random Top-K) is replayable
        gen = torch.Generator().manual_seed(seed)
        order = self.epoch_order(gen)
        aug_gen, batch = gen, int(cfg.batch_size)
        if self.dist is not None:  # same permutation on every rank; each takes its slice of every batch
            order = ddp.shard_order(order, batch, self.dist.rank, self.dist.world_size)
            batch //= self.dist.world_size
            aug_gen = torch.Generator().manual_seed(ddp.rank_seed(seed, self.dist.rank))
        self.model.train()
        n_batches = math.ceil(len(order) / batch)
        bar = EpochProgress(n_batches, f"epoch {epoch + 1}/{cfg.epochs}", enabled=self.progress)
        loss_sum, correct, seen = 0.0, 0, 0
        for i, (x, y) in enumerate(iterate_batches(self.train_ds, order, batch, cfg.workers)):
            x = datasets.augment(self.info, x, aug_gen)
            x, y = datasets.normalize(x.to(self.device), self.info), y.to(self.device)
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
            finite = bool(torch.isfinite(loss))
            if not finite and self.dist is None:
                bar.close()
                raise SwatError(f"loss became {loss.item()} at epoch {epoch + 1} batch {i + 1}; lower "
                                f"{option('lr')} (now {cfg.lr}) or the sparsity and start a new run; {self._kept(epoch)}",
                                kind=FAILED)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.dist is not None:
                # every rank learns here whether any rank's loss blew up, so all stop together
                bad = ddp.sync_step(self.model, finite, self.dist)
                if bad:
                    bar.close()
                    raise SwatError(f"loss became non-finite on rank {', '.join(map(str, bad))} of "
                                    f"{self.dist.world_size} at epoch {epoch + 1} batch {i + 1}; lower "
                                    f"{option('lr')} (now {cfg.lr}) or the sparsity, or check that rank's data; "
                                    f"{self._kept(epoch)}", kind=FAILED)
            self.optimizer.step()
            if self.check_every_step:
                ddp.check_identical(self.model, self.dist, f"after epoch {epoch + 1} step {i + 1}")
                self.steps_checked += 1
            loss_sum += loss.item() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum().item()
            seen += y.numel()
            bar.update(i + 1, loss_sum / seen)
        bar.close()
        if self.dist is not None:
            loss_sum, correct, seen = ddp.all_reduce_sum([loss_sum, correct, seen], self.dist)
        return {"lr": lr, "loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)}

    def _kept(self, epoch: int) -> str:
        """What a failed epoch leaves behind, for its error message (``epoch``: 0-based, failed)."""
        if epoch == 0 or not (self.out / CHECKPOINT).is_file():
            return "no checkpoint was written (it failed in the first epoch)"
        return (f"the checkpoint after epoch {epoch} is kept, but resuming replays the same steps; "
                f"use it only to inspect the run")

    def epoch_order(self, gen: torch.Generator) -> torch.Tensor:
        return torch.randperm(len(self.train_ds), generator=gen)

    def evaluate_test(self) -> dict[str, Any]:
        """Per-epoch test metrics; distributed, each rank scores its slice and the sums are added."""
        if self.dist is None:
            return evaluate(self.model, self.test_ds, self.info, self.device)
        d = self.dist
        part = evaluate(self.model, self.test_ds, self.info, self.device,
                        indices=ddp.shard_range(len(self.test_ds), d.rank, d.world_size))
        loss_sum, correct, n = ddp.all_reduce_sum([part["loss_sum"], part["correct"], part["n"]], d)
        return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "n": int(n)}

    # -- the whole run --------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg = self.config
        started = time.perf_counter()
        for epoch in range(self.start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            row = self.train_epoch(epoch)
            if self.dist is not None:  # cheap insurance before a checkpoint is written from rank 0
                ddp.check_identical(self.model, self.dist, f"after epoch {epoch + 1}")
            test = self.evaluate_test()
            row = {"epoch": epoch + 1, **row, "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                   "seconds": round(time.perf_counter() - t0, 3), "layers": layer_stats(self.model)}
            self.history.append(row)
            # training time so far, all sessions: the checkpoint carries it, so a resume (even of
            # a finished run) continues the count instead of restarting it
            self.seconds_done = round(self.seconds_before + time.perf_counter() - started, 3)
            if self.is_main:
                with open(self.out / METRICS, "a") as f:
                    f.write(json.dumps(row) + "\n")
                save_checkpoint(self.out / CHECKPOINT, self.model, self.optimizer, swat_state_dict(self.model),
                                {"epoch": epoch + 1, "config": cfg.to_json(),
                                 "train_seconds": self.seconds_done,
                                 "epoch_changes": self.epoch_changes,
                                 "sparse_products": sparse_choices.used()})
            self.log(f"epoch {epoch + 1:3d}/{cfg.epochs}  lr {row['lr']:.4g}  loss {row['loss']:.4f}  "
                     f"train {row['train_accuracy']:.4f}  test {row['test_accuracy']:.4f}  "
                     f"({row['seconds']:.1f}s)")
        return self.finish(self.seconds_done)

    def finish(self, seconds: float) -> TrainResult:
        """Final evaluation in inference form, then the files every later stage reads."""
        cfg = self.config
        final = evaluate(self.model, self.test_ds, self.info, self.device)
        meta: dict[str, Any] = {}
        if self.dist is not None:
            # every rank evaluated its own (identical) copy: the saved model is any rank's model
            ddp.check_identical(self.model, self.dist, "at the end of training")
            scores = ddp.all_gather_floats([final["accuracy"], final["loss"]], self.dist)
            if any(s != scores[0] for s in scores):
                raise SwatError(f"ranks disagree on the final evaluation ({scores}) although their weights "
                                f"match; report this with the command you ran", kind=FAILED)
            if self.check_every_step:
                self.log(f"sync check: weights, BN buffers and SWAT state identical on all "
                         f"{self.dist.world_size} ranks after each of {self.steps_checked} steps")

        def write() -> None:
            nonlocal meta
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            save_tensors(self.out / WEIGHTS, state, metadata={"producer": "swat", "model": cfg.model})
            save_tensors(self.out / SWAT_STATE, swat_state_dict(self.model))
            meta = self.run_json(final, seconds)
            atomic_write_json(self.out / RUN_JSON, meta)
            try:
                from training.plots import plot_run
                plot_run(self.out)
            except Exception as e:  # a plot must never cost the user a finished run
                self.log(f"warning: plots not written ({e})")
            self.log(f"done: test accuracy {final['accuracy']:.4f} on {final['n']} images; run dir {self.out}")

        if self.dist is not None:
            ddp.run_on_main(write, self.dist)  # a failed write on rank 0 ends every rank
        elif self.is_main:
            write()
        return TrainResult(self.out, final["accuracy"], seconds, meta, self.is_main)

    def run_json(self, final: dict[str, Any], seconds: float) -> dict[str, Any]:
        cfg, info = self.config, self.info
        return {
            "format_version": RUN_FORMAT_VERSION,
            "producer": f"swat {SWAT_VERSION}",
            "model": cfg.model,
            "dataset": cfg.dataset,
            "num_classes": info.num_classes,
            "in_channels": info.in_channels,
            "image_size": list(info.image_size),
            "mode": cfg.mode,
            "sparsity": cfg.sparsity,
            "topk": cfg.topk,
            "block": cfg.block,
            "epochs": cfg.epochs,
            "seed": cfg.seed,
            "test_accuracy": final["accuracy"],
            "test_loss": final["loss"],
            "test_samples": final["n"],
            "train_accuracy_last_epoch": self.history[-1]["train_accuracy"] if self.history else None,
            "normalization": {"mean": list(info.mean), "std": list(info.std)},
            "class_names": list(info.class_names),
            "layers": layer_table(self.model),
            "weights": WEIGHTS,
            "weights_sha256": sha256_tensors(load_tensors(self.out / WEIGHTS)[0]),
            "weights_hash": HASH_SCHEME,  # a hash of the tensors (name, dtype, shape, data), not the file
            "train_seconds": round(seconds, 2),
            **({"epoch_changes": self.epoch_changes} if self.epoch_changes else {}),
            "world_size": self.dist.world_size if self.dist is not None else 1,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "config": cfg.to_json(),
        }
