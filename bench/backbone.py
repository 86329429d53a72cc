"""The ResNet-18 every benchmark trains, built with torchvision only (no sslcore, no lightly).

The bare loop, the lightly script and sslcore's ``resnet18`` encoder all make this same module, so their
weights are interchangeable and one kNN script evaluates all of them.

Stems for 32 px images:
- ``cifar``: conv1 3x3 stride 1, no max-pool (SimCLR's CIFAR ResNet): 32x32 maps in layer1.
- ``cifar_pool``: conv1 3x3 stride 1, then the max-pool: 16x16 in layer1, about 1/4 of the FLOPs.
- ``imagenet``: torchvision's 7x7 stride-2 conv1 and max-pool: 8x8 in layer1, about 1/16.
"""

from __future__ import annotations

from torch import nn
from torchvision import models

STEMS = ("cifar", "cifar_pool", "imagenet")


def resnet18(stem: str) -> nn.Module:
    """torchvision ResNet-18, ``fc = Identity`` (512-d features), with the given stem."""
    if stem not in STEMS:
        raise ValueError(f"stem {stem!r}: one of {STEMS}")
    model = models.resnet18(weights=None)
    model.fc = nn.Identity()
    if stem != "imagenet":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if stem == "cifar":
        model.maxpool = nn.Identity()
    return model
