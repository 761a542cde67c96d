"""ImageNet ResNets (He et al., 2016): ResNet-18/34 (basic blocks), ResNet-50/101 (bottlenecks).

Layout and parameter counts match torchvision's (projection shortcuts, i.e. option B; the
bottleneck strides in its 3x3 conv, "ResNet v1.5"). ``stem="cifar"`` replaces the 7x7/2 conv +
3x3/2 max-pool with a 3x3/1 conv and no pool, the usual way (and the paper's) of running these
networks on 32x32 images without collapsing them to 1x1 by the last stage.

Every ReLU is its own ``nn.ReLU`` module (torchvision reuses one per block) so per-layer hooks
and module surgery see each activation separately.
"""
from __future__ import annotations

from typing import Union

from torch import Tensor, nn

from ._init import check_choice, init_weights
from ._registry import register_model

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50", "resnet101"]

STEMS = ("imagenet", "cifar")


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


def _projection(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(_conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convs; used by ResNet-18/34."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _projection(in_ch, width, stride)
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.downsample(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4; used by ResNet-50/101."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = _conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = _conv1x1(width, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = _projection(in_ch, out_ch, stride)
        self.relu3 = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.downsample(x))


Block = Union[type[BasicBlock], type[Bottleneck]]


class ResNet(nn.Module):
    """Four stages at 64/128/256/512 base width; ``layers`` gives the blocks per stage."""

    def __init__(
        self,
        block: Block,
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
    ) -> None:
        super().__init__()
        check_choice("stem", stem, STEMS)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = _conv3x3(in_channels, 64)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self._in_ch = 64
        self.layer1 = self._stage(block, 64, layers[0], stride=1)
        self.layer2 = self._stage(block, 128, layers[1], stride=2)
        self.layer3 = self._stage(block, 256, layers[2], stride=2)
        self.layer4 = self._stage(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self)

    def _stage(self, block: Block, width: int, count: int, stride: int) -> nn.Sequential:
        blocks = []
        for i in range(count):
            blocks.append(block(self._in_ch, width, stride if i == 0 else 1))
            self._in_ch = width * block.expansion
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, stem: str = "imagenet") -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, stem)


@register_model("resnet34")
def resnet34(num_classes: int = 10, in_channels: int = 3, stem: str = "imagenet") -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, in_channels, stem)


@register_model("resnet50")
def resnet50(num_classes: int = 10, in_channels: int = 3, stem: str = "imagenet") -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, stem)


@register_model("resnet101")
def resnet101(num_classes: int = 10, in_channels: int = 3, stem: str = "imagenet") -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes, in_channels, stem)
