"""VGG-16 with BatchNorm (Simonyan & Zisserman, 2014; Ioffe & Szegedy, 2015).

Thirteen 3x3 conv-BN-ReLU layers in five stages separated by 2x2 max-pools. Two heads:

* ``head="imagenet"`` (default): 7x7 adaptive average pool and the 4096-4096 classifier with
  dropout - torchvision's ``vgg16_bn`` layout, 138.37M parameters at 1000 classes.
* ``head="cifar"``: global average pool and one 512 -> classes linear layer, the usual CIFAR
  VGG-16 (the 4096-wide head would hold ~90 % of the weights for 10 classes and a 1x1 map).

The pools use ``ceil_mode=True``: identical to floor mode at 32x32 and 224x224 (sizes divisible
by 32), but an odd or 1x1 map is pooled to ceil(n/2) instead of shrinking to nothing, so the
network also runs on 28x28 and 8x8 images.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._init import check_choice, init_weights
from ._registry import register_model

__all__ = ["VGG", "vgg16_bn"]

HEADS = ("imagenet", "cifar")
# Output channels per conv, "M" for a max-pool (configuration "D" of the paper).
_CFG_16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _features(cfg: tuple[int | str, ...], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    ch = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
        else:
            # bias=True before BN matches torchvision's layout and published parameter count.
            layers += [nn.Conv2d(ch, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=False)]
            ch = v
    return nn.Sequential(*layers)


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """Linear layer with torchvision's VGG head init, N(0, 0.01) weights and zero bias.

    ``skip_init`` avoids drawing the default init first and then overwriting it: for the
    25088x4096 layer that wasted draw would double the build time.
    """
    layer = nn.utils.skip_init(
        nn.Linear, in_features, out_features, device=torch.get_default_device()
    )
    nn.init.normal_(layer.weight, 0.0, 0.01)
    nn.init.zeros_(layer.bias)
    return layer


class VGG(nn.Module):
    """Conv feature stack plus one of two classifier heads (see module docstring)."""

    def __init__(
        self,
        cfg: tuple[int | str, ...],
        num_classes: int = 1000,
        in_channels: int = 3,
        head: str = "imagenet",
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        check_choice("head", head, HEADS)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}; pass e.g. dropout=0.5")
        self.features = _features(cfg, in_channels)
        if head == "imagenet":
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(
                _linear(512 * 7 * 7, 4096),
                nn.ReLU(inplace=False),
                nn.Dropout(dropout),
                _linear(4096, 4096),
                nn.ReLU(inplace=False),
                nn.Dropout(dropout),
                _linear(4096, num_classes),
            )
        else:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(_linear(512, num_classes))
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


@register_model("vgg16_bn")
def vgg16_bn(
    num_classes: int = 10, in_channels: int = 3, head: str = "imagenet", dropout: float = 0.5
) -> VGG:
    return VGG(_CFG_16, num_classes, in_channels, head, dropout)
