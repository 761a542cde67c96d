"""Wide ResNet (Zagoruyko & Komodakis, 2016) for CIFAR: WRN-28-10.

WRN-d-k: a 3x3 conv to 16 maps, three stages of n = (d-4)/6 pre-activation basic blocks
(BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3) at 16k/32k/64k maps, strides 1/2/2, then BN-ReLU,
global average pooling and a linear layer. Where a block changes the shape, the shortcut is a
1x1 conv (no BN) applied to the block's pre-activated input, as in the authors' code. 36.48M
parameters for WRN-28-10 at 10 classes. No stem down-sampling: 8x8 to 32x32 inputs all work.
"""
from __future__ import annotations

from torch import Tensor, nn

from ._init import init_weights
from ._registry import register_model

__all__ = ["WideResNet", "wrn28_10"]


class WideBlock(nn.Module):
    """Pre-activation basic block; the shortcut reads the raw input only when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.projection = (
            nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
            if stride != 1 or in_ch != out_ch
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(pre)))))
        shortcut = x if self.projection is None else self.projection(pre)
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``; ``depth`` must be 6n+4."""

    def __init__(
        self,
        depth: int = 28,
        widen: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 (e.g. 16, 22, 28, 40), got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}; pass e.g. dropout=0.3")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        in_ch = 16
        stages = []
        for width, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(in_ch, width, stride if j == 0 else 1, dropout))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(self.avgpool(x).flatten(1))


@register_model("wrn28_10")
def wrn28_10(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    return WideResNet(28, 10, num_classes, in_channels, dropout)
