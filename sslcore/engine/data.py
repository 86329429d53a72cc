"""The training data pipeline: multi-view and eval wrappers over datasets, DataLoader worker seeding.

Datasets (``register_datasets``) yield ``(image, label)`` with ``image`` an H x W x 3 uint8 RGB array. The
wrappers here apply the augmentation (training) or the eval transform (evaluators) and skip images that
cannot be decoded, replacing each by the next readable item so that every batch keeps its size.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

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
    item's position in the dataset, for methods that keep per-sample state (PCL's cluster assignments)."""

    def __init__(self, dataset: Dataset, augmentation: Augmentation) -> None:
        super().__init__(dataset)
        self.augmentation = augmentation

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int, int]:
        image, label = self._read(index)
        return self.augmentation.views(image), label, index

    def set_seed(self, seed: int) -> None:
        """Reseed the augmentation (each DataLoader worker, through :func:`seed_worker`)."""
        self.augmentation.set_seed(seed)


class EvalDataset(_SkipUnreadable):
    """Evaluation items: ``(transform(image), label)``."""

    def __init__(self, dataset: Dataset, transform: Callable[[np.ndarray], torch.Tensor]) -> None:
        super().__init__(dataset)
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self._read(index)
        return self.transform(image), label


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` of a :class:`MultiViewDataset`: seeds numpy, ``random`` and the
    dataset's augmentation per worker.

    The seed is the worker's torch seed, which the DataLoader derives from its generator and the worker
    id, so a loader with a seeded generator gives the same augmented batches on every run.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    if info is not None:
        info.dataset.set_seed(seed)


__all__ = ["EvalDataset", "MultiViewDataset", "seed_worker"]
