"""DenseNet-BC-121 (Huang et al., 2017): growth rate 32, blocks of 6/12/24/16 layers.

"BC" = bottleneck layers (BN-ReLU-1x1 conv to 4k maps, then BN-ReLU-3x3 conv to k maps) and
compression 0.5 in the transitions. Layout and parameter count (7.98M at 1000 classes) match
torchvision's ``densenet121``.

``stem="cifar"`` replaces the 7x7/2 conv + BN-ReLU + 3x3/2 max-pool with a single 3x3/1 conv
to 2k maps, as in the paper's CIFAR DenseNets, so 32x32 inputs reach the classifier at 4x4
instead of 1x1 (and 8x8 inputs still work).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._init import check_choice, init_weights
from ._registry import register_model

__all__ = ["DenseNet", "densenet121"]

STEMS = ("imagenet", "cifar")


class DenseLayer(nn.Module):
    """Bottleneck layer: reads the concatenation of all earlier maps, adds ``growth`` new ones."""

    def __init__(self, in_ch: int, growth: int, bn_size: int) -> None:
        super().__init__()
        mid = bn_size * growth
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(mid, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(out)))


class DenseBlock(nn.Module):
    """Each layer sees every earlier layer's output (and the block input), concatenated."""

    def __init__(self, num_layers: int, in_ch: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_ch + i * growth, growth, bn_size) for i in range(num_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (compression) then 2x2 average pool, between dense blocks."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=False),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.AvgPool2d(2, stride=2),
        )


class DenseNet(nn.Module):
    """DenseNet-BC; ``block_config`` gives the layers per dense block."""

    def __init__(
        self,
        growth: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        bn_size: int = 4,
        compression: float = 0.5,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
    ) -> None:
        super().__init__()
        check_choice("stem", stem, STEMS)
        ch = 2 * growth
        if stem == "imagenet":
            stem_layers: list[nn.Module] = [
                nn.Conv2d(in_channels, ch, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(ch),
                nn.ReLU(inplace=False),
                nn.MaxPool2d(3, stride=2, padding=1),
            ]
        else:
            stem_layers = [nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)]
        stages: list[nn.Module] = []
        for i, num_layers in enumerate(block_config):
            stages.append(DenseBlock(num_layers, ch, growth, bn_size))
            ch += num_layers * growth
            if i < len(block_config) - 1:
                out_ch = int(ch * compression)
                stages.append(Transition(ch, out_ch))
                ch = out_ch
        self.stem = nn.Sequential(*stem_layers)
        self.features = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(ch, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.norm(self.features(self.stem(x))))
        return self.classifier(self.avgpool(x).flatten(1))


@register_model("densenet121")
def densenet121(num_classes: int = 10, in_channels: int = 3, stem: str = "imagenet") -> DenseNet:
    return DenseNet(32, (6, 12, 24, 16), 4, 0.5, num_classes, in_channels, stem)
