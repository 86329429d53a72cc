"""Debiased contrastive loss (Chuang et al., "Debiased Contrastive Learning", NeurIPS 2020).

Some "negatives" of an instance-discrimination loss share the query's class. With class prior tau+,
the debiased estimate of the negatives' term replaces the plain sum over the N negatives:

    Ng = max((sum_j exp(q.n_j / t) - N tau+ exp(q.k / t)) / (1 - tau+),  N exp(-1 / t))
    loss = -log(exp(q.k / t) / (exp(q.k / t) + Ng))

A ContrastiveLoss, the call of sslcore's ``info_nce``, so it fits the loss slot of MoCo, PCL or any method
whose slot needs one; ``sslcore validate`` refuses it in a slot that needs a paired loss.
"""

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from sslcore import hookimpl
from sslcore.api.hookspecs import ContrastiveLoss, RegisterLoss


class DebiasedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.2, gt=0, description="t, the softmax temperature.")
    tau_plus: float = Field(0.1, ge=0, lt=1, description="tau+, the prior probability of a same-class negative.")


class DebiasedInfoNCELoss(torch.nn.Module, ContrastiveLoss):
    def __init__(self, config: DebiasedConfig) -> None:
        super().__init__()
        self.t, self.tau_plus = config.temperature, config.tau_plus

    def forward(self, q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor,
                exclude: torch.Tensor | None = None) -> torch.Tensor:
        """``q``, ``k``: N x D, ``negatives``: K x D, all L2-normalised; ``exclude``: N x K bool or None."""
        # exp(q.n / t) over a small t needs float32: autocast would run the matmul in bf16
        with torch.autocast(q.device.type, enabled=False):
            q, k, negatives = q.float(), k.float(), negatives.float()
            pos = torch.exp((q * k).sum(1) / self.t)  # N
            neg = torch.exp(q @ negatives.T / self.t)  # N x K
            count = torch.full_like(pos, negatives.shape[0])  # N: the negatives that count, on q's device
            if exclude is not None:
                neg = neg.masked_fill(exclude, 0.0)
                count = count - exclude.sum(1)
            ng = (neg.sum(1) - count * self.tau_plus * pos) / (1 - self.tau_plus)
            ng = torch.maximum(ng, count * math.exp(-1 / self.t))  # the estimator's lower bound
            return -torch.log(pos / (pos + ng)).mean()


@hookimpl
def register_losses(register: RegisterLoss) -> None:
    register("debiased_info_nce", DebiasedInfoNCELoss, config=DebiasedConfig)
