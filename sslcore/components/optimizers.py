"""Optimizers of the ``train.optimizer`` block: SGD and AdamW (torch's) and LARS (``sslcore.toolkit.lars``).

Each factory gets its validated config and the parameter groups the engine made from the recipe (each with
its peak ``lr``, its ``weight_decay`` and ``lars_exclude``); ``lr`` here is the base learning rate, which
the engine scales by ``train.lr_scaling`` and schedules.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from sslcore import hookimpl
from sslcore.api.hookspecs import RegisterOptimizer
from sslcore.toolkit.lars import LARS


class SGDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(0.03, gt=0, description="Base learning rate, scaled to the global batch by train.lr_scaling.")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    nesterov: bool = False


class AdamWConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-3, gt=0, description="Base learning rate, scaled to the global batch by train.lr_scaling.")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.05, ge=0)
    eps: float = Field(1e-8, gt=0)


class LARSConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = Field(0.3, gt=0, description="Base learning rate, scaled to the global batch by train.lr_scaling "
                                             "(SimCLR: 0.3 x B/256).")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-6, ge=0)
    trust_coefficient: float = Field(0.001, gt=0, description="eta in the trust ratio eta ||w|| / ||g + wd w||.")
    clip_lr: bool = Field(False, description="LARC's clipping: cap the trust ratio at 1 / lr (solo-learn's LARS).")


def sgd(config: SGDConfig, param_groups: list[dict[str, Any]]) -> torch.optim.SGD:
    return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                           nesterov=config.nesterov)


def adamw(config: AdamWConfig, param_groups: list[dict[str, Any]]) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay,
                             eps=config.eps)


def lars(config: LARSConfig, param_groups: list[dict[str, Any]]) -> LARS:
    return LARS(param_groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                trust_coefficient=config.trust_coefficient, clip_lr=config.clip_lr)


@hookimpl
def register_optimizers(register: RegisterOptimizer) -> None:
    register("sgd", sgd, config=SGDConfig, provides=torch.optim.SGD)
    register("adamw", adamw, config=AdamWConfig, provides=torch.optim.AdamW)
    register("lars", lars, config=LARSConfig, provides=LARS)
