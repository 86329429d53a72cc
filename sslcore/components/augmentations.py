"""Augmentation recipes, in albumentations on uint8 numpy images (several times faster than torchvision
on the CPU, see MEASURED.md).

Three recipes make two views of every image with random crops and colour distortions:

- ``moco_v2``: MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"): a random
  resized crop, color jitter, random grayscale, Gaussian blur and a horizontal flip, the same for both views;
- ``simclr``: SimCLR (Chen et al. 2020), its colour distortion of strength s: jitter 0.8s/0.8s/0.8s/0.2s
  with p 0.8, grayscale p 0.2, blur p 0.5, crops of 8-100% of the area;
- ``byol``: BYOL (Grill et al. 2020), asymmetric: view 1 always blurred and never solarized, view 2
  blurred with p 0.1 and solarized with p 0.2 (Barlow Twins and VICReg use it too).

two make multi-crop views of different sizes, 2 global crops then V local ones, each group with its own
side, area range and pipeline:

- ``swav``: SwAV (Caron et al. 2020, facebookresearch/swav ``src/multicropdataset.py``): 2 x 224 px of
  14-100% and 6 x 96 px of 5-14% of the area, each with SimCLR's colour distortion (jitter 0.8/0.8/0.8/0.2,
  p 0.8; grayscale 0.2) and blur p 0.5 (DeepCluster v2 uses it too);
- ``dino``: DINO (Caron et al. 2021, facebookresearch/dino ``main_dino.py`` DataAugmentationDINO): 2 x 224 px
  of 40-100% (bicubic), the first always blurred, the second blurred with p 0.1 and solarized with p 0.2, and
  8 x 96 px of 5-40% blurred with p 0.5, all with BYOL's jitter (0.4/0.4/0.2/0.1, p 0.8; grayscale 0.2);

and one makes a single view, for methods that corrupt it themselves:

- ``mae``: MAE (He et al. 2022): a random resized crop of 20-100% of the area (bicubic) and a horizontal
  flip, no colour distortion; the masking is the method's.

Gaussian blur is left out below ``blur_min_size`` pixels (SimCLR's CIFAR-10 recipe leaves it out too).

Each recipe describes its views as :class:`~sslcore.toolkit.device_views.ViewSpec` s, and both paths are built
from them: on the CPU an albumentations pipeline per view, run per image in the DataLoader workers; on the
training device (``device: true``, or ``auto`` on a GPU) the loader workers only decode, and the same random
operations run batched on the device, each sample with its own parameters
(:mod:`sslcore.toolkit.device_views`). The eval and labelled transforms stay on the CPU.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator, model_validator

from sslcore import hookimpl
from sslcore.api.hookspecs import Augmentation, RegisterAugmentation
from sslcore.toolkit.device_views import IMAGENET_MEAN, IMAGENET_STD, ViewSpec, device_views

if TYPE_CHECKING:  # imported where a pipeline is built, not when the registry loads (startup time)
    import albumentations as A

AreaFraction = Annotated[float, Field(gt=0, le=1)]


class DeviceOptions(BaseModel):
    """Where the views are made: the keys every core recipe shares."""

    model_config = ConfigDict(extra="forbid")

    device: bool | Literal["auto"] = Field(
        "auto", description="true: the random operations run batched on the training device (the loader workers "
                            "only decode); false: per image in the loader workers (albumentations); auto: on the "
                            "device when it is a GPU. Same recipe and parameters either way.")
    max_source_side: int | None = Field(
        512, gt=0, description="Device path: the loader workers shrink an image whose longer side exceeds this "
                               "(area resampling, aspect kept) before the batch is padded to its largest image and "
                               "sent; null: never (a batch is as large as its largest image).")


class MoCoV2Config(DeviceOptions):
    """Parameters of the MoCo v2 augmentation recipe."""

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

    @classmethod
    def fit_to_images(cls, side: int, current: dict[str, Any]) -> dict[str, Any]:
        """Images smaller than the views (CIFAR's 32 px under an ImageNet recipe's 224): views of the images' side."""
        return {"size": side} if side < current["size"] else {}


class SimCLRConfig(MoCoV2Config):
    """Parameters of the SimCLR augmentation recipe."""

    scale: tuple[AreaFraction, AreaFraction] = Field(
        (0.08, 1.0), description="Range of the crop's area as a fraction of the image (RandomResizedCrop).")
    strength: float = Field(1.0, gt=0, description="s, the colour distortion strength (1.0 on ImageNet, 0.5 on "
                                                   "CIFAR-10 in the paper).")


Probability = Annotated[float, Field(ge=0, le=1)]


class BYOLConfig(MoCoV2Config):
    """Parameters of the BYOL augmentation recipe."""

    scale: tuple[AreaFraction, AreaFraction] = Field(
        (0.08, 1.0), description="Range of the crop's area as a fraction of the image (RandomResizedCrop).")
    blur_prob: tuple[Probability, Probability] = Field(
        (1.0, 0.1), description="Probability of Gaussian blur in view 1 and view 2 (BYOL: 1.0 and 0.1), at "
                                "blur_min_size pixels and up.")
    solarize_prob: tuple[Probability, Probability] = Field(
        (0.0, 0.2), description="Probability of solarization in view 1 and view 2 (BYOL: 0.0 and 0.2; "
                                "solo-learn's VICReg CIFAR recipe: 0.1 and 0.1).")


class OneViewConfig(BaseModel):
    """One random resized crop's size and area range, and the normalisation: what one-view recipes share
    (MAE's; a plugin's own one-view recipe, such as RotNet's, extends it)."""

    model_config = ConfigDict(extra="forbid")

    size: int = Field(224, gt=0, description="Side of the square view and of the eval crop, in pixels.")
    scale: tuple[AreaFraction, AreaFraction] = Field(
        (0.2, 1.0), description="Range of the crop's area as a fraction of the image (RandomResizedCrop).")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="Per-channel mean for normalization.")
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        IMAGENET_STD, description="Per-channel standard deviation for normalization.")

    @field_validator("scale")
    @classmethod
    def _ordered(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if scale[0] > scale[1]:
            raise ValueError(f"scale is (min, max), got min {scale[0]} > max {scale[1]}")
        return scale

    @classmethod
    def fit_to_images(cls, side: int, current: dict[str, Any]) -> dict[str, Any]:
        """Images smaller than the view: a view of the images' side."""
        return {"size": side} if side < current["size"] else {}


class MAEConfig(OneViewConfig, DeviceOptions):
    """Parameters of the MAE augmentation recipe."""


class MultiCropConfig(DeviceOptions):
    """Parameters of a multi-crop recipe (defaults: SwAV's ImageNet crops)."""

    size: int = Field(224, gt=0, description="Side of the global crops and of the eval crop, in pixels (32 on "
                                             "CIFAR-10).")
    scale: tuple[AreaFraction, AreaFraction] = Field(
        (0.14, 1.0), description="Range of a global crop's area as a fraction of the image.")
    global_crops: int = Field(2, ge=1, description="Number of global crops (2 in SwAV and DINO).")
    local_size: int = Field(96, gt=0, description="Side of the local crops in pixels (16 or 18 on CIFAR-10).")
    local_scale: tuple[AreaFraction, AreaFraction] = Field(
        (0.05, 0.14), description="Range of a local crop's area as a fraction of the image.")
    local_crops: int = Field(6, ge=0, description="V, the number of local crops (SwAV 6, DINO 8; 0: none).")
    color_jitter: tuple[float, float, float, float] = Field(
        (0.8, 0.8, 0.8, 0.2), description="Brightness, contrast, saturation and hue of the colour jitter (SwAV: "
                                          "SimCLR's at strength 1; DINO: BYOL's 0.4/0.4/0.2/0.1).")
    jitter_prob: Probability = Field(0.8, description="Probability of the colour jitter.")
    grayscale_prob: Probability = Field(0.2, description="Probability of converting to grayscale.")
    blur_prob: list[Probability] = Field(
        [0.5, 0.5], description="Probability of Gaussian blur (sigma 0.1-2) in each global crop, in order "
                                "(DINO: 1.0 and 0.1); at blur_min_size pixels and up.")
    local_blur_prob: Probability = Field(0.5, description="Probability of Gaussian blur in each local crop.")
    solarize_prob: list[Probability] = Field(
        [0.0, 0.0], description="Probability of solarization in each global crop, in order (DINO: 0.0 and 0.2).")
    local_solarize_prob: Probability = Field(0.0, description="Probability of solarization in each local crop.")
    interpolation: Literal["bilinear", "bicubic"] = Field(
        "bilinear", description="Resampling of the random resized crops (SwAV: bilinear, DINO: bicubic).")
    blur_min_size: int = Field(64, ge=0, description="Crops smaller than this are never blurred (a sigma of up to "
                                                     "2 px wipes out most of a 32 px image).")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="Per-channel mean for normalization.")
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        IMAGENET_STD, description="Per-channel standard deviation for normalization.")

    @field_validator("scale", "local_scale")
    @classmethod
    def _ordered(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if scale[0] > scale[1]:
            raise ValueError(f"scale is (min, max), got min {scale[0]} > max {scale[1]}")
        return scale

    @model_validator(mode="after")
    def _one_probability_per_global_crop(self) -> MultiCropConfig:
        for key in ("blur_prob", "solarize_prob"):
            if len(getattr(self, key)) != self.global_crops:
                raise ValueError(f"{key} needs one probability per global crop: {self.global_crops} "
                                 f"(global_crops), got {len(getattr(self, key))}")
        return self

    @classmethod
    def fit_to_images(cls, side: int, current: dict[str, Any]) -> dict[str, Any]:
        """Images smaller than the global crops: global crops of the images' side and local crops of half of it
        (solo-learn's CIFAR multi-crop: 32 and 16 px)."""
        return {"size": side, "local_size": max(1, side // 2)} if side < current["size"] else {}


class DINOMultiCropConfig(MultiCropConfig):
    """Parameters of DINO's multi-crop recipe (defaults: DINO's ImageNet crops for ViTs)."""

    scale: tuple[AreaFraction, AreaFraction] = Field(
        (0.4, 1.0), description="Range of a global crop's area (DINO: 0.4-1 for ViTs, 0.14-1 for ResNet-50).")
    local_scale: tuple[AreaFraction, AreaFraction] = Field(
        (0.05, 0.4), description="Range of a local crop's area (DINO: 0.05-0.4 for ViTs, 0.05-0.14 for ResNet-50).")
    local_crops: int = Field(8, ge=0, description="V, the number of local crops (DINO: 8).")
    color_jitter: tuple[float, float, float, float] = Field(
        (0.4, 0.4, 0.2, 0.1), description="Brightness, contrast, saturation and hue of the colour jitter.")
    blur_prob: list[Probability] = Field(
        [1.0, 0.1], description="Probability of Gaussian blur in each global crop, in order.")
    solarize_prob: list[Probability] = Field(
        [0.0, 0.2], description="Probability of solarization in each global crop, in order.")
    interpolation: Literal["bilinear", "bicubic"] = Field("bicubic", description="Resampling of the crops.")


def _reseed(compose: A.Compose, seed: int) -> None:
    """Seed ``compose``: one numpy and one Python generator, drawn from in turn by each of its transforms
    (albumentations' ``set_random_state``), so that their coin flips are independent.

    ``Compose.set_random_seed`` would give every transform the same seed, so their coin flips would coincide
    (with p=0.2 grayscale and p=0.5 flip, every grayscale view would also be flipped); it also costs ~300 us,
    twice a view of a small image, and the engine reseeds before every image (~10 us here).
    """
    compose.set_random_state(np.random.default_rng(seed), random.Random(seed))


class ViewAugmentation(Augmentation):
    """Views made by one albumentations pipeline per view, and the deterministic eval transform.

    ``view_transforms[i]`` makes view i; one pipeline may serve several views (MoCo v2's two views are
    two draws of the same pipeline). Subclasses build the pipelines of their recipe, all of one size.
    """

    def __init__(self, view_transforms: list[A.Compose],
                 config: MoCoV2Config | OneViewConfig | MultiCropConfig) -> None:
        import albumentations as A

        self.view_transforms = view_transforms
        size = config.size
        self.view_sizes = [size] * len(view_transforms)
        self.eval_size = size
        # The ImageNet protocol resizes to 256 and crops 224; small images are resized to size and cropped.
        resize = round(size * 256 / 224) if size >= 64 else size
        self.eval_transform = A.Compose([
            A.SmallestMaxSize(max_size=resize),
            A.CenterCrop(height=size, width=size),
            A.Normalize(mean=config.mean, std=config.std),
            A.ToTensorV2(),
        ])
        # The train transform of linear classification (MoCo's main_lincls.py): crop of 8-100% and flip.
        self.labelled_transform = A.Compose([
            A.RandomResizedCrop(size=(size, size), scale=(0.08, 1.0)),
            A.HorizontalFlip(p=0.5),
            A.Normalize(mean=config.mean, std=config.std),
            A.ToTensorV2(),
        ])

    def views(self, image: np.ndarray) -> list[torch.Tensor]:
        """``image``: H x W x 3 uint8 RGB -> one float tensor 3 x S x S per view."""
        return [transform(image=image)["image"] for transform in self.view_transforms]

    def eval(self, image: np.ndarray) -> torch.Tensor:
        """``image``: H x W x 3 uint8 RGB -> float tensor 3 x S x S (resize, center crop, normalize)."""
        return self.eval_transform(image=image)["image"]

    def labelled(self, image: np.ndarray) -> torch.Tensor:
        """``image`` -> a random resized crop (8-100% of the area) with a random flip, normalized: what
        evaluators that train a classifier (linear probe, fine-tuning) see."""
        return self.labelled_transform(image=image)["image"]

    def set_seed(self, seed: int) -> None:
        """Reseed every pipeline; the same seed gives the same views. Distinct pipelines get distinct
        streams, so the crops of BYOL's two views are independent. (The eval transform draws nothing.)"""
        distinct = list({id(t): t for t in self.view_transforms}.values())
        for i, transform in enumerate(distinct):
            _reseed(transform, seed if i == 0 else (seed * 0x9E3779B1 + i) % 2**63)
        _reseed(self.labelled_transform, seed)


def albumentations_pipeline(spec: ViewSpec) -> A.Compose:
    """The CPU pipeline of one view: crop, flip, colour jitter, grayscale, blur, solarize, normalise."""
    import albumentations as A
    import cv2

    interpolation = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}[spec.interpolation]
    brightness, contrast, saturation, hue = spec.jitter
    return A.Compose([
        A.RandomResizedCrop(size=(spec.size, spec.size), scale=spec.scale, ratio=spec.ratio,
                            interpolation=interpolation),
        A.HorizontalFlip(p=spec.flip_prob),
        *([A.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                         p=spec.jitter_prob)] if spec.jitter_prob else []),
        *([A.ToGray(p=spec.grayscale_prob)] if spec.grayscale_prob else []),
        *([A.GaussianBlur(sigma_limit=spec.blur_sigma, blur_limit=0, p=spec.blur_prob)] if spec.blur_prob else []),
        *([A.Solarize(threshold_range=(0.5, 0.5), p=spec.solarize_prob)] if spec.solarize_prob else []),
        A.Normalize(mean=spec.mean, std=spec.std),
        A.ToTensorV2(),
    ])


class SpecAugmentation(ViewAugmentation):
    """Views each described by a :class:`ViewSpec`: on the CPU one albumentations pipeline per distinct spec
    (two views of one spec are two draws of one pipeline), on the training device the same specs batched
    (``device_views``, :mod:`sslcore.toolkit.device_views`)."""

    def __init__(self, specs: list[ViewSpec], config: MoCoV2Config | MAEConfig | MultiCropConfig) -> None:
        pipelines: dict[ViewSpec, A.Compose] = {}
        super().__init__([pipelines.setdefault(spec, albumentations_pipeline(spec)) for spec in specs], config)
        self.view_specs = list(specs)
        self.view_sizes = [spec.size for spec in specs]
        self.max_source_side = config.max_source_side

    def device_views(self, images: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """The views of a batch of decoded images on the device (see :class:`DeviceAugmentation`)."""
        return device_views(images, sizes, self.view_specs, generator)


def _blur_prob(config: MoCoV2Config | MultiCropConfig, size: int, p: float) -> float:
    return p if size >= config.blur_min_size else 0.0


class MoCoV2Augmentation(SpecAugmentation):
    """Two independently augmented views per image (MoCo v2), and the deterministic eval transform."""

    def __init__(self, config: MoCoV2Config) -> None:
        view = ViewSpec(size=config.size, scale=config.scale, jitter=(0.4, 0.4, 0.4, 0.1), jitter_prob=0.8,
                        grayscale_prob=0.2, blur_prob=_blur_prob(config, config.size, 0.5),
                        mean=config.mean, std=config.std)
        super().__init__([view, view], config)


class SimCLRAugmentation(SpecAugmentation):
    """SimCLR's two views (its Appendix A): crop and flip, then colour distortion of strength s, then blur."""

    def __init__(self, config: SimCLRConfig) -> None:
        s = config.strength
        view = ViewSpec(size=config.size, scale=config.scale, jitter=(0.8 * s, 0.8 * s, 0.8 * s, min(0.5, 0.2 * s)),
                        jitter_prob=0.8, grayscale_prob=0.2, blur_prob=_blur_prob(config, config.size, 0.5),
                        mean=config.mean, std=config.std)
        super().__init__([view, view], config)


class BYOLAugmentation(SpecAugmentation):
    """BYOL's asymmetric pair (its Table 6): view 1 blurred always, never solarized; view 2 blurred with
    p 0.1, solarized with p 0.2 (``blur_prob``, ``solarize_prob``)."""

    def __init__(self, config: BYOLConfig) -> None:
        super().__init__([ViewSpec(size=config.size, scale=config.scale, jitter=(0.4, 0.4, 0.2, 0.1), jitter_prob=0.8,
                                   grayscale_prob=0.2, blur_prob=_blur_prob(config, config.size, blur),
                                   solarize_prob=solarize, mean=config.mean, std=config.std)
                          for blur, solarize in zip(config.blur_prob, config.solarize_prob)], config)


class MAEAugmentation(SpecAugmentation):
    """MAE's one view (its ``main_pretrain.py``): a random resized crop, bicubic, and a horizontal flip."""

    def __init__(self, config: MAEConfig) -> None:
        super().__init__([ViewSpec(size=config.size, scale=config.scale, interpolation="bicubic",
                                   mean=config.mean, std=config.std)], config)


class MultiCropAugmentation(SpecAugmentation):
    """Multi-crop (SwAV, DINO): ``global_crops`` views of side ``size``, then ``local_crops`` of side
    ``local_size`` (``view_sizes`` in that order), each a random resized crop, a flip, colour jitter, grayscale,
    blur and solarization with its group's probabilities. The local crops are draws of one pipeline."""

    def __init__(self, config: MultiCropConfig) -> None:
        def crop(size: int, scale: tuple[float, float], blur: float, solarize: float) -> ViewSpec:
            return ViewSpec(size=size, scale=scale, interpolation=config.interpolation, jitter=config.color_jitter,
                            jitter_prob=config.jitter_prob, grayscale_prob=config.grayscale_prob,
                            blur_prob=_blur_prob(config, size, blur), solarize_prob=solarize, mean=config.mean,
                            std=config.std)

        global_views = [crop(config.size, config.scale, blur, solarize)
                        for blur, solarize in zip(config.blur_prob, config.solarize_prob)]
        local = crop(config.local_size, config.local_scale, config.local_blur_prob, config.local_solarize_prob)
        super().__init__([*global_views, *[local] * config.local_crops], config)
        self.global_crops = config.global_crops


@hookimpl
def register_augmentations(register: RegisterAugmentation) -> None:
    register("moco_v2", MoCoV2Augmentation, config=MoCoV2Config)
    register("simclr", SimCLRAugmentation, config=SimCLRConfig)
    register("byol", BYOLAugmentation, config=BYOLConfig)
    register("mae", MAEAugmentation, config=MAEConfig)
    register("swav", MultiCropAugmentation, config=MultiCropConfig)
    register("dino", MultiCropAugmentation, config=DINOMultiCropConfig)
