"""The sslcore plugin entry point (``[project.entry-points.sslcore] swav``): registers the method ``swav`` and
its loss ``swav``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Augmentation, Encoder, RegisterLoss, RegisterMethod, Slot
from sslcore_swav.swav import SwappedPredictionLoss, SwAV, SwAVConfig, SwAVLoss, SwAVLossConfig

#: SwAV on ImageNet, 800 epochs at batch 4096 (75.3% linear top-1 in the README), facebookresearch/swav @
#: 06b1b7cbaf6ba2a792300d79c7299db98b93b7f9: scripts/swav_800ep_pretrain.sh (64 GPUs x batch 64, base_lr 4.8,
#: final_lr 0.0048, wd 1e-6, warmup_epochs 10, start_warmup 0.3, epochs 800) and main_swav.py (SGD momentum 0.9
#: under apex LARC, trust_coefficient 0.001, clip False, over every parameter with the same weight decay;
#: linear warmup from start_warmup to base_lr, then cosine to final_lr). The code sets the lr as given,
#: without scaling it by the batch (the 256-batch scripts give 0.6 themselves): lr_scaling none.
RECIPE = {
    "sync_batchnorm": True,  # facebookresearch/swav main_swav.py:157 (--sync_bn pytorch, the default)
    "epochs": 800, "batch_size": 4096,
    "optimizer": {"name": "lars", "lr": 4.8, "momentum": 0.9, "weight_decay": 1e-6, "trust_coefficient": 1e-3,
                  "clip_lr": False},
    "lr_scaling": "none", "warmup_epochs": 10, "warmup_start": 0.0625, "schedule": "cosine",
    "final_lr": 0.001,  # start_warmup 0.3 and final_lr 0.0048 as fractions of 4.8
}

#: the official ImageNet components: ResNet-50, 2 x 224 px (0.14-1) + 6 x 96 px (0.05-0.14) crops with
#: src/multicropdataset.py's colour distortion, blur and normalisation, and main_swav.py's loss defaults
SLOTS = {
    "encoder": Slot(Encoder, {"name": "resnet50"}),
    "augmentation": Slot(Augmentation, {"name": "swav", "mean": [0.485, 0.456, 0.406], "std": [0.228, 0.224, 0.225]}),
    "loss": Slot(SwappedPredictionLoss, {"name": "swav", "temperature": 0.1, "epsilon": 0.05,
                                         "sinkhorn_iterations": 3, "crops_for_assign": [0, 1]}),
}


@hookimpl
def register_methods(register: RegisterMethod) -> None:
    register("swav", SwAV, config=SwAVConfig, slots=SLOTS, recipe=RECIPE)


@hookimpl
def register_losses(register: RegisterLoss) -> None:
    register("swav", SwAVLoss, config=SwAVLossConfig)
