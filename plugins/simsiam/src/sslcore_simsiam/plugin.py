"""The sslcore plugin entry point (``[project.entry-points.sslcore] simsiam``): registers the method ``simsiam``
and its loss ``negative_cosine``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Augmentation, Encoder, PairedLoss, RegisterLoss, RegisterMethod, Slot
from sslcore_simsiam.simsiam import NegativeCosineConfig, NegativeCosineLoss, SimSiam, SimSiamConfig

#: SimSiam on ImageNet, facebookresearch/simsiam main_simsiam.py @ a7bc1772896d0dad0806c51f0bb6f3b16d290468
#: with the README's command (--fix-pred-lr): SGD lr 0.05 with init_lr = lr x B/256, momentum 0.9, weight
#: decay 1e-4 on every parameter, batch 512, 100 epochs, cosine decay to 0 without warmup, and the predictor
#: at init_lr throughout (its optimizer group has fix_lr). The official cosine is set once per epoch
#: (adjust_learning_rate); sslcore's per step.
RECIPE = {
    "sync_batchnorm": True,  # facebookresearch/simsiam main_simsiam.py:161 convert_sync_batchnorm
    "epochs": 100, "batch_size": 512,
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
    "lr_scaling": "linear", "warmup_epochs": 0, "schedule": "cosine", "final_lr": 0.0,
    "param_groups": {"predictor": {"fixed_lr": True}},
}

#: the official encoder zero-initialises the last BN of each residual block (builder.py); the official
#: augmentation is MoCo v2's
SLOTS = {
    "encoder": Slot(Encoder, {"name": "resnet50", "zero_init_residual": True}),
    "augmentation": Slot(Augmentation, {"name": "moco_v2"}),
    "loss": Slot(PairedLoss, {"name": "negative_cosine"}),
}


@hookimpl
def register_methods(register: RegisterMethod) -> None:
    register("simsiam", SimSiam, config=SimSiamConfig, slots=SLOTS, recipe=RECIPE)


@hookimpl
def register_losses(register: RegisterLoss) -> None:
    register("negative_cosine", NegativeCosineLoss, config=NegativeCosineConfig)
