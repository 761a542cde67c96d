"""Model zoo: the SWAT paper's architectures plus small ones that train on two CPU cores.

``build(name, num_classes, in_channels, **cfg)`` is the way in; importing this package imports
every family module so that all names are registered. Nothing here knows about SWAT: models are
plain ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm2d`` / ``nn.ReLU`` modules (each ReLU its own
instance, never in place) so the training package can rewrite them by module surgery.

=============  ==========================================  ================================
name           family                                      options (``cfg``)
=============  ==========================================  ================================
lenet5         LeNet-5, padded + BN + global-pool C5       -
resnet20/32/56 CIFAR ResNet (6n+2)                         ``shortcut="B"`` | ``"A"``
resnet18..101  ImageNet ResNet                             ``stem="imagenet"`` | ``"cifar"``
vgg16_bn       VGG-16 with BatchNorm                       ``head="imagenet"`` | ``"cifar"``,
                                                           ``dropout=0.5``
densenet121    DenseNet-BC-121 (k=32)                      ``stem="imagenet"`` | ``"cifar"``
mobilenet_v2   MobileNet-V2 (depthwise, inverted residual)  ``stem="imagenet"`` | ``"cifar"``,
                                                           ``width_mult=1.0``, ``dropout=0.2``
wrn28_10       Wide ResNet 28-10                           ``dropout=0.0``
=============  ==========================================  ================================

For 8x8 to 32x32 images use ``build(name, **small_input_cfg(name))``: it selects the CIFAR stem
or head where a family has one.
"""
from __future__ import annotations

from . import densenet, lenet, mobilenet, resnet, resnet_cifar, vgg, wide_resnet  # noqa: F401  (registers)
from ._registry import build, names, register_model, small_input_cfg

__all__ = ["build", "names", "register_model", "small_input_cfg"]
