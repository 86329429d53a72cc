"""Sources of negatives for contrastive losses: the other keys of the batch, or a queue of past keys.

For a query ``q`` (N x D) and its positive key ``k`` (N x D), a source gives the K negative keys
(K x D) that InfoNCE contrasts ``q`` against, and a mask of the ones a query must not count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslcore import hookimpl
from sslcore.distributed import concat_all_gather, rank
from sslcore.hookspecs import Register


class InBatchConfig(BaseModel):
    """In-batch negatives have no parameters."""

    model_config = ConfigDict(extra="forbid")


class InBatchNegatives(nn.Module):
    """The keys of the whole global batch (all workers) are the negatives; each query's own key is excluded.

    No state: ``update`` does nothing. Keys are detached, so no gradient flows through the negatives.
    """

    def __init__(self, config: InBatchConfig, *, dim: int, global_batch_size: int) -> None:
        super().__init__()

    def negatives(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = concat_all_gather(k.detach())  # B x D, B = N x workers, in rank order
        n = k.shape[0]
        own = torch.arange(n, device=k.device)
        exclude = torch.zeros(n, keys.shape[0], dtype=torch.bool, device=k.device)  # N x B
        exclude[own, rank() * n + own] = True
        return keys, exclude

    def update(self, k: torch.Tensor) -> None:
        """Nothing to remember between steps."""


class QueueConfig(BaseModel):
    """Parameters of the MoCo queue."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(65536, gt=0, description="K, the number of past keys kept as negatives; a multiple "
                                               "of the global batch size (train.batch_size).")


class QueueNegatives(nn.Module):
    """The MoCo dictionary (He et al. 2020): a FIFO queue of the K most recent keys of all workers.

    ``queue`` is K x D (official MoCo stores its transpose, D x K), initialised with random unit vectors;
    ``ptr`` is where the next batch of keys is written. Both are buffers, so a checkpoint carries them.
    Keys are stored in float32 whatever the autocast dtype.
    """

    queue: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, config: QueueConfig, *, dim: int, global_batch_size: int) -> None:
        super().__init__()
        size = config.size
        if size % global_batch_size:
            below = size // global_batch_size * global_batch_size
            above = below + global_batch_size
            fix = f"use {below} or {above}" if below else f"use {above}"
            raise ValueError(f"queue size {size} is not a multiple of the global batch size "
                             f"{global_batch_size} (train.batch_size): {fix}")
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))  # K x D
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def negatives(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, None]:
        # A copy: update() overwrites the queue in place before backward() needs these values.
        return self.queue.clone().detach(), None  # K x D

    @torch.no_grad()
    def update(self, k: torch.Tensor) -> None:
        """Enqueue the keys of all workers (in rank order) in place of the oldest ones."""
        keys = concat_all_gather(k.detach()).to(self.queue.dtype)  # B x D
        size = self.queue.shape[0]
        ptr = int(self.ptr)
        # With size a multiple of B each batch fills one contiguous block; the modulo keeps a smaller
        # last batch of an epoch (drop_last=False) from running past the end.
        self.queue[(ptr + torch.arange(keys.shape[0], device=keys.device)) % size] = keys
        self.ptr.fill_((ptr + keys.shape[0]) % size)


@hookimpl
def register_negative_sources(register: Register) -> None:
    register("in_batch", InBatchNegatives, config=InBatchConfig)
    register("queue", QueueNegatives, config=QueueConfig)
