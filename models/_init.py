"""One weight-initialisation scheme shared by every family.

Kaiming-normal (fan_out, relu) for convolutions and unit/zero BatchNorm, as torchvision does, so
that a model built here starts from the same distribution as the reference implementations the
paper's numbers were measured with. Linear layers keep PyTorch's default (uniform Kaiming) init,
with the bias zeroed, which is what torchvision's ResNet/DenseNet heads effectively use.
"""
from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module) -> None:
    """Initialise ``model`` in place; draws from torch's global RNG, so seeding makes it repeatable."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    """Reject an unknown string option with a message that lists the valid ones."""
    if value not in choices:
        raise ValueError(
            f"{option}={value!r} is not supported; choose one of: {', '.join(choices)}"
        )
