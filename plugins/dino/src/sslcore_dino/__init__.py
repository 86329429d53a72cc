"""DINO for sslcore: a student matches an EMA teacher's centred, sharpened output over multi-crop views
(Caron et al. 2021)."""

from sslcore_dino.dino import (
    DINO,
    DINOConfig,
    DINOHead,
    DINOLoss,
    DINOLossConfig,
    SelfDistillationLoss,
    WeightNormalizedLinear,
    teacher_temperature,
)

__all__ = ["DINO", "DINOConfig", "DINOHead", "DINOLoss", "DINOLossConfig", "SelfDistillationLoss",
           "WeightNormalizedLinear", "teacher_temperature"]
