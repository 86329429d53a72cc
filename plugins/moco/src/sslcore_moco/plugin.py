"""The sslcore plugin entry point (``[project.entry-points.sslcore] moco``): registers the method ``moco``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Augmentation, ContrastiveLoss, Encoder, NegativeSource, RegisterMethod, Slot
from sslcore_moco.moco import MoCo, MoCoConfig

#: MoCo v2 on ImageNet, facebookresearch/moco main_moco.py @ 7397dfe with the README's v2 flags (--mlp
#: --moco-t 0.2 --aug-plus --cos): SGD lr 0.03 for batch 256, momentum 0.9, weight decay 1e-4 on every
#: parameter, cosine decay, no warmup, 200 epochs. The code takes the lr as given; its README scales it
#: linearly with the batch (0.015 for 128), which lr_scaling: linear does.
RECIPE = {
    "epochs": 200, "batch_size": 256,
    "optimizer": {"name": "sgd", "lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4},
    "lr_scaling": "linear", "warmup_epochs": 0, "schedule": "cosine", "final_lr": 0.0,
}

#: the official ImageNet encoder and v2 settings: ResNet-50, aug-plus, K 65536, T 0.2
SLOTS = {
    "encoder": Slot(Encoder, {"name": "resnet50"}),
    "augmentation": Slot(Augmentation, {"name": "moco_v2"}),
    "negatives": Slot(NegativeSource, {"name": "queue", "size": 65536}),
    "loss": Slot(ContrastiveLoss, {"name": "info_nce", "temperature": 0.2}),
}


@hookimpl
def register_methods(register: RegisterMethod) -> None:
    register("moco", MoCo, config=MoCoConfig, slots=SLOTS, recipe=RECIPE)
