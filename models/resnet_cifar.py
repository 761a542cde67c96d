"""CIFAR-style ResNets (He et al., 2016, section 4.2): ResNet-20/32/56.

6n+2 layers: a 3x3 conv to 16 maps, three stages of n basic blocks at 16/32/64 maps (the
second and third halve the resolution), global average pooling and one linear layer. No stem
down-sampling, so 8x8, 28x28 and 32x32 inputs all work.

Shortcuts where the shape changes: option B (1x1 stride-2 conv + BatchNorm) by default, because
it keeps the whole network made of Conv2d/BatchNorm2d modules that pruning can fold and the
sparse backend can run, with no slice/pad graph. This adds 2,752 parameters to every depth
(16*32 + 2*32 + 32*64 + 2*64) over the paper's option-A figures (0.27M/0.46M/0.85M).
``shortcut="A"`` gives the paper's parameter-free variant (stride-2 subsampling + zero-padded
channels) for reproducing its numbers exactly.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._init import check_choice, init_weights
from ._registry import register_model

__all__ = ["CifarResNet", "resnet20", "resnet32", "resnet56"]

_WIDTHS = (16, 32, 64)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


class _PadShortcut(nn.Module):
    """Option A: take every other pixel and zero-pad the new channels; no parameters."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.extra = out_ch - in_ch

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def _shortcut(in_ch: int, out_ch: int, stride: int, kind: str) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    if kind == "A":
        return _PadShortcut(in_ch, out_ch)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
    )


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus shortcut, then ReLU (each ReLU its own module for hooks)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride, shortcut)
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images; ``blocks_per_stage`` is n."""

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: str = "B",
    ) -> None:
        super().__init__()
        check_choice("shortcut", shortcut, ("A", "B"))
        self.conv1 = _conv3x3(in_channels, _WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(_WIDTHS[0])
        self.relu = nn.ReLU(inplace=False)
        in_ch = _WIDTHS[0]
        stages = []
        for i, width in enumerate(_WIDTHS):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, width, stride, shortcut))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, shortcut: str = "B") -> CifarResNet:
    return CifarResNet(3, num_classes, in_channels, shortcut)


@register_model("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 3, shortcut: str = "B") -> CifarResNet:
    return CifarResNet(5, num_classes, in_channels, shortcut)


@register_model("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3, shortcut: str = "B") -> CifarResNet:
    return CifarResNet(9, num_classes, in_channels, shortcut)
