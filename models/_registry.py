"""Name -> builder registry, so callers (training, CLI, run.json) refer to a model by a string.

A run dir records only the model's name, its class count and input channels (plus any extra
options); ``build`` is the single place that turns those back into a network, so a model trained
by one tool can be rebuilt by another without either importing the family module by hand.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from torch import nn

__all__ = ["register_model", "build", "names", "small_input_cfg"]

Builder = Callable[..., nn.Module]
_B = TypeVar("_B", bound=Builder)

_MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[_B], _B]:
    """Decorator that files a builder under ``name``.

    Duplicates are refused rather than overwritten: two families silently claiming one name would
    make a saved run rebuild a different network than the one that was trained.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def wrap(fn: _B) -> _B:
        if name in _MODELS:
            raise ValueError(
                f"model {name!r} is already registered (by {_MODELS[name].__module__}); "
                "pick a different name"
            )
        _MODELS[name] = fn
        return fn

    return wrap


def names() -> list[str]:
    """All registered model names, sorted, for help texts and error messages."""
    return sorted(_MODELS)


def _check_positive_int(what: str, value: Any) -> None:
    # bool is an int subclass; True classes is never what the user meant.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}; pass e.g. {what}=10")


def _check_cfg(name: str, builder: Builder, cfg: dict[str, Any]) -> None:
    """Turn a misspelt option into a one-line error that lists the accepted ones."""
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [k for k in params if k not in ("num_classes", "in_channels")]
    unknown = sorted(set(cfg) - set(accepted))
    if unknown:
        choices = ", ".join(accepted) if accepted else "none"
        raise ValueError(
            f"model {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"accepted options: {choices}"
        )


def build(name: str, num_classes: int = 10, in_channels: int = 3, **cfg: Any) -> nn.Module:
    """Construct a freshly initialised model by name.

    ``cfg`` carries family-specific options (e.g. ``stem="cifar"`` for the ImageNet ResNets);
    they are validated against the builder's signature so a typo fails loudly instead of being
    ignored.
    """
    builder = _MODELS.get(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(names())}")
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    _check_cfg(name, builder, cfg)
    return builder(num_classes=num_classes, in_channels=in_channels, **cfg)


# Options that adapt an ImageNet-layout family to 8x8..32x32 images (no stride-4 stem, no
# 7x7-pooled 4096-wide head). Families built for small images accept none of these.
_SMALL_INPUT_OPTIONS = {"stem": "cifar", "head": "cifar"}


def small_input_cfg(name: str) -> dict[str, Any]:
    """The ``cfg`` that makes ``name`` suited to small (8x8 to 32x32) images; ``{}`` if it already is.

    Lets a trainer build any registered model for CIFAR/MNIST/digits without knowing which
    family uses a stem switch and which a head switch: ``build(name, **small_input_cfg(name))``.
    """
    builder = _MODELS.get(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(names())}")
    params = inspect.signature(builder).parameters
    return {k: v for k, v in _SMALL_INPUT_OPTIONS.items() if k in params}
