"""Barlow Twins: Self-Supervised Learning via Redundancy Reduction (Zbontar et al., ICML 2021).

One network f (the backbone followed by a projector) maps two augmented views Y^A, Y^B of a batch of N
images to embeddings z^A = f(Y^A) and z^B = f(Y^B), N x D each. Every embedding dimension is standardised
over the batch (a batch norm without affine parameters: mean 0, biased variance 1, written zhat), and the
D x D cross-correlation matrix of the two views is

    C_ij = sum_b zhat^A_bi zhat^B_bj / N,

1 on the diagonal where both views agree in a dimension, 0 off it where two dimensions are decorrelated.
The loss pulls C to the identity:

    L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2,

the invariance term plus the redundancy reduction term weighted by lambda (0.0051 in the paper). There are
no negatives, no predictor, no stop-gradient and no momentum encoder: the redundancy reduction term alone
keeps the embeddings from collapsing. The batch statistics and C are those of the global batch (all
workers), as in the official code (SyncBatchNorm, C all-reduced); only the backbone is kept.
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


class BarlowTwinsConfig(BaseModel):
    """The ``method: {name: barlowtwins, ...}`` block."""

    model_config = ConfigDict(extra="forbid")

    projector_hidden_dim: int = Field(8192, ge=1, description="width of the projector's two hidden layers "
                                                              "(8192 in the paper)")
    dim: int = Field(8192, ge=1, description="D: dimension of the embeddings z^A, z^B, the side of C (8192 in the "
                                             "paper; the loss's cost grows as D^2)")


class BarlowTwinsLossConfig(BaseModel):
    """The ``loss: {name: barlow_twins, ...}`` block."""

    model_config = ConfigDict(extra="forbid")

    lambd: float = Field(0.0051, ge=0, description="lambda, the weight of the redundancy reduction term (0.0051 in "
                                                   "the paper)")
    scale: float = Field(1.0, gt=0, description="a factor on the whole loss: 1 in the paper; solo-learn's "
                                                "scale_loss, 0.1 in its CIFAR-10 recipe")


class BarlowTwinsLoss(nn.Module, PairedLoss):
    """Barlow Twins' loss, a paired loss called ``loss(z_a, z_b)`` on this worker's N x D embeddings of the two
    views; see the module docstring.

    It gathers both views from every worker (``gather_with_grad``) and computes the batch statistics, C and L
    on the global batch, so every worker returns the same L; with DDP averaging the gradients, W workers
    compute the gradients of one worker on the whole batch. Computed in float32 even under autocast.
    ``metrics()`` gives the invariance and redundancy reduction terms of the last call (unweighted, detached),
    which the method returns with the loss.
    """

    def __init__(self, config: BarlowTwinsLossConfig) -> None:
        super().__init__()
        self.lambd = config.lambd
        self.scale = config.scale
        self._terms: dict[str, torch.Tensor] = {}

    def metrics(self) -> dict[str, torch.Tensor]:
        """``invariance`` sum_i (1 - C_ii)^2 and ``redundancy_reduction`` sum_{i != j} C_ij^2 of the last call."""
        return dict(self._terms)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """``z_a``, ``z_b``: N x D, this worker's rows of the global batch."""
        with torch.autocast(z_a.device.type, enabled=False):
            z_a, z_b = gather_with_grad(z_a.float()), gather_with_grad(z_b.float())  # N_global x D each
            c = batch_standardize(z_a).T @ batch_standardize(z_b) / z_a.shape[0]  # C: D x D
            on_diagonal = c.diagonal()  # C_ii: D
            invariance = (1 - on_diagonal).pow(2).sum()
            redundancy_reduction = c.pow(2).sum() - on_diagonal.pow(2).sum()  # sum over i != j of C_ij^2
        self._terms = {"invariance": invariance.detach(), "redundancy_reduction": redundancy_reduction.detach()}
        return self.scale * (invariance + self.lambd * redundancy_reduction)


def batch_standardize(z: torch.Tensor) -> torch.Tensor:
    """zhat: each column of ``z`` (N x D) to mean 0 and biased variance 1 over the N rows, as BatchNorm1d
    without affine parameters does in training (eps 1e-5), without tracking running statistics."""
    return F.batch_norm(z, running_mean=None, running_var=None, training=True)


class BarlowTwins(nn.Module, Method):
    """Barlow Twins: f = projector(backbone); see the module docstring.

    ``forward`` runs the two views through f as two separate batches (as the official code does, so each has
    its own BatchNorm statistics) and calls the ``loss`` slot as ``loss(z_a, z_b)``. Metrics: the loss's
    ``metrics()``. Biases and BatchNorm parameters get their own learning rate through the recipe's
    ``bias_and_norm`` group (every 1-D parameter, as the official code's ``param_biases``), not a method group.
    """

    def __init__(self, config: BarlowTwinsConfig, *, context: MethodContext, slots: Slots) -> None:
        super().__init__()
        encoder = slots.build("encoder")
        self.backbone = encoder
        # (Linear-BN-ReLU) x 2 - Linear, no biases (each hidden one would be cancelled by its BN); the
        # last batch norm, without affine parameters, is the loss's standardisation over the global batch
        self.projector = MLPHead([encoder.feature_dim, config.projector_hidden_dim, config.projector_hidden_dim,
                                  config.dim], hidden_bias=False, output_bias=False)
        self.loss = slots.build("loss")

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        y_a, y_b = views[0], views[1]  # N x 3 x H x W each: two views of the same N images
        z_a = self.projector(self.backbone(y_a))  # z^A: N x D
        z_b = self.projector(self.backbone(y_b))  # z^B: N x D
        loss = self.loss(z_a, z_b)
        return {"loss": loss, **self.loss.metrics()}
