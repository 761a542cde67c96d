"""Trainer pieces: config, schedule, atomic files, checkpoints and bit-identical resume."""
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

from conftest import swat_env
from training.config import TrainConfig
from training.errors import SwatError
from training.fileio import atomic_write_bytes, load_tensors, save_tensors
from training.schedule import lr_at


def test_config_json_round_trip_and_version() -> None:
    cfg = TrainConfig(model="resnet20", exclude=("conv1",), per_layer={"fc": 0.5}, limit=10)
    again = TrainConfig.from_json(json.loads(json.dumps(cfg.to_json())))
    assert again == cfg
    with pytest.raises(SwatError, match="newer"):
        TrainConfig.from_json({**cfg.to_json(), "version": 99})
    with pytest.raises(SwatError, match="unknown config keys"):
        TrainConfig.from_json({**cfg.to_json(), "bogus": 1})


@pytest.mark.parametrize("field,value,needle", [
    ("sparsity", 1.0, "[0, 1)"), ("sparsity", -0.1, "[0, 1)"), ("mode", "sparse", "dense, swat, saw, meprop"),
    ("topk", "nhwc", "nchw"), ("epochs", 0, ">= 1"), ("lr", float("nan"), "finite"), ("budget", "x", "erk"),
])
def test_config_rejects_bad_values_naming_the_fix(field: str, value, needle: str) -> None:
    with pytest.raises(SwatError) as e:
        TrainConfig(**{field: value}).validate()
    assert needle in str(e.value)


def test_step_and_cosine_schedules() -> None:
    step = TrainConfig(lr=0.1, epochs=8, schedule="step")
    assert [round(lr_at(step, e), 6) for e in range(8)] == [0.1] * 4 + [0.01] * 2 + [0.001] * 2
    cos = TrainConfig(lr=0.1, epochs=4, schedule="cosine")
    assert lr_at(cos, 0) == pytest.approx(0.1) and lr_at(cos, 2) == pytest.approx(0.05)
    assert lr_at(cos, 3) < lr_at(cos, 2)


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(p, object())  # type: ignore[arg-type]  # fails mid-write
    assert p.read_bytes() == b"old"
    atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.bin"]


def test_safetensors_round_trip_and_damaged_file(tmp_path: Path) -> None:
    t = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.uint8)}
    save_tensors(tmp_path / "x.safetensors", t, {"k": "v"})
    back, meta = load_tensors(tmp_path / "x.safetensors")
    assert meta == {"k": "v"} and all(torch.equal(back[k], t[k]) for k in t)
    (tmp_path / "y.safetensors").write_bytes((tmp_path / "x.safetensors").read_bytes()[:20])
    with pytest.raises(SwatError, match="not a readable safetensors"):
        load_tensors(tmp_path / "y.safetensors")


def _swat(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


ARGS = ["train", "--model", "lenet5", "--dataset", "digits", "--mode", "swat", "--sparsity", "0.7",
        "--epochs", "3", "--batch-size", "16", "--seed", "3", "--topk", "chw", "--refresh-every", "5"]


def test_killed_run_resumes_bit_identical(tmp_path: Path) -> None:
    env = swat_env()
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_swat(*ARGS, "--out", str(ref)), check=True, capture_output=True, env=env)
    proc = subprocess.Popen(_swat(*ARGS, "--out", str(cut)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        m = cut / "metrics.jsonl"
        if m.is_file() and m.read_text().count("\n") >= 1:
            time.sleep(0.15)  # now inside epoch 2
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "run.json").exists(), "the run finished before it could be killed; make it longer"
    assert (cut / "checkpoint.safetensors").is_file()
    done = subprocess.run(_swat("train", "--resume", str(cut)), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    a, _ = load_tensors(ref / "model.safetensors")
    b, _ = load_tensors(cut / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    rows = [json.loads(l) for l in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_resume_without_checkpoint_is_clear(tmp_path: Path) -> None:
    proc = subprocess.run(_swat("train", "--resume", str(tmp_path)), capture_output=True, text=True)
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr


def test_small_images_get_the_cifar_stem_unless_the_user_chose() -> None:
    from training.trainer import _adapt_to_image_size

    cfg = TrainConfig(model="resnet18")
    assert _adapt_to_image_size(cfg, (32, 32)).model_cfg == {"stem": "cifar"}
    assert _adapt_to_image_size(cfg, (224, 224)).model_cfg == {}
    mine = TrainConfig(model="resnet18", model_cfg={"stem": "imagenet"})
    assert _adapt_to_image_size(mine, (32, 32)).model_cfg == {"stem": "imagenet"}
    assert _adapt_to_image_size(TrainConfig(model="resnet20"), (32, 32)).model_cfg == {}
