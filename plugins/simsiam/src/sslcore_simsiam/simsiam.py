"""SimSiam: Exploring Simple Siamese Representation Learning (Chen & He, CVPR 2021).

One encoder f, a backbone followed by a projection MLP, maps two augmented views x_1, x_2 of each image to
z_1 = f(x_1) and z_2 = f(x_2); a prediction MLP h maps each to p_1 = h(z_1), p_2 = h(z_2). Each prediction
is pulled towards the other view's projection, through which no gradient flows (stop-gradient):

    D(p, z) = - p / ||p|| . z / ||z||                    (negative cosine similarity)
    L = D(p_1, stopgrad(z_2)) / 2 + D(p_2, stopgrad(z_1)) / 2,

averaged over the batch. There are no negatives and no momentum encoder: the stop-gradient alone keeps
the outputs from collapsing to a constant. The paper watches for collapse through the standard deviation
of z / ||z|| over the batch, averaged over the D channels: about 1 / sqrt(D) when the outputs spread over
the sphere, 0 when they collapse (logged as ``z_std``).

The projection MLP has three layers and ends in a BatchNorm without affine parameters; the prediction MLP
is a bottleneck (D -> D/4 -> D). Only the backbone is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslcore.api.hookspecs import Method, PairedLoss, Slots
from sslcore.toolkit.heads import MLPHead

if TYPE_CHECKING:
    from sslcore.engine.context import MethodContext


class SimSiamConfig(BaseModel):
    """The ``method: {name: simsiam, ...}`` block."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(2048, ge=1, description="D: dimension of the projections z and predictions p")
    projector_hidden_dim: int | None = Field(
        None, ge=1, description="width of the projection MLP's two hidden layers; default: the backbone's "
                                "feature width, as the official code (prev_dim: 2048 for ResNet-50, 512 for "
                                "ResNet-18)")
    predictor_hidden_dim: int = Field(512, ge=1, description="bottleneck width of the prediction MLP h")


class NegativeCosineConfig(BaseModel):
    """The negative cosine loss has no parameters."""

    model_config = ConfigDict(extra="forbid")


class NegativeCosineLoss(nn.Module, PairedLoss):
    """SimSiam's D, a paired loss called ``loss(p, z)``: D(p, z) = -cos(p, z), averaged over the N rows.

    ``p`` is the prediction of one view, ``z`` the projection of the other. The stop-gradient is the
    method's: SimSiam passes z detached. Computed in float32 even under autocast.
    """

    def __init__(self, config: NegativeCosineConfig) -> None:
        super().__init__()

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``p``, ``z``: N x D."""
        with torch.autocast(p.device.type, enabled=False):
            return -F.cosine_similarity(p.float(), z.float(), dim=1).mean()


class SimSiam(nn.Module, Method):
    """SimSiam: f = projector(backbone), the predictor h; see the module docstring for the symbols.

    ``forward`` calls the ``loss`` slot as ``loss(p, stopgrad(z))``, once per direction. The predictor is
    the parameter group ``predictor``, which the recipe keeps at a fixed lr (the official ``--fix-pred-lr``).
    """

    def __init__(self, config: SimSiamConfig, *, context: MethodContext, slots: Slots) -> None:
        super().__init__()
        encoder = slots.build("encoder")
        self.backbone = encoder
        hidden = config.projector_hidden_dim or encoder.feature_dim
        # no bias before a BatchNorm (it would cancel it); the last BN has no affine parameters
        self.projector = MLPHead([encoder.feature_dim, hidden, hidden, config.dim], hidden_bias=False,
                                 output_bias=False, output_norm="bn_noaffine")
        self.predictor = MLPHead([config.dim, config.predictor_hidden_dim, config.dim], hidden_bias=False)  # h
        self.loss = slots.build("loss")

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"predictor": list(self.predictor.parameters())}

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x1, x2 = views[0], views[1]  # N x 3 x H x W each: two views of the same N images
        z1 = self.projector(self.backbone(x1))  # z_1: N x D
        z2 = self.projector(self.backbone(x2))  # z_2: N x D
        p1, p2 = self.predictor(z1), self.predictor(z2)  # p_1, p_2: N x D
        loss = self.loss(p1, z2.detach()) / 2 + self.loss(p2, z1.detach()) / 2
        with torch.no_grad():
            z_std = F.normalize(z1.float(), dim=1).std(dim=0).mean()
        return {"loss": loss, "z_std": z_std, **self.loss.metrics()}
