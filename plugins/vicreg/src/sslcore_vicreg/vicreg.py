"""VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning (Bardes et al., ICLR 2022).

One network, the encoder followed by an expander (the projector), maps two augmented views of a batch of n
images to embeddings Z = [z_1, ..., z_n] and Z' = [z'_1, ..., z'_n], n x d each. Three terms shape them:

- invariance: s(Z, Z') = (1/(n d)) sum_i ||z_i - z'_i||^2, the mean squared error between the views (the
  official code's ``F.mse_loss``; the paper writes the sum over dimensions, d times this);
- variance: v(Z) = (1/d) sum_j max(0, gamma - S(z^j, eps)), S(z^j, eps) = sqrt(Var(z^j) + eps), a hinge on
  the standard deviation of each dimension j over the batch (unbiased variance, gamma = 1, eps = 1e-4),
  which keeps the embeddings from collapsing to a point;
- covariance: c(Z) = (1/d) sum_{i != j} C(Z)_ij^2, C(Z) = (1/(n-1)) sum_i (z_i - zbar)(z_i - zbar)^T, which
  decorrelates the dimensions so that they do not all carry the same information.

As in the official code, the variance terms of the two views are averaged and the covariance terms added:

    L = lambda s(Z, Z') + mu (v(Z) + v(Z')) / 2 + nu (c(Z) + c(Z')),   lambda = mu = 25, nu = 1.

No negatives, no predictor, no stop-gradient, no momentum encoder, no normalisation of the embeddings.
All three terms are over the global batch (all workers); only the encoder is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslcore.api.hookspecs import Method, PairedLoss, Slots
from sslcore.toolkit.distributed import gather_with_grad
from sslcore.toolkit.heads import MLPHead

if TYPE_CHECKING:
    from sslcore.engine.context import MethodContext

GAMMA = 1.0  # the target standard deviation of each dimension
EPS = 1e-4  # keeps the gradient of sqrt finite when a dimension collapses


class VICRegConfig(BaseModel):
    """The ``method: {name: vicreg, ...}`` block."""

    model_config = ConfigDict(extra="forbid")

    projector_hidden_dim: int = Field(8192, ge=1, description="width of the expander's two hidden layers (8192 in "
                                                              "the paper)")
    dim: int = Field(8192, ge=1, description="d: dimension of the embeddings Z, Z' (8192 in the paper; the "
                                             "covariance costs d^2)")


class VICRegLossConfig(BaseModel):
    """The ``loss: {name: vicreg, ...}`` block: the weights of the three terms (the official code's names)."""

    model_config = ConfigDict(extra="forbid")

    sim_coeff: float = Field(25.0, ge=0, description="lambda, the weight of the invariance term s (25 in the paper)")
    std_coeff: float = Field(25.0, ge=0, description="mu, the weight of the variance term v (25 in the paper)")
    cov_coeff: float = Field(1.0, ge=0, description="nu, the weight of the covariance term c (1 in the paper)")


class VICRegLoss(nn.Module, PairedLoss):
    """VICReg's loss, a paired loss called ``loss(z, z_prime)`` on this worker's n x d embeddings of the two
    views; see the module docstring.

    It gathers both views from every worker (``gather_with_grad``, the official code's FullGatherLayer) and
    computes all three terms on the global batch, so every worker returns the same L; with DDP averaging the
    gradients, W workers compute the gradients of one worker on the whole batch. (The official code takes the
    invariance term on each worker's own rows; averaged over workers by DDP, that gradient is the same.)
    Computed in float32 even under autocast. ``metrics()`` gives s, (v(Z) + v(Z')) / 2 and c(Z) + c(Z') of
    the last call (unweighted, detached), which the method returns with the loss.
    """

    def __init__(self, config: VICRegLossConfig) -> None:
        super().__init__()
        self.sim_coeff = config.sim_coeff
        self.std_coeff = config.std_coeff
        self.cov_coeff = config.cov_coeff
        self._terms: dict[str, torch.Tensor] = {}

    def metrics(self) -> dict[str, torch.Tensor]:
        """``invariance`` s, ``variance`` (v(Z) + v(Z')) / 2 and ``covariance`` c(Z) + c(Z') of the last call."""
        return dict(self._terms)

    def forward(self, z: torch.Tensor, z_prime: torch.Tensor) -> torch.Tensor:
        """``z``, ``z_prime``: n x d, this worker's rows of the global batch."""
        with torch.autocast(z.device.type, enabled=False):
            z, z_prime = gather_with_grad(z.float()), gather_with_grad(z_prime.float())  # n_global x d each
            invariance = F.mse_loss(z, z_prime)
            variance = (variance_term(z) + variance_term(z_prime)) / 2
            covariance = covariance_term(z) + covariance_term(z_prime)
        self._terms = {"invariance": invariance.detach(), "variance": variance.detach(),
                           "covariance": covariance.detach()}
        return self.sim_coeff * invariance + self.std_coeff * variance + self.cov_coeff * covariance


def variance_term(z: torch.Tensor) -> torch.Tensor:
    """v(Z) = mean over the d dimensions of max(0, gamma - sqrt(Var(z^j) + eps)); ``z``: n x d."""
    std = torch.sqrt(z.var(dim=0) + EPS)  # S(z^j, eps): d
    return F.relu(GAMMA - std).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """c(Z) = the off-diagonal squares of the covariance matrix C(Z), summed and divided by d; ``z``: n x d."""
    n, d = z.shape
    z = z - z.mean(dim=0)
    cov = z.T @ z / (n - 1)  # C(Z): d x d
    return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / d


class VICReg(nn.Module, Method):
    """VICReg: the encoder (backbone) and the expander (projector); see the module docstring.

    ``forward`` runs the two views through them as two separate batches (as the official code does) and calls
    the ``loss`` slot as ``loss(z, z_prime)``. Metrics: the loss's ``metrics()``.
    """

    def __init__(self, config: VICRegConfig, *, context: MethodContext, slots: Slots) -> None:
        super().__init__()
        encoder = slots.build("encoder")
        self.backbone = encoder
        # (Linear-BN-ReLU) x 2 - Linear without bias, as the official Projector
        self.projector = MLPHead([encoder.feature_dim, config.projector_hidden_dim, config.projector_hidden_dim,
                                  config.dim], output_bias=False)
        self.loss = slots.build("loss")

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x, x_prime = views[0], views[1]  # N x 3 x H x W each: two views of the same N images
        z = self.projector(self.backbone(x))  # Z: n x d
        z_prime = self.projector(self.backbone(x_prime))  # Z': n x d
        loss = self.loss(z, z_prime)
        return {"loss": loss, **self.loss.metrics()}
