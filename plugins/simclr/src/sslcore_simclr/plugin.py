"""The sslcore plugin entry point (``[project.entry-points.sslcore] simclr``): registers the method ``simclr``
and its loss ``nt_xent``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Augmentation, Encoder, PairedLoss, RegisterLoss, RegisterMethod, Slot
from sslcore_simclr.simclr import NTXentConfig, NTXentLoss, SimCLR, SimCLRConfig

#: SimCLR (v1) on ImageNet, the paper's recipe in google-research/simclr run.py @
#: 85e8552d31e52fbfeb3d5d5ec30a1e9e1a0bf2a3 (its flag defaults and the README's ImageNet command there):
#: LARS (--optimizer lars) with --learning_rate 0.3 per batch of 256, scaled linearly (model_util.py:
#: ``scaled_lr = base_learning_rate * train_batch_size / 256``), --momentum 0.9, --weight_decay 1e-6, eeta
#: 0.001 (lars_optimizer.py), --warmup_epochs 10 then cosine decay to 0, --train_batch_size 4096,
#: --train_epochs 100. model.py: ``exclude_from_weight_decay=['batch_normalization', 'bias']``, which LARS
#: also excludes from the trust ratio (exclude_from_layer_adaptation defaults to it): the bias_and_norm group.
RECIPE = {
    "sync_batchnorm": True,  # google-research/simclr: BN over the global batch (`--global_bn`, default True)
    "epochs": 100, "batch_size": 4096,
    "optimizer": {"name": "lars", "lr": 0.3, "momentum": 0.9, "weight_decay": 1e-6, "trust_coefficient": 0.001},
    "lr_scaling": "linear", "warmup_epochs": 10, "schedule": "cosine", "final_lr": 0.0,
    "param_groups": {"bias_and_norm": {"weight_decay": 0.0, "lars_exclude": True}},
}

#: the paper's ImageNet components: ResNet-50, colour strength 1.0 with blur, NT-Xent at --temperature 0.1
SLOTS = {
    "encoder": Slot(Encoder, {"name": "resnet50"}),
    "augmentation": Slot(Augmentation, {"name": "simclr"}),
    "loss": Slot(PairedLoss, {"name": "nt_xent", "temperature": 0.1}),
}


@hookimpl
def register_methods(register: RegisterMethod) -> None:
    register("simclr", SimCLR, config=SimCLRConfig, slots=SLOTS, recipe=RECIPE)


@hookimpl
def register_losses(register: RegisterLoss) -> None:
    register("nt_xent", NTXentLoss, config=NTXentConfig)
