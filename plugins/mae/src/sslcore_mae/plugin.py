"""The sslcore plugin entry point (``[project.entry-points.sslcore] mae``): registers the method ``mae``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Register
from sslcore_mae.mae import MAE, MAEConfig


@hookimpl
def register_methods(register: Register) -> None:
    # the official ImageNet encoder: ViT-B/16 at 224 px, with MAE's crop-and-flip augmentation
    register("mae", MAE, config=MAEConfig,
             slots={"encoder": {"name": "vit_base", "patch_size": 16, "image_size": 224},
                    "augmentation": {"name": "mae"}})
