"""MobileNet-V2 (Sandler et al., 2018): inverted residuals with depthwise 3x3 convs.

It is here because its bulk is what ResNets lack - depthwise and 1x1 convs - so the sparse
backend and block sparsity are measured on the layers mobile models are made of. Two
deviations, both for module surgery: every activation is its own ``nn.ReLU`` (the paper uses
ReLU6, which SWAT's ReLU-mask storage does not recognise), and the width multiplier rounds
to multiples of 8 as torchvision does. Parameter count at 1000 classes: 3.50M, as published.
``stem="cifar"`` removes the stride of the first conv and of the 24-channel stage, so 32x32
inputs end at 4x4 instead of 1x1.
"""
from __future__ import annotations

from torch import Tensor, nn

from ._init import check_choice, init_weights
from ._registry import register_model

__all__ = ["MobileNetV2", "mobilenet_v2"]

STEMS = ("imagenet", "cifar")
# (expansion t, output channels c, repeats n, first stride s), the paper's Table 2
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1))


def _divisible(v: float, d: int = 8) -> int:
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=False))


class InvertedResidual(nn.Module):
    """1x1 expand (t > 1) -> 3x3 depthwise -> 1x1 linear projection, plus the input when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn_relu(in_ch, hidden)]
        layers += [_conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, stem: str = "imagenet",
                 width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        check_choice("stem", stem, STEMS)
        if not (isinstance(width_mult, (int, float)) and width_mult > 0):
            raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
        ch = _divisible(32 * width_mult)
        last = _divisible(1280 * max(1.0, width_mult))
        cifar = stem == "cifar"
        layers: list[nn.Module] = [_conv_bn_relu(in_channels, ch, 3, 1 if cifar else 2)]
        for t, c, n, s in _SETTINGS:
            out = _divisible(c * width_mult)
            for i in range(n):
                stride = s if i == 0 and not (cifar and c == 24) else 1
                layers.append(InvertedResidual(ch, out, stride, t))
                ch = out
        layers.append(_conv_bn_relu(ch, last))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.pool(self.features(x)).flatten(1)))


@register_model("mobilenet_v2")
def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, stem: str = "imagenet",
                 width_mult: float = 1.0, dropout: float = 0.2) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels, stem, width_mult, dropout)
