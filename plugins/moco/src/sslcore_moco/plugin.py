"""The sslcore plugin entry point (``[project.entry-points.sslcore] moco``): registers the method ``moco``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Register
from sslcore_moco.moco import MoCo, MoCoConfig


@hookimpl
def register_methods(register: Register) -> None:
    register("moco", MoCo, config=MoCoConfig,
             slots={"encoder": {"name": "resnet50"}, "augmentation": {"name": "moco_v2"},
                    "negatives": {"name": "queue", "size": 65536},
                    "loss": {"name": "info_nce", "temperature": 0.2}})
