"""The sslcore plugin entry point (``[project.entry-points.sslcore] simclr``): registers the method ``simclr``
and its loss ``nt_xent``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Register
from sslcore_simclr.simclr import NTXentConfig, NTXentLoss, SimCLR, SimCLRConfig


@hookimpl
def register_methods(register: Register) -> None:
    register("simclr", SimCLR, config=SimCLRConfig,
             slots={"encoder": {"name": "resnet50"}, "augmentation": {"name": "simclr"},
                    "loss": {"name": "nt_xent", "temperature": 0.1}})


@hookimpl
def register_losses(register: Register) -> None:
    register("nt_xent", NTXentLoss, config=NTXentConfig)
