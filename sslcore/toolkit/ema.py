"""Momentum (exponential moving average) targets: MoCo's key encoder, BYOL's target network.

A target network theta_t follows the online network theta_o by

    theta_t <- m theta_t + (1 - m) theta_o

after each optimisation step, with m constant (MoCo) or raised from a base value to 1 over training by a
cosine schedule (BYOL): m_k = 1 - (1 - m_base)(cos(pi k / K) + 1) / 2 at step k of K.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


@torch.no_grad()
def momentum_update(target: Iterable[torch.Tensor], online: Iterable[torch.Tensor], m: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_o for each pair of tensors, in place."""
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"momentum_update: {len(target)} target tensors for {len(online)} online ones")
    # theta_t + (1 - m)(theta_o - theta_t) = m theta_t + (1 - m) theta_o, one fused pass
    torch._foreach_lerp_(target, online, 1.0 - m)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's m_k = 1 - (1 - base)(cos(pi k / K) + 1) / 2: ``base`` at step 0, 1 at step K."""
    progress = min(step, total_steps) / max(1, total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
