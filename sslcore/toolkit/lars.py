"""LARS (You et al. 2017, "Large Batch Training of Convolutional Networks"): SGD with momentum in which the
step of each weight tensor w is scaled by its trust ratio

    eta ||w|| / ||g + lambda w||        (g its gradient, lambda the weight decay, eta the trust coefficient)

so every layer moves by about the same fraction of its norm, whatever the batch size. SimCLR, BYOL, Barlow
Twins and VICReg use it with biases and normalisation parameters (the 1-D ones) excluded from both the
weight decay and the scaling: their recipes' ``bias_and_norm`` parameter group, ``lars_exclude``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class LARS(torch.optim.Optimizer):
    """LARS as in the official Barlow Twins code: for each parameter w with gradient g,

    d = g + lambda w;  d <- d * eta ||w|| / ||d|| (when both norms are positive);  mu <- m mu + d;  w <- w - lr mu

    A parameter group with ``lars_exclude=True`` skips the trust ratio (SGD with momentum); one with weight
    decay 0 skips lambda w. The official recipes exempt biases and norms from both (two separate filters in
    their code, two settings of a parameter group here).
    The learning rate multiplies the momentum buffer, as in Barlow Twins' code; SimCLR's TensorFlow code
    puts it inside the buffer (mu <- m mu + lr d), which differs only while lr changes (warm-up, decay).

    ``clip_lr`` is LARC's clipping (NVIDIA apex, solo-learn's LARS): the trust ratio is capped at 1 / lr,
    so that no layer's step exceeds the global lr times its direction, ``d <- d * min(trust / lr, 1)``.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, clip_lr: bool = False) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "trust_coefficient": trust_coefficient, "clip_lr": clip_lr, "lars_exclude": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                d = w.grad.add(w, alpha=group["weight_decay"]) if group["weight_decay"] else w.grad
                if not group["lars_exclude"]:
                    w_norm, d_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0),
                                        group["trust_coefficient"] * w_norm / d_norm, torch.ones_like(w_norm))
                    if group["clip_lr"] and group["lr"] > 0:
                        trust = torch.clamp(trust / group["lr"], max=1.0)
                    d = d.mul(trust)
                state = self.state[w]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(w)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                w.add_(mu, alpha=-group["lr"])
        return loss
