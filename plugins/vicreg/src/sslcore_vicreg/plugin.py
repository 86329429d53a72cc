"""The sslcore plugin entry point (``[project.entry-points.sslcore] vicreg``): registers the method ``vicreg``
and its loss ``vicreg``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Augmentation, Encoder, PairedLoss, RegisterLoss, RegisterMethod, Slot
from sslcore_vicreg.vicreg import VICReg, VICRegConfig, VICRegLoss, VICRegLossConfig

#: VICReg on ImageNet, facebookresearch/vicreg main_vicreg.py @ cc1ef4f (unchanged at HEAD 4e12602) with
#: the README's 1000-epoch command (--epochs 1000 --batch-size 2048 --base-lr 0.2): LARS (momentum 0.9, eta
#: 0.001) with weight decay 1e-6 (--wd), lr 0.2 x B/256 (adjust_learning_rate: base_lr * batch_size / 256),
#: 10 warmup epochs, then cosine to 0.001 of the peak (end_lr = base_lr * 0.001), batch 2048. The argparse
#: default of --epochs is 100; the README and the paper train 1000. exclude_bias_and_norm (p.ndim == 1) is
#: both LARS filters: no weight decay and no trust ratio for the biases and BN parameters, at the one lr.
RECIPE = {
    "sync_batchnorm": True,  # facebookresearch/vicreg main_vicreg.py:107 convert_sync_batchnorm
    "epochs": 1000, "batch_size": 2048,
    "optimizer": {"name": "lars", "lr": 0.2, "momentum": 0.9, "weight_decay": 1e-6, "trust_coefficient": 0.001},
    "lr_scaling": "linear", "warmup_epochs": 10, "schedule": "cosine", "final_lr": 0.001,
    "param_groups": {"bias_and_norm": {"weight_decay": 0.0, "lars_exclude": True}},
}

#: the official code: a ResNet-50 whose residual blocks' last BN starts at zero, BYOL's augmentations,
#: --sim-coeff 25 --std-coeff 25 --cov-coeff 1; the expander 8192-8192-8192 (--mlp) is the method block's default
SLOTS = {
    "encoder": Slot(Encoder, {"name": "resnet50", "zero_init_residual": True}),
    "augmentation": Slot(Augmentation, {"name": "byol"}),
    "loss": Slot(PairedLoss, {"name": "vicreg", "sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0}),
}


@hookimpl
def register_methods(register: RegisterMethod) -> None:
    register("vicreg", VICReg, config=VICRegConfig, slots=SLOTS, recipe=RECIPE)


@hookimpl
def register_losses(register: RegisterLoss) -> None:
    register("vicreg", VICRegLoss, config=VICRegLossConfig)
