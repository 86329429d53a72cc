"""The sslcore plugin entry point (``[project.entry-points.sslcore] deepclusterv2``): the method
``deepclusterv2`` and its loss ``deepcluster_v2``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Augmentation, Encoder, RegisterLoss, RegisterMethod, Slot
from sslcore_deepclusterv2.deepclusterv2 import (
    ClusterPredictionLoss,
    DeepClusterV2,
    DeepClusterV2Config,
    DeepClusterV2Loss,
    DeepClusterV2LossConfig,
)

#: DeepCluster v2, 800 epochs, facebookresearch/swav scripts/deepclusterv2_800ep_pretrain.sh and
#: main_deepclusterv2.py @ 06b1b7cbaf6ba2a792300d79c7299db98b93b7f9 (75.2% linear top-1 in its README):
#: 64 GPUs x batch 64 = 4096; SGD momentum 0.9 wrapped in apex LARC (trust 0.001, clip False) over every
#: parameter, biases and BatchNorm too (``model.parameters()``); --base_lr 4.8 for B 4096, set as given,
#: without scaling it by the batch (lr_scaling none, as sslcore-swav); --wd 1e-6; 10 warmup epochs from
#: --start_warmup 0.3 (0.0625 of 4.8); cosine to --final_lr 0.0048 (0.001 of 4.8); 800 epochs.
RECIPE = {
    "sync_batchnorm": True,  # facebookresearch/swav main_deepclusterv2.py:149 (--sync_bn pytorch, the default)
    "epochs": 800, "batch_size": 4096,
    "optimizer": {"name": "lars", "lr": 4.8, "momentum": 0.9, "weight_decay": 1e-6, "trust_coefficient": 0.001,
                  "clip_lr": False},
    "lr_scaling": "none", "warmup_epochs": 10, "warmup_start": 0.0625, "schedule": "cosine", "final_lr": 0.001,
}

#: the same script's components: ResNet-50; SwAV's multi-crop (src/multicropdataset.py: 2 x 224 px of
#: 14-100% and 6 x 96 px of 5-14%, its colour distortion, blur and normalisation, std 0.228 for red);
#: temperature 0.1
SLOTS = {
    "encoder": Slot(Encoder, {"name": "resnet50"}),
    "augmentation": Slot(Augmentation, {"name": "swav", "mean": [0.485, 0.456, 0.406],
                                         "std": [0.228, 0.224, 0.225]}),
    "loss": Slot(ClusterPredictionLoss, {"name": "deepcluster_v2", "temperature": 0.1}),
}


@hookimpl
def register_losses(register: RegisterLoss) -> None:
    register("deepcluster_v2", DeepClusterV2Loss, config=DeepClusterV2LossConfig)


@hookimpl
def register_methods(register: RegisterMethod) -> None:
    register("deepclusterv2", DeepClusterV2, config=DeepClusterV2Config, slots=SLOTS, recipe=RECIPE)
