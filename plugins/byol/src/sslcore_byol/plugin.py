"""The sslcore plugin entry point (``[project.entry-points.sslcore] byol``): registers the method ``byol``
and its loss ``byol``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Augmentation, Encoder, PairedLoss, RegisterLoss, RegisterMethod, Slot
from sslcore_byol.byol import BYOL, BYOLConfig, BYOLLoss, BYOLLossConfig

#: BYOL on ImageNet, google-deepmind/deepmind-research byol/ @ 82a347438fd93bdd4bc01764258223ae583e5cbf:
#: configs/byol.py (1000 epochs: base lr 0.2, weight decay 1.5e-6; LARS eta 1e-3, momentum 0.9; warmup
#: 10 epochs), main_loop.py (batch 4096, 1000 epochs), utils/schedules.py (lr = base x B/256, linear warmup
#: from 0, then cosine to 0), byol_experiment.py (LARS with exclude_bias_and_norm as both the weight-decay
#: and the LARS-adaptation filter: biases and BN parameters get neither).
RECIPE = {
    "sync_batchnorm": True,  # deepmind-research byol: BatchNorm with cross_replica_axis (statistics over all replicas)
    "epochs": 1000, "batch_size": 4096,
    "optimizer": {"name": "lars", "lr": 0.2, "momentum": 0.9, "weight_decay": 1.5e-6, "trust_coefficient": 1e-3},
    "lr_scaling": "linear", "warmup_epochs": 10, "schedule": "cosine", "final_lr": 0.0,
    "param_groups": {"bias_and_norm": {"weight_decay": 0.0, "lars_exclude": True}},
}

#: the paper's ImageNet setup: ResNet-50, BYOL's asymmetric augmentation, its normalised MSE
SLOTS = {
    "encoder": Slot(Encoder, {"name": "resnet50"}),
    "augmentation": Slot(Augmentation, {"name": "byol"}),
    "loss": Slot(PairedLoss, {"name": "byol"}),
}


@hookimpl
def register_methods(register: RegisterMethod) -> None:
    register("byol", BYOL, config=BYOLConfig, slots=SLOTS, recipe=RECIPE)


@hookimpl
def register_losses(register: RegisterLoss) -> None:
    register("byol", BYOLLoss, config=BYOLLossConfig)
