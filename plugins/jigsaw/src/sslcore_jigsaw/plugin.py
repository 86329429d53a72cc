"""The sslcore plugin entry point (``[project.entry-points.sslcore] jigsaw``): registers the method ``jigsaw``
and its augmentation ``jigsaw``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Augmentation, Encoder, RegisterAugmentation, RegisterMethod, Slot
from sslcore_jigsaw.jigsaw import Jigsaw, JigsawAugmentation, JigsawAugmentationConfig, JigsawConfig

#: The official solver, MehdiNoroozi/JigsawPuzzleSolver @ 8c7ec09789555c269475de9707e5e6c7f6edbcf7
#: solver_cfn_jps.prototxt: SGD base_lr 0.01, momentum 0.9, weight_decay 5e-4, lr_policy step with gamma 0.1
#: every 100,000 iterations, max_iter 350,000; train_val_cfn_jps.prototxt: batch 256, every bias at lr_mult 2
#: and decay_mult 0. In epochs of ImageNet (1,281,167 images, 5,005 iterations of 256): 70 epochs, x 0.1 at
#: epochs 20, 40 and 60 (bbrattoli's JigsawTrain.py: 70 epochs, step 20). Every 1-D parameter (biases, and
#: the ResNet's BatchNorm) gets the biases' rule: twice the lr, no weight decay. At B = 256 lr_scaling
#: linear gives the solver's lr (VISSL scales it so too: auto_lr_scaling, base_lr_batch_size 256).
RECIPE = {
    "epochs": 70, "batch_size": 256,
    "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4},
    "lr_scaling": "linear", "warmup_epochs": 0, "schedule": "step", "milestones": [20, 40, 60], "gamma": 0.1,
    "param_groups": {"bias_and_norm": {"lr": 0.02, "weight_decay": 0.0}},
}

#: ResNet-50 (the paper's CFN is an AlexNet, which sslcore does not have) and the official puzzle: 255 px,
#: 85 px cells, 64 px tiles
SLOTS = {
    "encoder": Slot(Encoder, {"name": "resnet50"}),
    "augmentation": Slot(Augmentation, {"name": "jigsaw"}),
}


@hookimpl
def register_methods(register: RegisterMethod) -> None:
    register("jigsaw", Jigsaw, config=JigsawConfig, slots=SLOTS, recipe=RECIPE)


@hookimpl
def register_augmentations(register: RegisterAugmentation) -> None:
    register("jigsaw", JigsawAugmentation, config=JigsawAugmentationConfig)
