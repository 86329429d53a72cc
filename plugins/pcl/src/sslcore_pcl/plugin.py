"""The sslcore plugin entry point (``[project.entry-points.sslcore] pcl``): the method ``pcl`` and the loss
``proto_nce``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Augmentation, Clustering, Encoder, NegativeSource, RegisterLoss, RegisterMethod, Slot
from sslcore_pcl.pcl import PCL, PCLConfig, ProtoNCEConfig, ProtoNCELoss, PrototypicalLoss

#: PCL v2 on ImageNet, salesforce/PCL main_pcl.py @ 964da1fb7c0546e8ce55627fa3c0debde4b7e456 with the
#: README's v2 flags (--mlp --aug-plus --cos): SGD lr 0.03 for batch 256, momentum 0.9, weight decay 1e-4
#: on every parameter (``torch.optim.SGD(model.parameters(), ...)``), cosine decay, 200 epochs. Its
#: --warmup-epoch 20 is the epochs of InfoNCE alone before the first E-step (``method.warmup_epochs``),
#: not a learning-rate warmup: the lr has none. The code takes the lr as given; linear scaling is the same
#: at B = 256 and is how MoCo's README scales it for other batches.
RECIPE = {
    "epochs": 200, "batch_size": 256,
    "optimizer": {"name": "sgd", "lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4},
    "lr_scaling": "linear", "warmup_epochs": 0, "schedule": "cosine", "final_lr": 0.0,
}

#: the official ImageNet components: ResNet-50, MoCo v2's augmentation, a queue of r = 16384 keys (the code's
#: --pcl-r is the queue size and the number of negative prototypes), tau 0.2, 25k/50k/100k prototypes
SLOTS = {
    "encoder": Slot(Encoder, {"name": "resnet50"}),
    "augmentation": Slot(Augmentation, {"name": "moco_v2"}),
    "negatives": Slot(NegativeSource, {"name": "queue", "size": 16384}),
    "loss": Slot(PrototypicalLoss, {"name": "proto_nce", "temperature": 0.2, "num_negative_prototypes": 16384}),
    "clustering": Slot(Clustering, {"name": "faiss_kmeans", "num_clusters": [25000, 50000, 100000]}),
}


@hookimpl
def register_losses(register: RegisterLoss) -> None:
    register("proto_nce", ProtoNCELoss, config=ProtoNCEConfig)


@hookimpl
def register_methods(register: RegisterMethod) -> None:
    register("pcl", PCL, config=PCLConfig, slots=SLOTS, recipe=RECIPE)
