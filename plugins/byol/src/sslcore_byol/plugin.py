"""The sslcore plugin entry point (``[project.entry-points.sslcore] byol``): registers the method ``byol``
and its loss ``byol``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Register
from sslcore_byol.byol import BYOL, BYOLConfig, BYOLLoss, BYOLLossConfig


@hookimpl
def register_methods(register: Register) -> None:
    register("byol", BYOL, config=BYOLConfig,
             slots={"encoder": {"name": "resnet50"}, "augmentation": {"name": "byol"}, "loss": {"name": "byol"}})


@hookimpl
def register_losses(register: Register) -> None:
    register("byol", BYOLLoss, config=BYOLLossConfig)
