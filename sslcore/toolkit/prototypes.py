"""Prototypes and the Sinkhorn-Knopp equipartition of SwAV and DeepCluster v2 (Caron et al. 2020,
facebookresearch/swav ``main_swav.py``, ``main_deepclusterv2.py``, ``src/resnet50.py``).

A prototype layer holds K trainable vectors c_k (the rows of a bias-free linear layer); the scores of an
L2-normalised embedding z are z . c_k. SwAV and DeepCluster v2 keep the prototypes on the unit sphere by
normalising them before every forward (:meth:`PrototypeLayer.normalize_`), so the scores are cosines.

Sinkhorn-Knopp turns the scores of a batch of B embeddings into soft codes Q (B x K) under the
equipartition constraint, every prototype receiving B/K of the mass (SwAV's eq. 3-4):

    Q = Diag(u) exp(S / epsilon) Diag(v),  rows of Q^T summing to 1/K, columns to 1/B,

found by alternately normalising the K rows and the B columns, ``iterations`` times; each sample's code is
then scaled to sum to 1. Over several workers the sums are all-reduced, so the codes are those of the
global batch (``distributed_sinkhorn`` in main_swav.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sslcore.toolkit.distributed import is_distributed, world_size


class PrototypeLayer(nn.Module):
    """One or several heads of prototypes: ``heads[h]`` is a bias-free ``Linear(dim, K_h)`` whose weight rows
    are the prototypes c (SwAV: one head of 3000; DeepCluster v2: three of 3000, ``MultiPrototypes``).

    ``forward(z: N x dim) -> [N x K_h for each head]``, the scores z . c.
    """

    def __init__(self, dim: int, num_prototypes: int | Sequence[int]) -> None:
        super().__init__()
        sizes = [num_prototypes] if isinstance(num_prototypes, int) else list(num_prototypes)
        if not sizes or min(sizes) < 1:
            raise ValueError(f"prototypes: every head needs at least one prototype, got {sizes}")
        self.num_prototypes = sizes
        self.heads = nn.ModuleList(nn.Linear(dim, k, bias=False) for k in sizes)

    @torch.no_grad()
    def normalize_(self) -> None:
        """Project every prototype back onto the unit sphere, in place (before each forward)."""
        for head in self.heads:
            head.weight.copy_(F.normalize(head.weight, dim=1))

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [head(z) for head in self.heads]


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3, *,
             global_batch: bool = True) -> torch.Tensor:
    """Codes Q: N x K (each row summing to 1) of this worker's ``scores`` (N x K), under the equipartition of
    the global batch (see the module docstring; ``global_batch`` False: of these N samples alone, with no
    collective, for code that runs on one rank). Computed in float32; the scores are shifted by their
    maximum before the exponential, which the normalisations cancel, so a small epsilon cannot overflow."""
    gather = global_batch and is_distributed()
    scores = scores.float()
    shift = scores.max()
    if gather:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = torch.exp((scores - shift) / epsilon).T  # K x N
    k, b = q.shape[0], q.shape[1] * (world_size() if gather else 1)  # B: the global batch
    _normalize(q, q.sum(), gather)
    for _ in range(iterations):
        _normalize(q, q.sum(dim=1, keepdim=True) * k, gather)  # every prototype gets 1/K of the mass
        q /= q.sum(dim=0, keepdim=True) * b  # every sample gives 1/B (its own column: no reduce)
    return (q * b).T  # each sample's code sums to 1


def _normalize(q: torch.Tensor, sums: torch.Tensor, gather: bool) -> None:
    """q /= sums, the sums all-reduced over the workers when ``gather``."""
    if gather:
        dist.all_reduce(sums)
    q /= sums
