"""The training data pipeline: multi-view and eval wrappers over datasets, DataLoader worker seeding.

Datasets (``register_datasets``) yield ``(image, label)`` with ``image`` an H x W x 3 uint8 RGB array. The
wrappers here apply the augmentation (training) or the eval transform (evaluators) and skip images that
cannot be decoded, replacing each by the next readable item so that every batch keeps its size.

On the device path (:class:`DecodedImages`) the workers only decode, and the engine makes the views of each
batch on the device from a generator seeded by ``(epoch seed, batch)``. Otherwise every training item's
augmentation is seeded by ``(epoch seed, index)``, and :class:`EpochSampler` gives
each worker its shard of the epoch's permutation from any batch on: so an epoch resumed at batch ``b``
(a mid-epoch checkpoint) sees exactly the views it would have seen, with any number of loader workers.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from sslcore.api.errors import TrainingError, UnreadableImage
from sslcore.api.hookspecs import Augmentation

logger = logging.getLogger("sslcore.data")


class _SkipUnreadable(Dataset):
    """Reads item ``i`` of a dataset, or the next readable one when its image cannot be decoded."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def _read(self, index: int) -> tuple[np.ndarray, int]:
        size = len(self.dataset)
        if not -size <= index < size:
            raise IndexError(f"index {index} out of range for a dataset of {size} items")
        for offset in range(size):
            try:
                return self.dataset[(index + offset) % size]
            except UnreadableImage as exc:
                if exc.path not in self._reported:
                    self._reported.add(exc.path)
                    logger.warning("skipping unreadable image %s: %s", exc.path, exc.reason)
        raise TrainingError(f"no readable image in the dataset: all {size} items failed to decode "
                            "(see the warnings above); check the data block's root or path")


class MultiViewDataset(_SkipUnreadable):
    """Training items: ``(views, label, index)`` with ``views = augmentation.views(image)``; ``index`` is the
    item's position in the dataset, for methods that keep per-sample state (PCL's cluster assignments).

    Before each item the augmentation is reseeded from ``(epoch seed, index)``: an item's views depend on
    nothing else (not on the items before it, the loader worker or a resume)."""

    def __init__(self, dataset: Dataset, augmentation: Augmentation) -> None:
        super().__init__(dataset)
        self.augmentation = augmentation
        self.seed = 0

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int, int]:
        image, label = self._read(index)
        self.augmentation.set_seed(item_seed(self.seed, index))
        return self.augmentation.views(image), label, index

    def set_seed(self, seed: int) -> None:
        """The epoch's seed, from which each item's augmentation seed derives."""
        self.seed = seed


class DecodedImages(_SkipUnreadable):
    """Training items for augmentation on the device: ``(image, label, index)`` with ``image`` the decoded
    H x W x 3 uint8 tensor, shrunk (area resampling, aspect kept) when its longer side exceeds ``max_side``;
    batched by :func:`sslcore.toolkit.device_views.pad_collate`. Nothing here is random."""

    def __init__(self, dataset: Dataset, max_side: int | None) -> None:
        super().__init__(dataset)
        self.max_side = max_side

    def set_seed(self, seed: int) -> None:
        """Nothing to seed: the engine seeds the device path per batch."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:  # type: ignore[override]
        image, label = self._read(index)
        h, w = image.shape[:2]
        if self.max_side is not None and max(h, w) > self.max_side:
            import cv2

            factor = self.max_side / max(h, w)
            image = cv2.resize(image, (max(1, round(w * factor)), max(1, round(h * factor))),
                               interpolation=cv2.INTER_AREA)
        return torch.from_numpy(np.ascontiguousarray(image)), label, index


def item_seed(seed: int, index: int) -> int:
    """The augmentation seed of item ``index`` in an epoch of seed ``seed`` (a cheap, well-spread mix)."""
    return (seed * 0x9E3779B1 + index * 0x85EBCA77 + 0x165667B1) % 2**32


class EpochSampler(Sampler[int]):
    """This worker's indices of an epoch: a permutation of the dataset set by ``(seed, epoch)``, every
    ``world_size``-th from ``rank`` (each worker a disjoint shard of equal size, the tail dropped as
    DistributedSampler's ``drop_last`` does), from batch ``start`` on.

    ``set_epoch(epoch, start)`` before iterating; ``start`` > 0 resumes an epoch without decoding a single
    skipped image."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, batch_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size, self.batch_size = size, seed, rank, world_size, batch_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _shard(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        usable = self.size // self.world_size * self.world_size
        return order[self.rank:usable:self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard()[self.start * self.batch_size:].tolist())

    def __len__(self) -> int:
        return max(0, self.size // self.world_size - self.start * self.batch_size)


class EvalDataset(_SkipUnreadable):
    """Evaluation items: ``(transform(image), label)``."""

    def __init__(self, dataset: Dataset, transform: Callable[[np.ndarray], torch.Tensor]) -> None:
        super().__init__(dataset)
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self._read(index)
        return self.transform(image), label


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seeds numpy and ``random`` per worker from the worker's torch seed,
    which the DataLoader derives from its seeded generator and the worker id (a dataset's own code that
    draws from them repeats across runs; the augmentation is seeded per item, see above)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


__all__ = ["DecodedImages", "EpochSampler", "EvalDataset", "MultiViewDataset", "item_seed", "seed_worker"]
