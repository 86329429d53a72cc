"""What the engine tells methods and evaluators about the run they are part of."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from sslcore.api.errors import UserError
from sslcore.registry import Registry


@dataclass
class MethodContext:
    """Passed to a method's factory (``context=``) and to ``on_epoch_start``."""

    world_size: int
    rank: int
    global_batch_size: int
    steps_per_epoch: int
    epochs: int
    device: torch.device
    dataset_size: int  # images in the training set (all workers): per-image state is sized by it
    run_dir: Path | None = None
    registry: Registry | None = None
    eval_context: EvalContext | None = None  # builds the training data under the eval transform (E-steps)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


@dataclass
class EvalContext:
    """Passed to ``evaluator.evaluate``: builds evaluation data with the run's eval transform."""

    registry: Registry
    eval_transform: Callable[[np.ndarray], torch.Tensor]
    train_data: dict[str, Any]
    device: torch.device
    batch_size: int
    num_workers: int
    epoch: int = 0
    channels_last: bool = False
    autocast_dtype: torch.dtype | None = None
    run_dir: Path | None = None  # where evaluators write pictures (PNG)
    # the augmentation's random crop and flip for training classifiers; None: they train on eval_transform
    labelled_transform: Callable[[np.ndarray], torch.Tensor] | None = None

    def dataset(self, block: dict[str, Any] | None = None, augmented: bool = False) -> torch.utils.data.Dataset:
        """The dataset of ``block`` (the training data when None), items ``(tensor, label)``, through the eval
        transform, or ``augmented`` through :attr:`labelled_transform` (a classifier's training set)."""
        from sslcore.engine.data import EvalDataset

        transform = (self.labelled_transform or self.eval_transform) if augmented else self.eval_transform
        return EvalDataset(self.registry.build("dataset", block or self.train_data), transform)

    def classes(self, block: dict[str, Any] | None = None) -> list[str]:
        """The class names of ``block``'s dataset (the training data when None); empty when unlabeled."""
        return list(self.registry.build("dataset", block or self.train_data).classes)

    def targets(self, block: dict[str, Any] | None = None) -> torch.Tensor:
        """Every item's label in ``block``'s dataset (-1: unlabeled), without decoding the images."""
        dataset = self.registry.build("dataset", block or self.train_data)
        return torch.as_tensor(np.asarray(dataset.targets), dtype=torch.long)

    def loader(self, block: dict[str, Any] | None = None) -> DataLoader:
        """A sequential DataLoader over :meth:`dataset`, batches ``(images N x 3 x S x S, labels N)``."""
        return DataLoader(self.dataset(block), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, persistent_workers=False)

    @torch.no_grad()
    def features(self, backbone: torch.nn.Module, block: dict[str, Any] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features (float32, on the CPU) and labels of every item of ``block``'s dataset."""
        features, labels = [], []
        for images, targets in self.loader(block):
            with self.autocast():
                out = backbone(self.to_device(images))
            features.append(out.float().cpu())
            labels.append(targets)
        return torch.cat(features), torch.cat(labels)

    def labelled_features(self, backbone: torch.nn.Module, block: dict[str, Any] | None, where: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`features`, raising a one-line error naming ``where`` (the config key) when ``block``'s
        dataset has images without a class label."""
        features, labels = self.features(backbone, block)
        if (labels < 0).any():
            source = block or self.train_data
            raise UserError(f"{where} needs labelled data: {source.get('root', source)} has images without a "
                            "class label; point it at a folder of class subfolders (image_folder, labeled: true)")
        return features, labels

    @torch.no_grad()
    def embed_training_data(self, embed: Callable[[torch.Tensor], torch.Tensor], *, equal_batches: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """``embed(images)`` of every training image under the eval transform, N x D float32 on the CPU, and
        the labels (N, -1 when unlabelled), the same on every worker: worker w embeds the w-th contiguous slice
        of the dataset (under :meth:`autocast`, images through :meth:`to_device`) and the slices are
        all-gathered. For E-steps (PCL's k-means, DeepCluster v2's memory). ``equal_batches``: batches of
        near-equal sizes, never one of a single image (which training-mode BatchNorm refuses)."""
        import math

        from torch.utils.data import Subset

        from sslcore.toolkit.distributed import concat_all_gather, rank, world_size

        dataset = self.dataset()
        n, workers, me = len(dataset), world_size(), rank()
        per_worker = math.ceil(n / workers)
        mine = list(range(me * per_worker, min((me + 1) * per_worker, n)))
        mine += [n - 1] * (per_worker - len(mine))  # equal slices for all_gather; the padding is cut below
        if equal_batches:
            sizes = math.ceil(per_worker / self.batch_size)
            batches = [b.tolist() for b in torch.arange(per_worker).tensor_split(sizes)]
            loader = DataLoader(Subset(dataset, mine), batch_sampler=batches, num_workers=self.num_workers)
        else:
            loader = DataLoader(Subset(dataset, mine), batch_size=self.batch_size, shuffle=False,
                                num_workers=self.num_workers)
        features, labels = [], []
        for images, targets in loader:
            with self.autocast():
                features.append(embed(self.to_device(images)).float())
            labels.append(targets.to(self.device))
        features = concat_all_gather(torch.cat(features))[:n]  # N x D
        labels = concat_all_gather(torch.cat(labels).long())[:n]
        return features.cpu(), labels.cpu()

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of images on the run's device, in its memory format."""
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def autocast(self) -> torch.autocast:
        """The run's mixed precision, for evaluators that run the backbone themselves."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)
