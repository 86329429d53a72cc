"""The sslcore plugin entry point (``[project.entry-points.sslcore] mae``): registers the method ``mae``."""

from __future__ import annotations

from sslcore import hookimpl
from sslcore.api.hookspecs import Augmentation, PatchEncoder, RegisterMethod, Slot
from sslcore_mae.mae import MAE, MAEConfig

#: MAE pre-training on ImageNet, facebookresearch/mae @ efb2a8062c206524e35e47d04501ed4f544c0ae8:
#: PRETRAIN.md's command (--blr 1.5e-4 --weight_decay 0.05 --epochs 800 --warmup_epochs 40, effective batch
#: 64 x 8 nodes x 8 GPUs = 4096, --norm_pix_loss --mask_ratio 0.75), main_pretrain.py (AdamW betas (0.9, 0.95);
#: lr = blr x eff_batch_size / 256; --min_lr 0; no gradient clipping: the loss scaler's clip_grad is None)
#: and util/lr_sched.py (linear warmup, then half-cycle cosine to min_lr). Weight decay 0 for the parameters
#: that timm's add_weight_decay exempts, every 1-D one and every bias (all biases are 1-D): the
#: bias_and_norm group; the CLS and mask tokens (1 x 1 x D) are decayed, as there.
RECIPE = {
    "epochs": 800, "batch_size": 4096,
    "optimizer": {"name": "adamw", "lr": 1.5e-4, "betas": [0.9, 0.95], "weight_decay": 0.05},
    "lr_scaling": "linear", "warmup_epochs": 40, "schedule": "cosine", "final_lr": 0.0,
    "param_groups": {"bias_and_norm": {"weight_decay": 0.0}},
}

#: PRETRAIN.md's ViT-B (--model mae_vit_base_patch16: ViT-B/16 at 224 px; the code's default model is ViT-L,
#: which sslcore does not have), with MAE's crop-and-flip augmentation
SLOTS = {
    "encoder": Slot(PatchEncoder, {"name": "vit_base", "patch_size": 16, "image_size": 224}),
    "augmentation": Slot(Augmentation, {"name": "mae"}),
}


@hookimpl
def register_methods(register: RegisterMethod) -> None:
    register("mae", MAE, config=MAEConfig, slots=SLOTS, recipe=RECIPE)
