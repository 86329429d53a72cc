"""Augmentation recipes, in albumentations on uint8 numpy images (several times faster than torchvision
on the CPU, see MEASURED.md).

``moco_v2`` is the recipe of MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive
Learning"): a random resized crop, color jitter, random grayscale, Gaussian blur and a horizontal flip,
applied independently to make two views of each image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator

from sslcore import hookimpl
from sslcore.hookspecs import Register

if TYPE_CHECKING:  # imported where a pipeline is built, not when the registry loads (startup time)
    import albumentations as A

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AreaFraction = Annotated[float, Field(gt=0, le=1)]


class MoCoV2Config(BaseModel):
    """Parameters of the MoCo v2 augmentation recipe."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(224, gt=0, description="Side of the square views and of the eval crop, in pixels.")
    scale: tuple[AreaFraction, AreaFraction] = Field(
        (0.2, 1.0), description="Range of the crop's area as a fraction of the image (RandomResizedCrop).")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="Per-channel mean for normalization.")
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        IMAGENET_STD, description="Per-channel standard deviation for normalization.")
    blur_min_size: int = Field(
        64, ge=0, description="Smallest size at which Gaussian blur is applied. Below it the blur is left "
                              "out: a sigma of up to 2 px wipes out most of a 32 px image (SimCLR's "
                              "CIFAR-10 recipe leaves it out too).")

    @field_validator("scale")
    @classmethod
    def _ordered(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if scale[0] > scale[1]:
            raise ValueError(f"scale is (min, max), got min {scale[0]} > max {scale[1]}")
        return scale


def _reseed(compose: A.Compose, seed: int) -> None:
    """Seed ``compose`` and give each of its transforms its own stream derived from ``seed``.

    ``Compose.set_random_seed`` gives every transform the same seed, so their coin flips coincide
    (with p=0.2 grayscale and p=0.5 flip, every grayscale view would also be flipped).
    """
    compose.set_random_seed(seed)
    child_seeds = np.random.SeedSequence(seed).generate_state(len(compose.transforms))
    for transform, child_seed in zip(compose.transforms, child_seeds, strict=True):
        transform.set_random_seed(int(child_seed))


class MoCoV2Augmentation:
    """Two independently augmented views per image (MoCo v2), and the deterministic eval transform."""

    num_views = 2

    def __init__(self, config: MoCoV2Config) -> None:
        import albumentations as A

        size = config.size
        blur = ([A.GaussianBlur(sigma_limit=(0.1, 2.0), blur_limit=0, p=0.5)]
                if size >= config.blur_min_size else [])
        self.train_transform = A.Compose([
            A.RandomResizedCrop(size=(size, size), scale=config.scale),
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
            A.ToGray(p=0.2),
            *blur,
            A.HorizontalFlip(p=0.5),
            A.Normalize(mean=config.mean, std=config.std),
            A.ToTensorV2(),
        ])
        # The ImageNet protocol resizes to 256 and crops 224; small images are resized to size and cropped.
        resize = round(size * 256 / 224) if size >= 64 else size
        self.eval_transform = A.Compose([
            A.SmallestMaxSize(max_size=resize),
            A.CenterCrop(height=size, width=size),
            A.Normalize(mean=config.mean, std=config.std),
            A.ToTensorV2(),
        ])

    def views(self, image: np.ndarray) -> list[torch.Tensor]:
        """``image``: H x W x 3 uint8 RGB -> two float tensors 3 x S x S."""
        return [self.train_transform(image=image)["image"] for _ in range(self.num_views)]

    def eval(self, image: np.ndarray) -> torch.Tensor:
        """``image``: H x W x 3 uint8 RGB -> float tensor 3 x S x S (resize, center crop, normalize)."""
        return self.eval_transform(image=image)["image"]

    def set_seed(self, seed: int) -> None:
        """Reseed both transforms; the same seed gives the same sequence of views."""
        _reseed(self.train_transform, seed)
        _reseed(self.eval_transform, seed)


@hookimpl
def register_augmentations(register: Register) -> None:
    register("moco_v2", MoCoV2Augmentation, config=MoCoV2Config)
