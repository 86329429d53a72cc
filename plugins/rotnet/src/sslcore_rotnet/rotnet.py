"""RotNet: Unsupervised Representation Learning by Predicting Image Rotations (Gidaris, Singh and Komodakis,
ICLR 2018), following the official code, gidariss/FeatureLearningRotNet @
edafaba6561003292017d0a44272414356c959ff (dataloader.py, algorithms/ClassificationModel.py,
architectures/NetworkInNetwork.py, architectures/AlexNet.py).

A ConvNet F learns to tell which of K = 4 geometric transformations g(. | y) was applied to an image X,
the rotations by 0, 90, 180 and 270 degrees:

    X^y = g(X | y) = Rot(X, 90 y),   y = 0, 1, 2, 3

F(X^y) = {F^y'(X^y)} is a distribution over the four rotations (a softmax over 4 logits), and the loss of
image X_i is the cross-entropy of the rotation each copy was given,

    loss(X_i) = -(1/K) sum_y log F^y(g(X_i | y)),

averaged over the N images of the batch. As in the official dataloader, every image of the batch appears
in all four rotations in the same batch (4N images), labelled 0..3; the rotations are counter-clockwise
(the official ``rotate_img``: 90 degrees is ``flipud(transpose(img))``, which is ``torch.rot90`` k=1 over
H, W). F is the backbone f followed by a classifier: NIN's is global average pooling then one Linear
(192 -> 4), AlexNet's a fc block (Linear-BN-ReLU, 4096 wide, twice) then Linear(4096 -> 4). On a ResNet
the classifier is one Linear on the pooled features by default (NIN's), or Linear-BN-ReLU hidden layers
before it (``hidden_dims``, AlexNet's fc block). Only f is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from sslcore.api.hookspecs import Method, Slots
from sslcore.components.augmentations import AreaFraction, OneViewConfig, ViewAugmentation
from sslcore.toolkit.heads import MLPHead

if TYPE_CHECKING:
    from sslcore.engine.context import MethodContext

#: K, the number of rotations: 0, 90, 180 and 270 degrees
NUM_ROTATIONS = 4


def rotate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The four rotations of every image of ``x`` (N x C x S x S): 4N x C x S x S, image i rotated by 90 k
    degrees counter-clockwise in row 4 i + k (the official collate order), and the labels k (4N, long)."""
    rotated = torch.stack([torch.rot90(x, k, dims=(2, 3)) for k in range(NUM_ROTATIONS)], dim=1)  # N x 4 x C x S x S
    labels = torch.arange(NUM_ROTATIONS, device=x.device).repeat(x.shape[0])  # 4N: 0, 1, 2, 3, 0, 1, ...
    return rotated.flatten(0, 1), labels


class RotNetConfig(BaseModel):
    """The ``method: {name: rotnet, ...}`` block."""

    model_config = ConfigDict(extra="forbid")

    hidden_dims: list[PositiveInt] = Field(
        default_factory=list,
        description="Widths of the Linear-BN-ReLU layers between the pooled features and the 4-way Linear. "
                    "[]: one Linear on the pooled features (the official NIN's classifier); [4096, 4096]: the "
                    "official AlexNet's fc block.")


class RotNet(nn.Module, Method):
    """RotNet: the backbone f and a 4-way rotation classifier; see the module docstring.

    ``forward`` takes the augmentation's one view (N images), rotates each four times and classifies the
    4N images as one batch. It returns the cross-entropy under ``loss`` and the fraction of rotations
    predicted right under ``rotation_accuracy``. Each worker averages over its own images (no gathering).
    """

    def __init__(self, config: RotNetConfig, *, context: MethodContext, slots: Slots) -> None:
        super().__init__()
        encoder = slots.build("encoder")
        self.backbone = encoder  # f
        # no bias in a Linear followed by BatchNorm, as the official AlexNet's fc block
        self.classifier = MLPHead([encoder.feature_dim, *config.hidden_dims, NUM_ROTATIONS], hidden_bias=False)

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        images, labels = rotate(views[0])  # X^y: 4N x 3 x S x S, y: 4N
        if views[0].is_contiguous(memory_format=torch.channels_last):  # keep the engine's memory format
            images = images.contiguous(memory_format=torch.channels_last)
        logits = self.classifier(self.backbone(images))  # 4N x 4
        with torch.autocast(logits.device.type, enabled=False):
            loss = F.cross_entropy(logits.float(), labels)  # -(1/4N) sum_i sum_y log F^y(X_i^y)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "rotation_accuracy": accuracy}


class RotNetAugmentationConfig(OneViewConfig):
    """Parameters of the RotNet augmentation: the official ``GenericDataset`` train transforms (the core's
    one-view ``size``, ``scale``, ``mean`` and ``std``; CIFAR-10's mean [125.3, 123.0, 113.9] / 255 and std
    [63.0, 62.1, 66.7] / 255)."""

    size: int = Field(224, gt=0, description="Side of the view and of the eval crop, in pixels (224 on "
                                             "ImageNet, 32 on CIFAR-10).")
    crop: Literal["resized", "padded"] = Field(
        "resized", description="resized: a random resized crop (ImageNet, random_sized_crop: torchvision's "
                               "RandomSizedCrop(224)); padded: zero-pad by `padding` and take a random size x "
                               "size crop (CIFAR-10: RandomCrop(32, padding=4)). A horizontal flip follows.")
    scale: tuple[AreaFraction, AreaFraction] = Field(
        (0.08, 1.0), description="crop resized: range of the crop's area as a fraction of the image.")
    padding: int = Field(4, ge=0, description="crop padded: zero pixels added on each side before the crop.")


class RotNetAugmentation(ViewAugmentation):
    """One view per image, the official train transform: a random crop (resized, or of the zero-padded
    image) and a horizontal flip; the method makes the rotations. ``eval`` and ``labelled`` are the core's
    (resize and center crop, the official val transform ``Scale(256)``, ``CenterCrop(224)``; CIFAR-10 test
    images pass unchanged at 32 px)."""

    def __init__(self, config: RotNetAugmentationConfig) -> None:
        import albumentations as A
        import cv2

        size = config.size
        if config.crop == "resized":
            crop = [A.RandomResizedCrop(size=(size, size), scale=config.scale)]
        else:
            crop = [A.Pad(padding=config.padding, fill=0, border_mode=cv2.BORDER_CONSTANT),
                    A.RandomCrop(height=size, width=size, pad_if_needed=True)]
        transform = A.Compose([*crop, A.HorizontalFlip(p=0.5), A.Normalize(mean=config.mean, std=config.std),
                               A.ToTensorV2()])
        super().__init__([transform], config)
