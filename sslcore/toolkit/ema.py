"""Momentum (exponential moving average) targets: MoCo's key encoder, BYOL's target network.

A target network theta_t follows the online network theta_o by

    theta_t <- m theta_t + (1 - m) theta_o

after each optimisation step (a method's ``after_optimizer_step``), with m constant (MoCo) or raised from a
base value to 1 over training (BYOL: ``Schedule(start=m_base, end=1.0)``, m_k = 1 - (1 - m_base)(cos(pi k / K)
+ 1) / 2 at step k of K).
"""

from __future__ import annotations

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
