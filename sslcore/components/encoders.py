"""Backbone encoders: torchvision ResNets without their classifier, randomly initialised (never downloaded).

An encoder is a plain ``torchvision.models.ResNet`` whose ``fc`` is ``nn.Identity()``, with an extra
``feature_dim`` attribute, so the ``state_dict`` that ``sslcore export`` writes loads strictly into
:func:`plain_torchvision_resnet` — standard torchvision code, no sslcore needed to use the weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslcore import hookimpl
from sslcore.hookspecs import Register

if TYPE_CHECKING:  # torchvision is imported where a model is built: ~2 s that `sslcore run`'s driver skips
    from torchvision import models

Arch = Literal["resnet18", "resnet50"]


class ResNetConfig(BaseModel):
    """Parameters of a torchvision ResNet encoder."""

    model_config = ConfigDict(extra="forbid")

    cifar_stem: bool = Field(
        False, description="Replace the 7x7 stride-2 conv1 and the max-pool by a 3x3 stride-1 conv1 and no "
                           "max-pool, for 32 px images (SimCLR's CIFAR-10 ResNet); about 16x the FLOPs.")
    maxpool: bool | None = Field(
        None, description="Keep the max-pool after conv1. Default: yes with the standard stem, no with the "
                          "CIFAR stem. cifar_stem with maxpool gives 16x16 maps in layer1 at 32 px: about a "
                          "quarter of the CIFAR stem's FLOPs, four times the standard stem's.")
    zero_init_residual: bool = Field(
        False, description="Initialise the last BatchNorm of each residual block to zero, so each block "
                           "starts as the identity (Goyal et al. 2017).")


def _use_stem(model: models.ResNet, cifar_stem: bool, maxpool: bool | None) -> None:
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    keep_maxpool = not cifar_stem if maxpool is None else maxpool
    if not keep_maxpool:
        model.maxpool = nn.Identity()


def plain_torchvision_resnet(arch: Arch, cifar_stem: bool, maxpool: bool | None = None) -> nn.Module:
    """The plain torchvision model an exported encoder's ``state_dict`` loads into (strictly)::

        model = torchvision.models.resnet18()      # or resnet50
        model.fc = nn.Identity()
        if cifar_stem:
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()          # unless the encoder had maxpool: true
        model.load_state_dict(torch.load("encoder.pt"))
    """
    from torchvision import models

    model = getattr(models, arch)(weights=None)
    model.fc = nn.Identity()
    _use_stem(model, cifar_stem, maxpool)
    return model


def build_resnet(arch: Arch, config: ResNetConfig) -> models.ResNet:
    """A torchvision ResNet with ``fc = Identity`` and ``feature_dim`` (512 for resnet18, 2048 for resnet50).

    ``forward(x: N x 3 x H x W) -> N x feature_dim``, the globally average-pooled last stage.
    """
    from torchvision import models

    model = getattr(models, arch)(weights=None, zero_init_residual=config.zero_init_residual)
    model.feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    _use_stem(model, config.cifar_stem, config.maxpool)
    return model


def resnet18(config: ResNetConfig) -> models.ResNet:
    """ResNet-18 (He et al. 2016), 512-d features; see :func:`plain_torchvision_resnet`."""
    return build_resnet("resnet18", config)


def resnet50(config: ResNetConfig) -> models.ResNet:
    """ResNet-50 (He et al. 2016), 2048-d features; see :func:`plain_torchvision_resnet`."""
    return build_resnet("resnet50", config)


@hookimpl
def register_encoders(register: Register) -> None:
    register("resnet18", resnet18, config=ResNetConfig)
    register("resnet50", resnet50, config=ResNetConfig)
