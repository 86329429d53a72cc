"""Losses shared by several methods: InfoNCE, and the metric-learning losses contrastive_margin and triplet.

All three take the contrastive call ``loss(q, k, negatives, exclude)`` (see the ``register_losses`` spec),
so any negative source (in-batch, queue) feeds them and any method that calls this signature (MoCo, PCL)
can swap one for another in the experiment file.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslcore import hookimpl
from sslcore.api.hookspecs import ContrastiveLoss, RegisterLoss


class InfoNCEConfig(BaseModel):
    """Parameters of the InfoNCE loss."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.2, gt=0, description="tau, the softmax temperature (0.2 in MoCo v2).")


class InfoNCELoss(nn.Module, ContrastiveLoss):
    """InfoNCE (van den Oord et al. 2018) as in MoCo (He et al. 2020)::

        L = -log( exp(q·k+ / tau) / (exp(q·k+ / tau) + sum_j exp(q·k_j / tau)) )

    averaged over the N queries, where ``k+`` is the query's positive key and ``k_j`` the negatives. It is
    a (1+K)-way cross-entropy whose correct class is the positive, in column 0. ``q``, ``k`` and the
    negatives are expected L2-normalized. Computed in float32 even under autocast: the logits divided by
    a small tau lose too much in bfloat16.
    """

    def __init__(self, config: InfoNCEConfig) -> None:
        super().__init__()
        self.temperature = config.temperature

    def forward(self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
                exclude: torch.Tensor | None = None) -> torch.Tensor:
        """``q``, ``k``: N x D; ``negatives``: K x D; ``exclude``: N x K bool, True where a negative
        must not count for that query (its own positive, with in-batch negatives)."""
        with torch.autocast(q.device.type, enabled=False):
            q, k, negatives = q.float(), k.float(), negatives.float()
            l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # N x 1
            l_neg = q @ negatives.T  # N x K
            if exclude is not None:
                l_neg = l_neg.masked_fill(exclude, float("-inf"))
            logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature  # N x (1+K)
            labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
            return F.cross_entropy(logits, labels)


Mining = Literal["all", "hard", "semi_hard", "easy"]

MINING_DESCRIPTION = ("which negatives count, as FaceNet defines them by the distance d_an of a negative to the "
                      "anchor against the positive's d_ap and the margin: hard d_an < d_ap, semi_hard d_ap <= "
                      "d_an < d_ap + margin, easy d_an >= d_ap + margin, all: every negative")


def select_negatives(d_ap: torch.Tensor, d_an: torch.Tensor, margin: float, mining: Mining) -> torch.Tensor:
    """N x K bool: the negatives of each anchor that ``mining`` keeps (FaceNet's categories).

    ``d_ap``: N, each anchor's distance to its positive; ``d_an``: N x K, to each negative; both in the
    loss's own distance and compared with its own margin.
    """
    d_ap = d_ap.unsqueeze(1)  # N x 1
    if mining == "hard":
        return d_an < d_ap
    if mining == "semi_hard":
        return (d_an >= d_ap) & (d_an < d_ap + margin)
    if mining == "easy":
        return d_an >= d_ap + margin
    return torch.ones_like(d_an, dtype=torch.bool)


def _mean_over(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``keep``; 0 (still attached to the graph) when nothing is kept."""
    return (values * keep).sum() / keep.sum().clamp(min=1)


class ContrastiveMarginConfig(BaseModel):
    """Parameters of the margin contrastive loss."""

    model_config = ConfigDict(extra="forbid")

    margin: float = Field(1.0, gt=0, description="m: negatives closer than m (Euclidean distance) are pushed "
                                                 "out to m; 1.0 is cosine similarity 0.5 for unit vectors.")
    mining: Mining = Field("all", description=MINING_DESCRIPTION + " (distances: Euclidean).")


class ContrastiveMarginLoss(nn.Module, ContrastiveLoss):
    """The margin contrastive loss of Hadsell, Chopra and LeCun (2006), with D the Euclidean distance::

        L = 1/N sum_i 1/2 D(q_i, k_i)^2  +  1/|S| sum_{(i, j) in S} 1/2 max(0, m - D(q_i, n_j))^2

    positive pairs pulled together, negatives pushed beyond the margin m. S is the set of (anchor,
    negative) pairs that ``mining`` keeps among those not excluded. Computed in float32.
    """

    def __init__(self, config: ContrastiveMarginConfig) -> None:
        super().__init__()
        self.margin, self.mining = config.margin, config.mining

    def forward(self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
                exclude: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(q.device.type, enabled=False):
            q, k, negatives = q.float(), k.float(), negatives.float()
            d_ap = (q - k).norm(dim=1)  # N
            d_an = torch.cdist(q, negatives)  # N x K
            keep = select_negatives(d_ap, d_an, self.margin, self.mining)
            if exclude is not None:
                keep &= ~exclude
            pull = 0.5 * d_ap.square().mean()
            push = _mean_over(0.5 * F.relu(self.margin - d_an).square(), keep)
            return pull + push


class TripletConfig(BaseModel):
    """Parameters of the triplet loss."""

    model_config = ConfigDict(extra="forbid")

    margin: float = Field(0.2, gt=0, description="alpha: the positive must be closer than each negative by "
                                                 "alpha in squared Euclidean distance (0.2 in FaceNet).")
    mining: Mining = Field("semi_hard", description=MINING_DESCRIPTION + " (distances: squared Euclidean). "
                                                                         "easy triplets have zero loss.")


class TripletLoss(nn.Module, ContrastiveLoss):
    """The triplet loss of FaceNet (Schroff et al. 2015), with d the squared Euclidean distance::

        L = 1/|T| sum_{(i, j) in T} max(0, d(q_i, k_i) - d(q_i, n_j) + alpha)

    over the triplets (anchor q_i, positive k_i, negative n_j) that ``mining`` keeps among those not
    excluded: FaceNet trains on semi-hard ones. Computed in float32.
    """

    def __init__(self, config: TripletConfig) -> None:
        super().__init__()
        self.margin, self.mining = config.margin, config.mining

    def forward(self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
                exclude: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(q.device.type, enabled=False):
            q, k, negatives = q.float(), k.float(), negatives.float()
            d_ap = (q - k).square().sum(dim=1)  # N
            d_an = torch.cdist(q, negatives).square()  # N x K
            keep = select_negatives(d_ap, d_an, self.margin, self.mining)
            if exclude is not None:
                keep &= ~exclude
            return _mean_over(F.relu(d_ap.unsqueeze(1) - d_an + self.margin), keep)


@hookimpl
def register_losses(register: RegisterLoss) -> None:
    register("info_nce", InfoNCELoss, config=InfoNCEConfig)
    register("contrastive_margin", ContrastiveMarginLoss, config=ContrastiveMarginConfig)
    register("triplet", TripletLoss, config=TripletConfig)
