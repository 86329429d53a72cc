"""The sslcore plugin entry point (``[project.entry-points.sslcore] simsiam``): registers the method ``simsiam``
and its loss ``negative_cosine``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Register
from sslcore_simsiam.simsiam import NegativeCosineConfig, NegativeCosineLoss, SimSiam, SimSiamConfig


@hookimpl
def register_methods(register: Register) -> None:
    # the official encoder zero-initialises the last BN of each residual block
    register("simsiam", SimSiam, config=SimSiamConfig,
             slots={"encoder": {"name": "resnet50", "zero_init_residual": True},
                    "augmentation": {"name": "moco_v2"}, "loss": {"name": "negative_cosine"}})


@hookimpl
def register_losses(register: Register) -> None:
    register("negative_cosine", NegativeCosineLoss, config=NegativeCosineConfig)
