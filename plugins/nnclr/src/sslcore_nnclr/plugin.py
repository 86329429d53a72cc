"""The sslcore plugin entry point (``[project.entry-points.sslcore] nnclr``): registers the method ``nnclr``
and its negative source ``support_set``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import (
    Augmentation,
    ContrastiveLoss,
    Encoder,
    NegativeSource,
    RegisterMethod,
    RegisterNegativeSource,
    Slot,
)
from sslcore_nnclr.nnclr import NNCLR, NNCLRConfig, SupportSet, SupportSetConfig

#: NNCLR on ImageNet. There is no official code: the paper's Sec. 3.2 (arXiv 2104.14548) as VISSL's
#: reproduction writes it out (clane9/vissl configs/config/pretrain/nnclr/nnclr_8node_resnet.yaml @
#: fc6cd41ccf1d2a43951ce23c056a0e772ba8abb7): LARS, base lr 0.3 x B/256 (4.8 at batch 4096), momentum 0.9,
#: eta 1e-3, weight decay 1e-6, biases and BatchNorm parameters out of the weight decay and the trust ratio
#: (exclude_bias_and_norm), 10 warmup epochs (1% of 1000) then cosine to 0, 1000 epochs, batch 4096.
RECIPE = {
    "epochs": 1000, "batch_size": 4096,
    "optimizer": {"name": "lars", "lr": 0.3, "momentum": 0.9, "weight_decay": 1e-6, "trust_coefficient": 1e-3},
    "lr_scaling": "linear", "warmup_epochs": 10, "schedule": "cosine", "final_lr": 0.0,
    "param_groups": {"bias_and_norm": {"weight_decay": 0.0, "lars_exclude": True}},
}

#: the paper's ImageNet setup: ResNet-50, BYOL's augmentation, a support set of 98,304, tau 0.1
SLOTS = {
    "encoder": Slot(Encoder, {"name": "resnet50"}),
    "augmentation": Slot(Augmentation, {"name": "byol"}),
    "negatives": Slot(NegativeSource, {"name": "support_set", "size": 98304}),
    "loss": Slot(ContrastiveLoss, {"name": "info_nce", "temperature": 0.1}),
}


@hookimpl
def register_methods(register: RegisterMethod) -> None:
    register("nnclr", NNCLR, config=NNCLRConfig, slots=SLOTS, recipe=RECIPE)


@hookimpl
def register_negative_sources(register: RegisterNegativeSource) -> None:
    register("support_set", SupportSet, config=SupportSetConfig)
