"""The sslcore plugin entry point (``[project.entry-points.sslcore] pcl``): the method ``pcl`` and the loss
``proto_nce``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Register
from sslcore_pcl.pcl import PCL, PCLConfig, ProtoNCEConfig, ProtoNCELoss


@hookimpl
def register_losses(register: Register) -> None:
    register("proto_nce", ProtoNCELoss, config=ProtoNCEConfig)


@hookimpl
def register_methods(register: Register) -> None:
    # the official ImageNet recipe (PCL v2: MoCo v2's MLP head and augmentation, r = 16384)
    register("pcl", PCL, config=PCLConfig,
             slots={"encoder": {"name": "resnet50"}, "augmentation": {"name": "moco_v2"},
                    "negatives": {"name": "queue", "size": 16384},
                    "loss": {"name": "proto_nce", "temperature": 0.2, "num_negative_prototypes": 16384},
                    "clustering": {"name": "faiss_kmeans", "num_clusters": [25000, 50000, 100000]}})
