"""The sslcore plugin entry point (``[project.entry-points.sslcore] rotnet``): registers the method ``rotnet``
and its augmentation ``rotnet``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Augmentation, Encoder, RegisterAugmentation, RegisterMethod, Slot
from sslcore_rotnet.rotnet import RotNet, RotNetAugmentation, RotNetAugmentationConfig, RotNetConfig

#: RotNet on ImageNet, gidariss/FeatureLearningRotNet @ edafaba6561003292017d0a44272414356c959ff:
#: config/ImageNet_RotNet_AlexNet.py (batch_size 192 images, each in its 4 rotations; max_num_epochs 50;
#: SGD momentum 0.9, nesterov, weight_decay 5e-4 on every parameter; LUT_lr [(15, 0.01), (30, 0.001),
#: (45, 0.0001), (50, 0.00001)]). algorithms/Algorithm.py adjust_learning_rates sets the LUT's lr before
#: every epoch, the first included, so the config's 'lr': 0.1 is never used: 0.01 for epochs 0-14, then x 0.1
#: at epochs 15, 30 and 45. The lr is not scaled with the batch (lr_scaling none), no warmup.
RECIPE = {
    "epochs": 50, "batch_size": 192,
    "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
    "lr_scaling": "none", "warmup_epochs": 0, "schedule": "step", "milestones": [15, 30, 45], "gamma": 0.1,
}

#: the paper's ImageNet setup on the core's encoders: ResNet-50 (the official code trains AlexNet, which
#: sslcore does not have), the official train transform (RandomSizedCrop(224), flip)
SLOTS = {
    "encoder": Slot(Encoder, {"name": "resnet50"}),
    "augmentation": Slot(Augmentation, {"name": "rotnet"}),
}


@hookimpl
def register_methods(register: RegisterMethod) -> None:
    register("rotnet", RotNet, config=RotNetConfig, slots=SLOTS, recipe=RECIPE)


@hookimpl
def register_augmentations(register: RegisterAugmentation) -> None:
    register("rotnet", RotNetAugmentation, config=RotNetAugmentationConfig)
