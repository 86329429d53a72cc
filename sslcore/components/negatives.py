"""Sources of negatives for contrastive losses: the other keys of the batch, a queue of past keys, or a
memory bank of every training sample — the three mechanisms the MoCo paper compares (its Fig. 2 and 3).

For a query ``q`` (N x D) and its positive key ``k`` (N x D), a source gives the K negative keys
(K x D) that InfoNCE contrasts ``q`` against, and a mask of the ones a query must not count.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslcore import hookimpl
from sslcore.api.errors import TrainingError
from sslcore.api.hookspecs import NegativeSource, RegisterNegativeSource
from sslcore.toolkit.distributed import concat_all_gather, rank

logger = logging.getLogger(__name__)


class InBatchConfig(BaseModel):
    """In-batch negatives have no parameters."""

    model_config = ConfigDict(extra="forbid")


class InBatchNegatives(nn.Module, NegativeSource):
    """The keys of the whole global batch (all workers) are the negatives; each query's own key is excluded.

    No state: ``update`` does nothing. Keys are detached, so no gradient flows through the negatives.
    """

    def __init__(self, config: InBatchConfig, *, dim: int, global_batch_size: int, dataset_size: int) -> None:
        super().__init__()

    def negatives(self, q: torch.Tensor, k: torch.Tensor,
                  index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keys = concat_all_gather(k.detach())  # B x D, B = N x workers, in rank order
        n = k.shape[0]
        own = torch.arange(n, device=k.device)
        exclude = torch.zeros(n, keys.shape[0], dtype=torch.bool, device=k.device)  # N x B
        exclude[own, rank() * n + own] = True
        return keys, exclude

    def update(self, k: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Nothing to remember between steps."""


class QueueConfig(BaseModel):
    """Parameters of the MoCo queue."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(65536, gt=0, description="K, the number of past keys kept as negatives; a multiple "
                                               "of the global batch size (train.batch_size).")


class QueueNegatives(nn.Module, NegativeSource):
    """The MoCo dictionary (He et al. 2020): a FIFO queue of the K most recent keys of all workers.

    ``queue`` is K x D (official MoCo stores its transpose, D x K), initialised with random unit vectors;
    ``ptr`` is where the next batch of keys is written. Both are buffers, so a checkpoint carries them.
    Keys are stored in float32 whatever the autocast dtype.
    """

    queue: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, config: QueueConfig, *, dim: int, global_batch_size: int, dataset_size: int) -> None:
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

    def negatives(self, q: torch.Tensor, k: torch.Tensor,
                  index: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        # A copy: update() overwrites the queue in place before backward() needs these values.
        return self.queue.clone().detach(), None  # K x D

    @torch.no_grad()
    def update(self, k: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Enqueue the keys of all workers (in rank order) in place of the oldest ones."""
        keys = concat_all_gather(k.detach()).to(self.queue.dtype)  # B x D
        size = self.queue.shape[0]
        ptr = int(self.ptr)
        # With size a multiple of B each batch fills one contiguous block; the modulo keeps a smaller
        # last batch of an epoch (drop_last=False) from running past the end.
        self.queue[(ptr + torch.arange(keys.shape[0], device=keys.device)) % size] = keys
        self.ptr.fill_((ptr + keys.shape[0]) % size)


class MemoryBankConfig(BaseModel):
    """Parameters of the memory bank; its size is not one: it holds one entry per training image."""

    model_config = ConfigDict(extra="forbid")

    num_negatives: int = Field(4096, gt=0, description="K, bank entries drawn uniformly (with replacement) as the "
                                                      "negatives of each step (InstDisc: 4096)")
    momentum: float = Field(0.5, ge=0.0, lt=1.0, description="m in v_i <- normalize(m v_i + (1 - m) k_i), the "
                                                             "share of its old entry a sample keeps (InstDisc: 0.5)")
    seed: int = Field(0, ge=0, lt=2**31, description="seeds the initial bank and the draws of negatives, the same "
                                                     "on every worker")
    positive: Literal["bank", "key"] = Field(
        "bank", description="the positive of each query: 'bank', the image's own entry v_i (InstDisc; the MoCo "
                            "paper's Fig. 2b, keys and positive alike from the bank); 'key', the key k of the "
                            "method's other view, fresher than the negatives (a shortcut: the query can tell "
                            "the positive by its freshness)")


class MemoryBankNegatives(nn.Module, NegativeSource):
    """The memory bank of Instance Discrimination (Wu et al. 2018, "InstDisc"), the MoCo paper's second mechanism.

    ``bank`` (N x D float32, N the training images) holds one L2-normalised entry v_i per image i, initialised
    with random unit vectors. Each step draws K image ids uniformly with replacement; every query of the global
    batch contrasts against those K entries, and ``exclude`` marks the draws that are the query's own image, so
    an image is never its own negative. The positive of query i is its image's entry v_i (``positive``), as in
    InstDisc, so positive and negatives are equally stale. After the loss the keys of all workers go to their
    images' entries with InstDisc's proximal update (official lemniscate.pytorch, ``NCEAverage``'s backward)::

        v_i <- (m v_i + (1 - m) k_i) / ||m v_i + (1 - m) k_i||

    Every worker applies it to the same gathered keys, so the banks are replicated (N x D x 4 bytes each). Draw t
    comes from a generator seeded with (seed, t), with t the ``step`` buffer: every worker draws the same ids
    without communicating, and a resumed run draws as an uninterrupted one. Against InstDisc's code: it draws K
    ids per query (one shared draw keeps this contract's K x D negatives and one matrix product), it writes the
    query's own features into the bank where here the key k of the other view goes (with the MoCo method's
    ``momentum: 0``, the same encoder), and its initial entries are uniform with E||v||^2 = 1.
    """

    needs_index = True
    bank: torch.Tensor
    step: torch.Tensor

    def __init__(self, config: MemoryBankConfig, *, dim: int, global_batch_size: int, dataset_size: int) -> None:
        super().__init__()
        self.num_negatives, self.m, self.seed = config.num_negatives, config.momentum, config.seed
        self.positive_from_bank = config.positive == "bank"
        generator = torch.Generator().manual_seed(config.seed)
        self.register_buffer("bank", F.normalize(torch.randn(dataset_size, dim, generator=generator), dim=1))  # N x D
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        logger.info("memory_bank: %d x %d float32 = %.1f MiB on every worker", dataset_size, dim,
                    dataset_size * dim * 4 / 2**20)

    def draw(self) -> torch.Tensor:
        """The K image ids of this step (CPU, long): the same on every worker and after a resume."""
        # torch's CPU generator keeps 32 bits of a seed: seed and step are mixed into those (golden-ratio
        # multiplier), so the draws of different seeds do not coincide
        generator = torch.Generator().manual_seed((self.seed * 0x9E3779B1 + int(self.step)) % 2**32)
        return torch.randint(self.bank.shape[0], (self.num_negatives,), generator=generator)

    def negatives(self, q: torch.Tensor, k: torch.Tensor,
                  index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``index``: the N dataset ids of the batch's images (row i of q and k is image index[i])."""
        self._check(index)
        ids = self.draw().to(self.bank.device)  # K
        # bank[ids] is a copy: update() writes the bank before backward() needs these values
        exclude = index.to(ids.device)[:, None] == ids[None, :]  # N x K: the draws of the query's own image
        return self.bank[ids], exclude  # K x D, N x K

    def positive(self, k: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Query i's positive: its image's entry v_i (a copy, N x D), or ``k`` itself with ``positive: key``."""
        if not self.positive_from_bank:
            return k
        self._check(index)
        return self.bank[index.to(self.bank.device)].to(k.dtype)

    @torch.no_grad()
    def update(self, k: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Write the keys of all workers to their images' entries with the momentum update."""
        self._check(index)
        keys = concat_all_gather(k.detach()).to(self.bank.dtype)  # B x D, B = N x workers
        ids = concat_all_gather(index.to(self.bank.device))  # B
        # DistributedSampler pads an epoch with repeated images: each image keeps its last key of the batch, so
        # every worker writes the same rows whatever index_copy_ does with duplicates
        unique, inverse = torch.unique(ids, return_inverse=True)
        positions = torch.arange(ids.shape[0], device=ids.device)
        last = torch.full_like(unique, -1).scatter_reduce_(0, inverse, positions, reduce="amax")
        v = self.m * self.bank[unique] + (1 - self.m) * keys[last]  # U x D
        self.bank.index_copy_(0, unique, F.normalize(v, dim=1))
        self.step += 1

    def _check(self, index: torch.Tensor | None) -> None:
        if index is None:  # validate refuses a method that does not declare uses_index; this is the last guard
            raise TrainingError("negatives: memory_bank needs the dataset index of each image and this method "
                                "passes none; use negatives: {name: queue} or in_batch")


@hookimpl
def register_negative_sources(register: RegisterNegativeSource) -> None:
    register("in_batch", InBatchNegatives, config=InBatchConfig)
    register("queue", QueueNegatives, config=QueueConfig)
    register("memory_bank", MemoryBankNegatives, config=MemoryBankConfig)
