"""NNCLR: With a Little Help from My Friends: Nearest-Neighbor Contrastive Learning of Visual Representations
(Dwibedi, Aytar, Tompson, Sermanet, Zisserman, ICCV 2021; arXiv 2104.14548).

SimCLR with another positive. Each of the n images of a batch is augmented twice; the views x_i and x_i^+
go through the encoder f, the projection MLP and the prediction MLP (g in the paper):

    z_i = proj(f(x_i)),   p_i^+ = g(proj(f(x_i^+)))              (z L2-normalised, p too in the loss)

The positive of view 1 of image i is not its other view but the nearest neighbour of z_i in the support
set Q, a FIFO queue of the embeddings z of past batches (eq. 1; with unit vectors the smallest distance is
the largest cosine):

    NN(z_i, Q) = argmin_{q in Q} ||z_i - q||_2 = argmax_{q in Q} z_i . q

and the loss contrasts it with the prediction of the other view of every image of the batch (eq. 2):

    L_i = -log( exp(NN(z_i, Q) . p_i^+ / tau) / sum_{k=1..n} exp(NN(z_i, Q) . p_k^+ / tau) )

No gradient goes through NN (a queue entry). The paper symmetrises the loss (Sec. 3.2) with the transposed
term -log( exp(NN(z_i, Q) . p_i^+ / tau) / sum_k exp(NN(z_k, Q) . p_i^+ / tau) ), the softmax over the
nearest neighbours of the batch for each prediction; every implementation also swaps the views (NN(z_i^+, Q)
against the predictions p of view 1). ``transposed_terms`` chooses between the four terms (VISSL's
``nnclr_loss.py``, keras-io's ``nnclr.py``) and the two of the swapped views alone (solo-learn
``solo/methods/nnclr.py``, lightly ``examples/pytorch/nnclr.py``); L is their mean. After the loss the
embeddings z of view 1 of the global batch replace the oldest ones in Q (one view, as all four).

n is the global batch: each worker's rows i are its own images, and the sum over k runs over the predictions
(or neighbours) of all workers, gathered with gradient, so W workers compute the loss and the gradients of
one process on the whole batch. Only the encoder f is kept.

In sslcore the support set is a negative source (``negatives: {name: support_set}``): ``positive(z)`` is
NN(z, Q), ``negatives(q, k)`` the global batch of k with gradient and the mask of each row's own key, and
``update(z)`` the enqueue; the ``loss`` slot is any contrastive loss, ``info_nce`` with the paper's tau by
default, called as ``loss(NN(z_1), p_2, gathered p_2, exclude)`` (its positive in column 0 and the other
n - 1 predictions as negatives make the sum over all k of eq. 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslcore.api.hookspecs import Method, Slots
from sslcore.components.negatives import QueueConfig, QueueNegatives
from sslcore.toolkit.distributed import gather_with_grad, rank
from sslcore.toolkit.heads import MLPHead

if TYPE_CHECKING:
    from sslcore.engine.context import MethodContext


class SupportSetConfig(QueueConfig):
    """The ``negatives: {name: support_set, ...}`` block."""

    size: int = Field(98304, gt=0, description="|Q|, the number of past embeddings kept (98,304 in the paper, "
                                               "65,536 in solo-learn); a multiple of the global batch size "
                                               "(train.batch_size).")


class SupportSet(QueueNegatives):
    """NNCLR's support set Q: MoCo's FIFO queue of the |Q| latest embeddings z of all workers (sslcore's
    ``queue`` negative source: ``queue`` |Q| x D float32 from random unit vectors, as the paper's random
    initial matrix, ``ptr``, both buffers, every worker enqueueing the gathered embeddings), with NNCLR's
    lookups.

    Against :class:`sslcore.api.hookspecs.NegativeSource`: ``positive(k)`` is not k but its nearest
    neighbour in Q, and ``negatives(q, k)`` returns the keys of the global batch with their gradient (they are
    NNCLR's predictions p, which the loss trains).
    """

    @torch.no_grad()
    def positive(self, k: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """NN(k_i, Q) for each row: N x D, detached, float32 (a copy: ``update`` may overwrite the queue)."""
        with torch.autocast(k.device.type, enabled=False):  # the argmax over |Q| cosines, in float32
            similarity = k.float() @ self.queue.T  # N x |Q|
        return self.queue[similarity.argmax(dim=1)]  # N x D

    def negatives(self, q: torch.Tensor, k: torch.Tensor,
                  index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys of the global batch, with gradient, and ``exclude``: each row's own key."""
        keys = gather_with_grad(k)  # B x D, B = N x workers, in rank order
        n = k.shape[0]
        own = torch.arange(n, device=k.device)
        exclude = torch.zeros(n, keys.shape[0], dtype=torch.bool, device=k.device)  # N x B
        exclude[own, rank() * n + own] = True
        return keys, exclude


class NNCLRConfig(BaseModel):
    """The ``method: {name: nnclr, ...}`` block."""

    model_config = ConfigDict(extra="forbid")

    projector_hidden_dim: int = Field(2048, ge=1, description="width of the two hidden layers of the projection "
                                                             "MLP (2048 in the paper)")
    dim: int = Field(256, ge=1, description="d: dimension of the embeddings z, the predictions p and the support "
                                            "set (256 in the paper)")
    predictor_hidden_dim: int = Field(4096, ge=1, description="hidden width of the prediction MLP g (4096 in the "
                                                             "paper)")
    transposed_terms: bool = Field(
        True, description="also the transposed terms -log exp(NN(z_i).p_i/tau) / sum_k exp(NN(z_k).p_i/tau), the "
                          "paper's symmetrisation (Sec. 3.2; VISSL, keras-io); false: only the two views swapped "
                          "(solo-learn, lightly)")


class NNCLR(nn.Module, Method):
    """NNCLR: the encoder f, the projection MLP and the prediction MLP g; see the module docstring.

    Projection MLP: three Linear layers [2048, 2048, d], each followed by BatchNorm, ReLU after all but the
    last; prediction MLP: [4096, d], BatchNorm and ReLU after the hidden layer only (the paper's Sec. 3.2).
    No bias before a BatchNorm, which cancels it (as lightly's NNCLR heads). The two views go through the
    encoder one after the other (solo-learn, lightly), so each BatchNorm normalises one view.
    """

    def __init__(self, config: NNCLRConfig, *, context: MethodContext, slots: Slots) -> None:
        super().__init__()
        encoder = slots.build("encoder")
        self.backbone = encoder  # f
        hidden, dim = config.projector_hidden_dim, config.dim
        self.projector = MLPHead([encoder.feature_dim, hidden, hidden, dim], hidden_bias=False, output_bias=False,
                                 output_norm="bn")
        self.predictor = MLPHead([dim, config.predictor_hidden_dim, dim], hidden_bias=False)  # g
        self.support_set = slots.build("negatives", dim=dim)  # Q
        self.loss = slots.build("loss")
        self.transposed_terms = config.transposed_terms

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x1, x2 = views[0], views[1]  # N x 3 x H x W each: two views of the same N images
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))  # N x d each
        p1 = F.normalize(self.predictor(z1).float(), dim=1)  # N x d
        p2 = F.normalize(self.predictor(z2).float(), dim=1)  # N x d
        z1 = F.normalize(z1.detach().float(), dim=1)  # only looked up and enqueued: no gradient
        z2 = F.normalize(z2.detach().float(), dim=1)
        nn1, nn2 = self.support_set.positive(z1), self.support_set.positive(z2)  # NN(z, Q): N x d, detached
        terms = [self.contrast(nn1, p2), self.contrast(nn2, p1)]  # each row's NN against all predictions
        if self.transposed_terms:  # each prediction against the NNs of the batch
            terms += [self.contrast(p2, nn1), self.contrast(p1, nn2)]
        loss = torch.stack(terms).mean()
        self.support_set.update(z1)
        # how close the positives are: the mean cosine of z to NN(z, Q), over both views
        nn_similarity = torch.cat([(z1 * nn1).sum(dim=1), (z2 * nn2).sum(dim=1)]).mean()
        return {"loss": loss, **self.loss.metrics(), "nn_similarity": nn_similarity}

    def contrast(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The ``loss`` slot on row i's query q_i, its key k_i and the keys of the global batch: the mean over
        this worker's rows of -log( exp(q_i . k_i / tau) / sum_k exp(q_i . k_k / tau) ) with info_nce."""
        negatives, exclude = self.support_set.negatives(q, k)  # B x d, N x B
        return self.loss(q, k, negatives, exclude)
