"""Resumable checkpoints in one safetensors file (no pickle).

Everything a run needs to continue bit-identically goes in one file written atomically: the model
state, the optimizer's momentum buffers keyed by parameter name, the SWAT Top-K state, the global
RNG states, and a JSON header with the epoch and the config. One file means a crash leaves either
the old checkpoint or the new one, never a mix.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.config import TrainConfig
from training.errors import SwatError, option
from training.fileio import load_tensors, save_tensors

CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    swat_state: dict[str, torch.Tensor], header: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model/{k}"] = v
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            buf = st.get("momentum_buffer")
            if buf is not None:
                tensors[f"optim/{names[id(p)]}"] = buf
    for k, v in swat_state.items():
        tensors[f"swat/{k}"] = v
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    head = dict(header, checkpoint_version=CHECKPOINT_VERSION)
    save_tensors(path, tensors, metadata={"header": json.dumps(head)})


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore model and optimizer in place; returns the header and the SWAT state to apply."""
    tensors, meta = load_tensors(path)
    try:
        header = json.loads(meta["header"])
    except (KeyError, json.JSONDecodeError):
        raise SwatError(f"{path} has no checkpoint header; it is not a swat checkpoint") from None
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as e:
        raise SwatError(f"{path} does not fit the model ({str(e).splitlines()[0]}); "
                        f"it belongs to another run") from None
    device = next(model.parameters()).device
    params = dict(model.named_parameters())
    for k, v in tensors.items():
        if k.startswith("optim/"):
            name = k[len("optim/"):]
            if name not in params:
                raise SwatError(f"{path}: optimizer state for unknown parameter {name!r}; "
                                f"the checkpoint belongs to another model")
            optimizer.state[params[name]]["momentum_buffer"] = v.to(device)
    torch.set_rng_state(tensors["rng/torch"])
    cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng/cuda"))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    swat = {k[len("swat/"):]: v for k, v in tensors.items() if k.startswith("swat/")}
    return header, swat


def checkpoint_header(ckpt: str | Path) -> dict[str, Any]:
    """The JSON header of a checkpoint (epoch, config, ...), read without loading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(ckpt), framework="pt") as f:
            header = json.loads((f.metadata() or {})["header"])
    except (KeyError, json.JSONDecodeError):
        raise SwatError(f"{ckpt} has no readable header; it was not written by SWAT training") from None
    except OSError as e:
        raise SwatError(f"cannot read {ckpt} ({e.strerror or e}); check its permissions") from None
    except Exception as e:  # safetensors raises its own types for damaged files
        raise SwatError(f"{ckpt} is not a readable checkpoint ({e}); the run cannot be resumed - start a new "
                        f"one in another {option('out')}") from None
    if not isinstance(header, dict) or not isinstance(header.get("config"), dict):
        raise SwatError(f"{ckpt} has no readable config; it was not written by SWAT training")
    return header


def checkpoint_config(ckpt: str | Path) -> TrainConfig:
    """The TrainConfig a checkpoint was written with."""
    config = checkpoint_header(ckpt)["config"]
    try:
        return TrainConfig.from_json(config).validate()
    except (TypeError, ValueError, AttributeError) as e:
        raise SwatError(f"{ckpt} holds an invalid config ({type(e).__name__}: {e}); it cannot be resumed") from None
