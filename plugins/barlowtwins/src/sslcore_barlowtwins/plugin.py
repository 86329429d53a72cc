"""The sslcore plugin entry point (``[project.entry-points.sslcore] barlowtwins``): registers the method
``barlowtwins`` and its loss ``barlow_twins``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Augmentation, Encoder, PairedLoss, RegisterLoss, RegisterMethod, Slot
from sslcore_barlowtwins.barlowtwins import BarlowTwins, BarlowTwinsConfig, BarlowTwinsLoss, BarlowTwinsLossConfig

#: Barlow Twins on ImageNet, facebookresearch/barlowtwins main.py @ a655214 (unchanged at HEAD 8e8d284):
#: LARS (momentum 0.9, eta 0.001) with weight decay 1e-6 (--weight-decay), lr 0.2 for the weights
#: (--learning-rate-weights) and 0.0048 for the biases and BN parameters (--learning-rate-biases), both
#: x B/256 (adjust_learning_rate: base_lr = batch_size / 256), 10 warmup epochs, then cosine to 0.001 of the
#: peak (end_lr = base_lr * 0.001), 1000 epochs (--epochs), batch 2048 (--batch-size). The official
#: param_biases are every ndim == 1 parameter, which LARS' weight_decay_filter and lars_adaptation_filter
#: exempt from weight decay and the trust ratio: the bias_and_norm group.
RECIPE = {
    "sync_batchnorm": True,  # facebookresearch/barlowtwins main.py:89 convert_sync_batchnorm
    "epochs": 1000, "batch_size": 2048,
    "optimizer": {"name": "lars", "lr": 0.2, "momentum": 0.9, "weight_decay": 1e-6, "trust_coefficient": 0.001},
    "lr_scaling": "linear", "warmup_epochs": 10, "schedule": "cosine", "final_lr": 0.001,
    "param_groups": {"bias_and_norm": {"lr": 0.0048, "weight_decay": 0.0, "lars_exclude": True}},
}

#: the official code: a ResNet-50 whose residual blocks' last BN starts at zero, BYOL's augmentations,
#: lambda 0.0051 (--lambd); the projector 8192-8192-8192 is the method block's default
SLOTS = {
    "encoder": Slot(Encoder, {"name": "resnet50", "zero_init_residual": True}),
    "augmentation": Slot(Augmentation, {"name": "byol"}),
    "loss": Slot(PairedLoss, {"name": "barlow_twins", "lambd": 0.0051}),
}


@hookimpl
def register_methods(register: RegisterMethod) -> None:
    register("barlowtwins", BarlowTwins, config=BarlowTwinsConfig, slots=SLOTS, recipe=RECIPE)


@hookimpl
def register_losses(register: RegisterLoss) -> None:
    register("barlow_twins", BarlowTwinsLoss, config=BarlowTwinsLossConfig)
