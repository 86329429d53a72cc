"""Losses shared by several methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslcore import hookimpl
from sslcore.hookspecs import Register


class InfoNCEConfig(BaseModel):
    """Parameters of the InfoNCE loss."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.2, gt=0, description="tau, the softmax temperature (0.2 in MoCo v2).")


class InfoNCELoss(nn.Module):
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


@hookimpl
def register_losses(register: Register) -> None:
    register("info_nce", InfoNCELoss, config=InfoNCEConfig)
