"""Optimizers of the ``train.optimizer`` block: SGD, AdamW (torch's) and LARS.

LARS (You et al. 2017, "Large Batch Training of Convolutional Networks") is SGD with momentum in which
the step of each weight tensor w is scaled by its trust ratio

    eta ||w|| / ||g + lambda w||        (g its gradient, lambda the weight decay, eta the trust coefficient)

so every layer moves by about the same fraction of its norm, whatever the batch size. SimCLR, BYOL and
Barlow Twins use it with biases and normalisation parameters excluded from both the weight decay and
the scaling (``exclude_bias_and_norm``): those are the 1-D parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class LARS(torch.optim.Optimizer):
    """LARS as in the official Barlow Twins code: for each parameter w with gradient g,

    d = g + lambda w;  d <- d * eta ||w|| / ||d|| (when both norms are positive);  mu <- m mu + d;  w <- w - lr mu

    A parameter group with ``lars_exclude=True`` skips the first two lines (plain SGD with momentum).
    The learning rate multiplies the momentum buffer, as in Barlow Twins' code; SimCLR's TensorFlow code
    puts it inside the buffer (mu <- m mu + lr d), which differs only while lr changes (warm-up, decay).
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                    "trust_coefficient": trust_coefficient, "lars_exclude": False}
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
                d = w.grad
                if not group["lars_exclude"]:
                    d = d.add(w, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0),
                                        group["trust_coefficient"] * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d.mul(trust)
                state = self.state[w]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(w)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                w.add_(mu, alpha=-group["lr"])
        return loss


def build_optimizer(model: torch.nn.Module, block: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer of a validated ``train.optimizer`` block over the trainable parameters of ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if block["name"] == "sgd":
        return torch.optim.SGD(params, lr=block["lr"], momentum=block["momentum"],
                               weight_decay=block["weight_decay"], nesterov=block["nesterov"])
    if block["name"] == "lars":
        groups: list[dict[str, Any]] = [{"params": params}]
        if block["exclude_bias_and_norm"]:
            groups = [{"params": [p for p in params if p.ndim > 1]},
                      {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True}]
        return LARS([g for g in groups if g["params"]], lr=block["lr"], momentum=block["momentum"],
                    weight_decay=block["weight_decay"], trust_coefficient=block["trust_coefficient"])
    return torch.optim.AdamW(params, lr=block["lr"], betas=tuple(block["betas"]),
                             weight_decay=block["weight_decay"], eps=block["eps"])
