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
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslcore.api.hookspecs import Method, PairedLoss, Slots
from sslcore.api.recipe import Schedule, TrainingStep
from sslcore.toolkit.ema import momentum_update
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


class BYOLLoss(nn.Module, PairedLoss):
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


class BYOL(nn.Module, Method):
    """BYOL: online f_theta, g_theta, q_theta and the EMA target f_xi, g_xi; see the module docstring.

    The projector and the predictor are Linear-BN-ReLU-Linear with no bias in the last Linear, as the
    official ``utils/networks.py`` (``hk.Linear(..., with_bias=False)``). ``forward`` calls the ``loss``
    slot as ``loss(p, z')``, once per direction, and leaves the target alone; the EMA runs after each
    optimizer step (``after_optimizer_step``) with the engine's ``tau`` of that step (``schedules()``), as
    the official ``byol_experiment.py`` updates the target right after the optimizer's update. The step
    index comes from the engine, which restores it on resume, so the method keeps no step counter.
    """

    def __init__(self, config: BYOLConfig, *, context: MethodContext, slots: Slots) -> None:
        super().__init__()
        encoder = slots.build("encoder")
        self.backbone = encoder  # f_theta
        self.projector = MLPHead([encoder.feature_dim, config.projector_hidden_dim, config.dim],
                                 output_bias=False)  # g_theta
        self.predictor = MLPHead([config.dim, config.predictor_hidden_dim, config.dim],
                                 output_bias=False)  # q_theta
        # f_xi, g_xi start as exact copies of f_theta, g_theta and are only ever changed by the EMA
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.loss = slots.build("loss")
        self.base_momentum = config.base_momentum
        self.momentum_schedule = config.momentum_schedule

    def schedules(self) -> dict[str, Schedule]:
        """tau_k: from tau_base at step 0 along the half cosine to 1 at the last step (or constant)."""
        end = None if self.momentum_schedule == "constant" else 1.0
        return {"tau": Schedule(start=self.base_momentum, end=end)}

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        v1, v2 = views[0], views[1]  # N x 3 x H x W each: two views of the same N images
        p1 = self.predictor(self.projector(self.backbone(v1)))  # p_1: N x D
        p2 = self.predictor(self.projector(self.backbone(v2)))  # p_2: N x D
        with torch.no_grad():  # the stop-gradient: z' are regression targets
            z1_target = self.target_projector(self.target_backbone(v1))  # z'_1: N x D
            z2_target = self.target_projector(self.target_backbone(v2))  # z'_2: N x D
        loss = self.loss(p1, z2_target) + self.loss(p2, z1_target)
        return {"loss": loss, **self.loss.metrics()}

    def after_optimizer_step(self, step: TrainingStep) -> None:
        self.update_target(step.values["tau"])

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """xi <- tau xi + (1 - tau) theta, for the target encoder and projector."""
        momentum_update([*self.target_backbone.parameters(), *self.target_projector.parameters()],
                        [*self.backbone.parameters(), *self.projector.parameters()], tau)
