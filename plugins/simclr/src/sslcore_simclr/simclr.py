"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations (Chen et al., ICML 2020),
with the batch-normalised projection head of the official code (and of SimCLR v2, Chen et al. 2020).

Each of the N images of a batch is augmented twice. The 2N views x_k go through the encoder f (the
backbone) and the projection head g as one batch, h_k = f(x_k), z_k = g(h_k). For an anchor i whose
positive j is the other view of the same image, the NT-Xent loss (normalised temperature-scaled cross
entropy) is

    l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) ),
    sim(u, v) = u . v / (||u|| ||v||),

and L = 1/(2N) sum of l over the 2N anchors: both views of every image are anchors (both directions), and
the other 2(N - 1) views of the batch are the negatives; an anchor is never compared with itself.

With W workers, N is the global batch. Each worker holds n = N / W images; its 2n views are the anchors
of its loss, and the candidates k are the 2N views of all workers, gathered with gradient
(``sslcore.toolkit.distributed.gather_with_grad``), so that the per-worker mean that DDP averages is L and its
gradients are those of one process on the whole batch. Only the encoder f is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslcore.api.hookspecs import Method, PairedLoss, Slots
from sslcore.toolkit.distributed import concat_all_gather, gather_with_grad, rank
from sslcore.toolkit.heads import MLPHead

if TYPE_CHECKING:
    from sslcore.engine.context import MethodContext


class SimCLRConfig(BaseModel):
    """The ``method: {name: simclr, ...}`` block."""

    model_config = ConfigDict(extra="forbid")

    head_hidden_dim: int | None = Field(
        None, ge=1, description="hidden width of the projection head g; default: the encoder's feature width, "
                                "as the official code (2048 for ResNet-50, 512 for ResNet-18)")
    dim: int = Field(128, ge=1, description="D: dimension of the projections z the loss compares")


class NTXentConfig(BaseModel):
    """Parameters of the NT-Xent loss."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.1, gt=0, description="tau (0.1 on ImageNet in the paper, 0.5 on CIFAR-10 in the "
                                                      "official code's CIFAR-10 command)")


def similarities_to_global_batch(z1: torch.Tensor, z2: torch.Tensor,
                                 gather: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities of this worker's 2n views (the anchors) to the 2N views of the global batch.

    ``z1``, ``z2``: n x D, the two views of this worker's images; ``gather`` concatenates every worker's
    tensor in rank order. Returns the similarities, 2n x 2N in float32, each anchor's own column set to
    -inf, and for each anchor the column of its positive (2n, long).
    """
    n = z1.shape[0]
    anchor = torch.arange(2 * n, device=z1.device)
    offset = rank() * 2 * n
    own = offset + anchor  # each anchor's own row among the candidates
    positive = offset + (anchor + n) % (2 * n)  # the row of the other view of its image
    with torch.autocast(z1.device.type, enabled=False):  # similarities / tau lose too much in bfloat16
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # this worker's views, view 1 then view 2: 2n x D
        candidates = gather(z)  # every worker's 2n views in rank order: 2N x D, this worker's from row 2n r
        itself = F.one_hot(own, candidates.shape[0]).bool()  # 2n x 2N
        return (z @ candidates.T).masked_fill(itself, float("-inf")), positive  # 2n x 2N


class NTXentLoss(nn.Module, PairedLoss):
    """NT-Xent over the 2N views of the global batch, a paired loss called ``loss(z1, z2)``; see the module
    docstring. ``z1``, ``z2``: n x D, the projections of the two views of this worker's n images (row a of
    each from the same image); the loss is the mean of l(i, j) over this worker's 2n anchors, against the 2N
    views gathered from every worker with gradient. Computed in float32 even under autocast.
    """

    def __init__(self, config: NTXentConfig) -> None:
        super().__init__()
        self.temperature = config.temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        similarity, positive = similarities_to_global_batch(z1, z2, gather_with_grad)  # 2n x 2N (float32), 2n
        return F.cross_entropy(similarity / self.temperature, positive)  # the mean of l(i, j) over the 2n anchors


@torch.no_grad()
def contrastive_accuracy(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The fraction of this worker's 2n anchors whose most similar view among the other 2N - 1 of the global
    batch is their positive (the official code's ``contrast_acc``, over all views)."""
    similarity, positive = similarities_to_global_batch(z1, z2, concat_all_gather)
    return (similarity.argmax(dim=1) == positive).float().mean()


class SimCLR(nn.Module, Method):
    """SimCLR: the encoder f and the projection head g, Linear-BN-ReLU-Linear-BN; see the module docstring.

    ``forward`` calls the ``loss`` slot (a :class:`PairedLoss`) as ``loss(z1, z2)`` with the projections of
    the two views.
    """

    def __init__(self, config: SimCLRConfig, *, context: MethodContext, slots: Slots) -> None:
        super().__init__()
        encoder = slots.build("encoder")
        self.backbone = encoder  # f
        # g; no bias before a BatchNorm (it would cancel it)
        hidden = config.head_hidden_dim or encoder.feature_dim
        self.projector = MLPHead([encoder.feature_dim, hidden, config.dim], hidden_bias=False, output_bias=False,
                                 output_norm="bn")
        self.loss = slots.build("loss")

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x1, x2 = views[0], views[1]  # n x 3 x H x W each: two views of the same n images
        n = x1.shape[0]
        # the 2n views as one batch, as the official code does: every BatchNorm normalises them together
        z = self.projector(self.backbone(torch.cat([x1, x2])))  # 2n x D
        z1, z2 = z[:n], z[n:]  # n x D each
        loss = self.loss(z1, z2)
        return {"loss": loss, **self.loss.metrics(), "contrast_acc": contrastive_accuracy(z1, z2)}
