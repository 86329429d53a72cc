"""The sslcore plugin entry point (``[project.entry-points.sslcore] dino``): registers the method ``dino`` and
its loss ``dino``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Augmentation, Encoder, RegisterLoss, RegisterMethod, Slot
from sslcore_dino.dino import DINO, DINOConfig, DINOLoss, DINOLossConfig, SelfDistillationLoss

#: DINO ViT-S/16 on ImageNet, the README's full command ("Boosting DINO performance": --arch vit_small
#: --epochs 300 --teacher_temp 0.07 --warmup_teacher_temp_epochs 30 --norm_last_layer false, on
#: run_with_submitit.py's 2 nodes x 8 GPUs at main_dino.py's batch_size_per_gpu 64: B = 1024), every other
#: value main_dino.py's default, facebookresearch/dino @ 7c446df5b9f45747937fb0d72314eb9f7b66930a: AdamW
#: (torch's defaults) at lr 5e-4 x B/256 after 10 linear warmup epochs, cosine to min_lr 1e-6 (absolute:
#: final_lr 1e-6 / 2e-3 = 5e-4 of the peak at B = 1024), weight decay 0.04 -> 0.4 (cosine, utils.cosine_scheduler)
#: on the weights, none on biases and 1-D parameters (utils.get_params_groups), clip_grad 3.0 per parameter
#: (utils.clip_gradients).
RECIPE = {
    "sync_batchnorm": True,  # main_dino.py:197, for ResNets (a ViT has no BatchNorm)
    "epochs": 300, "batch_size": 1024,
    "optimizer": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.04},
    "lr_scaling": "linear", "warmup_epochs": 10, "schedule": "cosine", "final_lr": 5e-4,
    "weight_decay_end": 0.4, "grad_clip": 3.0, "grad_clip_mode": "per_parameter",
    "param_groups": {"bias_and_norm": {"weight_decay": 0.0}},
}

#: the README's ViT-S/16 (learned position embeddings, drop path 0.1 in the student, every crop size through
#: one ViT as interpolate_pos_encoding), DataAugmentationDINO (2 x 224 px of 40-100%, 8 x 96 px of 5-40%), the
#: DINO loss (tau_s 0.1, center momentum 0.9)
SLOTS = {
    "encoder": Slot(Encoder, {"name": "vit_small", "image_size": 224, "patch_size": 16,
                              "position_embedding": "learned", "dynamic_img_size": True, "drop_path_rate": 0.1}),
    "augmentation": Slot(Augmentation, {"name": "dino"}),
    "loss": Slot(SelfDistillationLoss, {"name": "dino"}),
}


@hookimpl
def register_methods(register: RegisterMethod) -> None:
    register("dino", DINO, config=DINOConfig, slots=SLOTS, recipe=RECIPE)


@hookimpl
def register_losses(register: RegisterLoss) -> None:
    register("dino", DINOLoss, config=DINOLossConfig)
