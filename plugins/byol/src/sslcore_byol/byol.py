"""BYOL: Bootstrap Your Own Latent (Grill et al., NeurIPS 2020).

Two networks see two augmented views v and v' of each image. The online network (parameters theta) is an
encoder f_theta (the backbone), a projector g_theta and a predictor q_theta; the target network
(parameters xi) has the same encoder and projector, f_xi and g_xi, and no predictor:

    z = g_theta(f_theta(v)),  p = q_theta(z)          (online: projection, prediction)
    z' = g_xi(f_xi(v'))                                (target: projection of the other view)

The online network learns to predict the target's projection of the other view. The loss is the mean
squared error between the L2-normalised vectors,

    loss(p, z') = || p / ||p|| - z' / ||z'|| ||^2 = 2 - 2 cos(p, z'),

averaged over the batch and symmetrised by swapping the views: L = loss(p_1, z'_2) + loss(p_2, z'_1).
No gradient reaches the target (the stop-gradient on z'); after each optimisation step k it follows the
online network by the exponential moving average

    xi <- tau_k xi + (1 - tau_k) theta,   tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2,

tau raised from tau_base to 1 over the K steps of training. Only the encoder f_theta is kept.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslcore.toolkit.ema import cosine_momentum, momentum_update
from sslcore.toolkit.heads import MLPHead

if TYPE_CHECKING:
    from sslcore.engine.context import MethodContext


class BYOLConfig(BaseModel):
    """The ``method: {name: byol, ...}`` block."""

    model_config = ConfigDict(extra="forbid")

    projector_hidden_dim: int = Field(4096, ge=1, description="hidden width of the projector g (4096 in the paper)")
    dim: int = Field(256, ge=1, description="D: dimension of the projections z, z' and of the predictions p")
    predictor_hidden_dim: int = Field(4096, ge=1, description="hidden width of the predictor q (4096 in the paper)")
    base_momentum: float = Field(0.996, ge=0.0, le=1.0,
                                 description="tau_base, the target's EMA coefficient at the first step (0.996 on "
                                             "ImageNet in the paper, 0.99 in solo-learn's CIFAR-10 recipe)")
    momentum_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="'cosine': tau raised from tau_base to 1 over training (the paper); "
                              "'constant': tau = tau_base throughout")


class BYOLLossConfig(BaseModel):
    """The BYOL loss has no parameters."""

    model_config = ConfigDict(extra="forbid")


class BYOLLoss(nn.Module):
    """BYOL's normalised mean squared error in one direction, a paired loss called ``loss(p, z)``:

        loss(p, z) = || p / ||p|| - z / ||z|| ||^2 = 2 - 2 cos(p, z),  averaged over the N rows,

    ``p`` the online prediction of one view, ``z`` the target projection of the other. The method
    symmetrises it, L = loss(p_1, z'_2) + loss(p_2, z'_1), and passes z' without gradient. Computed in
    float32 even under autocast.
    """

    def __init__(self, config: BYOLLossConfig) -> None:
        super().__init__()

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``p``, ``z``: N x D."""
        with torch.autocast(p.device.type, enabled=False):
            p, z = F.normalize(p.float(), dim=1), F.normalize(z.float(), dim=1)
            return (2 - 2 * (p * z).sum(dim=1)).mean()


class BYOL(nn.Module):
    """BYOL: online f_theta, g_theta, q_theta and the EMA target f_xi, g_xi; see the module docstring.

    ``forward`` calls the ``loss`` slot as ``loss(p, z')``, once per direction.
    """

    def __init__(self, config: BYOLConfig, *, context: MethodContext, encoder: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.backbone = encoder  # f_theta
        self.projector = MLPHead([encoder.feature_dim, config.projector_hidden_dim, config.dim])  # g_theta
        self.predictor = MLPHead([config.dim, config.predictor_hidden_dim, config.dim])  # q_theta
        # f_xi, g_xi start as exact copies of f_theta, g_theta and are only ever changed by the EMA
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.loss = loss
        self.base_momentum = config.base_momentum
        self.momentum_schedule = config.momentum_schedule
        self.total_steps = context.total_steps  # K
        # k, the index of the current optimisation step (training forwards so far): checkpointed
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        # k as a Python int, read from the buffer once after building or loading a state dict, so that the
        # schedule costs no device synchronisation per step
        self._k: int | None = None
        self.register_load_state_dict_post_hook(self._reread_step)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        v1, v2 = views[0], views[1]  # N x 3 x H x W each: two views of the same N images
        k = self.current_step()
        if self.training:
            self.update_target(k)
        p1 = self.predictor(self.projector(self.backbone(v1)))  # p_1: N x D
        p2 = self.predictor(self.projector(self.backbone(v2)))  # p_2: N x D
        with torch.no_grad():  # the stop-gradient: z' are regression targets
            z1_target = self.target_projector(self.target_backbone(v1))  # z'_1: N x D
            z2_target = self.target_projector(self.target_backbone(v2))  # z'_2: N x D
        loss = self.loss(p1, z2_target) + self.loss(p2, z1_target)
        return {"loss": loss, "tau": torch.tensor(self.momentum(k), dtype=torch.float64)}

    def momentum(self, k: int) -> float:
        """tau_k, the EMA coefficient of the target update that follows optimisation step k."""
        if self.momentum_schedule == "constant":
            return self.base_momentum
        return cosine_momentum(k, self.total_steps, self.base_momentum)

    @torch.no_grad()
    def update_target(self, k: int) -> None:
        """At the start of training step k: xi <- tau xi + (1 - tau) theta with tau = tau_{k-1}, following the
        previous optimisation step (none before step 0, where xi = theta); then k advances."""
        if k > 0:
            momentum_update([*self.target_backbone.parameters(), *self.target_projector.parameters()],
                            [*self.backbone.parameters(), *self.projector.parameters()], self.momentum(k - 1))
        self._k = k + 1
        self.step.add_(1)

    def current_step(self) -> int:
        """k, the index of the current optimisation step."""
        if self._k is None:
            self._k = int(self.step)
        return self._k

    def _reread_step(self, module: nn.Module, incompatible_keys: Any) -> None:
        self._k = None
