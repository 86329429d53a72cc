"""The sslcore plugin entry point (``[project.entry-points.sslcore] vicreg``): registers the method ``vicreg``
and its loss ``vicreg``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Register
from sslcore_vicreg.vicreg import VICReg, VICRegConfig, VICRegLoss, VICRegLossConfig


@hookimpl
def register_methods(register: Register) -> None:
    # the official code: a ResNet-50 whose residual blocks' last BN starts at zero, BYOL's augmentations
    register("vicreg", VICReg, config=VICRegConfig,
             slots={"encoder": {"name": "resnet50", "zero_init_residual": True}, "augmentation": {"name": "byol"},
                    "loss": {"name": "vicreg", "sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0}})


@hookimpl
def register_losses(register: Register) -> None:
    register("vicreg", VICRegLoss, config=VICRegLossConfig)
