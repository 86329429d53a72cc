"""The sslcore plugin entry point (``[project.entry-points.sslcore] barlowtwins``): registers the method
``barlowtwins`` and its loss ``barlow_twins``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Register
from sslcore_barlowtwins.barlowtwins import BarlowTwins, BarlowTwinsConfig, BarlowTwinsLoss, BarlowTwinsLossConfig


@hookimpl
def register_methods(register: Register) -> None:
    # the official code: a ResNet-50 whose residual blocks' last BN starts at zero, BYOL's augmentations
    register("barlowtwins", BarlowTwins, config=BarlowTwinsConfig,
             slots={"encoder": {"name": "resnet50", "zero_init_residual": True}, "augmentation": {"name": "byol"},
                    "loss": {"name": "barlow_twins", "lambd": 0.0051}})


@hookimpl
def register_losses(register: Register) -> None:
    register("barlow_twins", BarlowTwinsLoss, config=BarlowTwinsLossConfig)
