"""Backbone encoders: torchvision ResNets without their classifier and Vision Transformers made of
torchvision's ViT pieces, randomly initialised (never downloaded).

A ResNet encoder is a plain ``torchvision.models.ResNet`` whose ``fc`` is ``nn.Identity()``, with an extra
``feature_dim`` attribute, so the ``state_dict`` that ``sslcore export`` writes loads strictly into
:func:`plain_torchvision_resnet` — standard torchvision code, no sslcore needed to use the weights. A ViT
encoder has the parameter names of ``torchvision.models.VisionTransformer`` and loads strictly into
:func:`plain_torchvision_vit` the same way.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from sslcore import hookimpl
from sslcore.api.hookspecs import PatchEncoder, RegisterEncoder

if TYPE_CHECKING:  # torchvision is imported where a model is built: ~2 s that `sslcore run`'s driver skips
    from torchvision import models

Arch = Literal["resnet18", "resnet50"]


class ResNetConfig(BaseModel):
    """Parameters of a torchvision ResNet encoder."""

    model_config = ConfigDict(extra="forbid")

    cifar_stem: bool = Field(
        False, description="Replace the 7x7 stride-2 conv1 and the max-pool by a 3x3 stride-1 conv1 and no "
                           "max-pool, for 32 px images (SimCLR's CIFAR-10 ResNet); about 16x the FLOPs.")
    maxpool: bool | None = Field(
        None, description="Keep the max-pool after conv1. Default: yes with the standard stem, no with the "
                          "CIFAR stem. cifar_stem with maxpool gives 16x16 maps in layer1 at 32 px: about a "
                          "quarter of the CIFAR stem's FLOPs, four times the standard stem's.")
    zero_init_residual: bool = Field(
        False, description="Initialise the last BatchNorm of each residual block to zero, so each block "
                           "starts as the identity (Goyal et al. 2017).")

    @classmethod
    def fit_to_images(cls, side: int, current: dict[str, Any]) -> dict[str, Any]:
        """Images of 64 px or less (CIFAR, STL at 64): the CIFAR stem, as the CIFAR recipes of SimCLR, MoCo's
        demo and solo-learn use; the ImageNet stem would bring 32 px down to 8 px before layer1."""
        return {"cifar_stem": True} if side <= 64 and not current["cifar_stem"] else {}


def _use_stem(model: models.ResNet, cifar_stem: bool, maxpool: bool | None) -> None:
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    keep_maxpool = not cifar_stem if maxpool is None else maxpool
    if not keep_maxpool:
        model.maxpool = nn.Identity()


def plain_torchvision_resnet(arch: Arch, cifar_stem: bool, maxpool: bool | None = None) -> nn.Module:
    """The plain torchvision model an exported encoder's ``state_dict`` loads into (strictly)::

        model = torchvision.models.resnet18()      # or resnet50
        model.fc = nn.Identity()
        if cifar_stem:
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()          # unless the encoder had maxpool: true
        model.load_state_dict(torch.load("encoder.pt", weights_only=True))
    """
    from torchvision import models

    model = getattr(models, arch)(weights=None)
    model.fc = nn.Identity()
    _use_stem(model, cifar_stem, maxpool)
    return model


def build_resnet(arch: Arch, config: ResNetConfig) -> models.ResNet:
    """A torchvision ResNet with ``fc = Identity`` and ``feature_dim`` (512 for resnet18, 2048 for resnet50).

    ``forward(x: N x 3 x H x W) -> N x feature_dim``, the globally average-pooled last stage.
    """
    from torchvision import models

    model = getattr(models, arch)(weights=None, zero_init_residual=config.zero_init_residual)
    model.feature_dim = model.fc.in_features
    model.input_size = None  # any image size: the adaptive pooling makes the features
    model.fc = nn.Identity()
    _use_stem(model, config.cifar_stem, config.maxpool)
    return model


def resnet18(config: ResNetConfig) -> models.ResNet:
    """ResNet-18 (He et al. 2016), 512-d features; see :func:`plain_torchvision_resnet`."""
    return build_resnet("resnet18", config)


def resnet50(config: ResNetConfig) -> models.ResNet:
    """ResNet-50 (He et al. 2016), 2048-d features; see :func:`plain_torchvision_resnet`."""
    return build_resnet("resnet50", config)


# -- Vision Transformers ----------------------------------------------------------------------------------

#: width D, depth (blocks) and attention heads of each size: ViT-Ti and ViT-S of DeiT (Touvron et al. 2021),
#: ViT-B of the ViT paper (Dosovitskiy et al. 2021)
VIT_SIZES: dict[str, tuple[int, int, int]] = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),
                                              "vit_base": (768, 12, 12)}


class ViTConfig(BaseModel):
    """Parameters of a Vision Transformer encoder."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(
        32, gt=0, description="Side of the square input images in pixels (32 for CIFAR-10, 224 for ImageNet): "
                              "the encoder accepts this size only, so it must equal the augmentation's size.")
    patch_size: int = Field(
        4, gt=0, description="Side of the square patches in pixels, a divisor of image_size (4 at 32 px, "
                             "16 at 224 px: 64 and 196 patches).")
    position_embedding: Literal["sincos", "learned"] = Field(
        "sincos", description="'sincos': fixed 2-D sine-cosine embeddings, not trained (MAE, MoCo v3); "
                              "'learned': trained, initialised N(0, 0.02^2) (the ViT paper, torchvision).")
    pool: Literal["cls", "mean"] = Field(
        "cls", description="The features forward() returns: the output of the CLS token ('cls') or the mean of "
                           "the outputs of the patch tokens ('mean'), both after the final LayerNorm.")
    depth: int | None = Field(None, ge=1, description="Number of Transformer blocks; default the size's 12. "
                                                      "Fewer for quick tests.")
    dynamic_img_size: bool = Field(
        False, description="Accept any image side that patch_size divides: the patches' position embeddings, made "
                           "for image_size, are interpolated (bicubic) to the image's grid, as DINO's "
                           "interpolate_pos_encoding and timm's dynamic_img_size; for multi-crop (DINO, SwAV). "
                           "False: image_size only.")
    drop_path_rate: float = Field(
        0.0, ge=0, lt=1, description="Stochastic depth (Huang et al. 2016): block i of the n skips its attention "
                                     "and MLP branches for a sample with probability drop_path_rate * i / (n - 1) "
                                     "in training (DINO: 0.1 for ViT-S/16).")

    @classmethod
    def fit_to_images(cls, side: int, current: dict[str, Any]) -> dict[str, Any]:
        """Images smaller than image_size: the images' side (down to a multiple of the patch), with 4 px patches
        at 64 px or less (8 x 8 patches at 32 px, as the CIFAR ViTs of MAE's and MoCo v3's followers)."""
        if side >= current["image_size"]:
            return {}
        patch = 4 if side <= 64 else current["patch_size"]
        return {"image_size": side - side % patch, "patch_size": patch}

    @model_validator(mode="after")
    def _patches_tile_the_image(self) -> ViTConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide image_size {self.image_size}; "
                             f"use a divisor of it (4 at 32 px, 16 at 224 px)")
        return self


def sincos_position_embedding(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings of a grid_size x grid_size grid of patches, in row-major order
    (the order of :meth:`VisionTransformerEncoder.embed_patches`): (grid_size^2) x dim, as MAE's
    ``get_2d_sincos_pos_embed``.

    Channels [0, dim/2) encode the patch's column x and [dim/2, dim) its row y, each as
    [sin(pos omega_0) .. sin(pos omega_{K-1}), cos(pos omega_0) .. cos(pos omega_{K-1})] with K = dim/4 and
    omega_k = 10000^(-k/K).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    k = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(k, dtype=torch.float64) / k)  # K
    y, x = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                          torch.arange(grid_size, dtype=torch.float64), indexing="ij")  # grid_size x grid_size

    def encode(position: torch.Tensor) -> torch.Tensor:  # grid_size x grid_size -> L x dim/2
        angles = position.flatten()[:, None] * omega[None, :]  # L x K
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(x), encode(y)], dim=1).float()  # L x dim


def _encoder_block(heads: int, width: int, drop_path: float) -> nn.Module:
    """torchvision's pre-norm ``EncoderBlock`` (its parameter names), with stochastic depth of rate
    ``drop_path`` on both residual branches (``torchvision.ops.StochasticDepth``, per sample)."""
    from torchvision.models.vision_transformer import EncoderBlock
    from torchvision.ops import StochasticDepth

    class DropPathEncoderBlock(EncoderBlock):
        def __init__(self) -> None:
            super().__init__(heads, width, 4 * width, dropout=0.0, attention_dropout=0.0)
            self.drop_path = StochasticDepth(drop_path, "row")

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            x = self.ln_1(input)
            x, _ = self.self_attention(x, x, x, need_weights=False)
            x = input + self.drop_path(x)
            return x + self.drop_path(self.mlp(self.ln_2(x)))

    return DropPathEncoderBlock()


class VisionTransformerEncoder(nn.Module, PatchEncoder):
    """A Vision Transformer (Dosovitskiy et al. 2021) made of torchvision's pieces: the patch embedding
    ``conv_proj`` (a p x p convolution of stride p), the CLS token ``class_token`` and torchvision's ``Encoder``
    (``encoder.pos_embedding``, the pre-norm blocks ``encoder.layers``, the final LayerNorm ``encoder.ln``),
    with ``feature_dim`` = the width D.

    ``forward(x: N x 3 x image_size x image_size) -> N x D``: the L = (image_size / p)^2 patch embeddings plus
    their position embeddings, the CLS token plus its own (zero for sin-cos) in front, the blocks and the
    final norm; then the CLS token's output (``pool: cls``) or the mean over the patch tokens (``pool: mean``).
    Methods that encode a subset of the patches (MAE) use the pieces: :meth:`embed_patches`,
    :attr:`position_embedding`, :attr:`class_token`, :attr:`blocks`, :attr:`norm`. With ``dynamic_img_size``
    it takes any side that p divides (``input_size`` None), the patch position embeddings interpolated to the
    image's grid (multi-crop: 224 px global and 96 px local crops through one ViT, as DINO's).

    The ``state_dict`` has torchvision's names and loads strictly into :func:`plain_torchvision_vit`; with
    ``pool: cls`` that model computes the same features (with ``pool: mean``, the mean of
    ``model.encoder(tokens)[:, 1:]``). Sin-cos position embeddings are a buffer, which loads into
    torchvision's trained parameter.
    """

    def __init__(self, width: int, depth: int, heads: int, config: ViTConfig) -> None:
        from torchvision.models.vision_transformer import Encoder

        super().__init__()
        p = config.patch_size
        self.image_size, self.patch_size = config.image_size, p
        self.dynamic_img_size = config.dynamic_img_size
        self.input_size = None if config.dynamic_img_size else config.image_size
        self.grid_size = config.image_size // p
        self.num_patches = self.grid_size**2  # L
        self.feature_dim = width
        self.pool = config.pool
        self.conv_proj = nn.Conv2d(3, width, kernel_size=p, stride=p)
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / (3 * p * p)))  # as torchvision's ViT
        nn.init.zeros_(self.conv_proj.bias)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.encoder = Encoder(self.num_patches + 1, depth, heads, width, mlp_dim=4 * width, dropout=0.0,
                               attention_dropout=0.0)
        if config.drop_path_rate > 0:  # the same names (encoder_layer_i), each block with its own rate
            rates = [config.drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
            self.encoder.layers = nn.Sequential(OrderedDict(
                (f"encoder_layer_{i}", _encoder_block(heads, width, rate)) for i, rate in enumerate(rates)))
        if config.position_embedding == "sincos":
            del self.encoder.pos_embedding  # torchvision's learned parameter becomes a fixed buffer
            cls_and_patches = torch.cat([torch.zeros(1, width), sincos_position_embedding(width, self.grid_size)])
            self.encoder.register_buffer("pos_embedding", cls_and_patches[None])  # 1 x (1 + L) x D

    @property
    def position_embedding(self) -> torch.Tensor:
        """1 x (1 + L) x D: row 0 for the CLS token, then the L patches in row-major order."""
        return self.encoder.pos_embedding

    @property
    def blocks(self) -> nn.Sequential:
        """The Transformer blocks (torchvision ``EncoderBlock``s): N x T x D -> N x T x D, any T."""
        return self.encoder.layers

    @property
    def norm(self) -> nn.LayerNorm:
        """The LayerNorm after the last block."""
        return self.encoder.ln

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x 3 x image_size x image_size -> N x L x D, the patch embeddings in row-major order, without
        position embeddings (with ``dynamic_img_size``, N x 3 x H x W, H and W multiples of p: L = HW / p^2)."""
        p = self.patch_size
        if self.dynamic_img_size:
            if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % p or x.shape[3] % p:
                raise ValueError(f"this ViT takes N x 3 x H x W images with H and W multiples of {p}, got "
                                 f"{tuple(x.shape)}")
        elif x.ndim != 4 or tuple(x.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"this ViT takes N x 3 x {self.image_size} x {self.image_size} images, got "
                             f"{tuple(x.shape)}; set the encoder's image_size to the augmentation's size")
        return self.conv_proj(x).flatten(2).transpose(1, 2)  # N x D x h x w -> N x L x D

    def patch_position_embedding(self, height: int, width: int) -> torch.Tensor:
        """1 x (h w) x D: the patches' position embeddings for an h x w grid, interpolated (bicubic, as timm's
        ``resample_abs_pos_embed``) from the image_size grid when it differs."""
        table = self.position_embedding[:, 1:]  # 1 x L x D
        if (height, width) == (self.grid_size, self.grid_size):
            return table
        grid = table.reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)  # 1 x D x g x g
        grid = F.interpolate(grid.float(), size=(height, width), mode="bicubic", antialias=True,
                             align_corners=False).to(table.dtype)
        return grid.permute(0, 2, 3, 1).reshape(1, height * width, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        patches = self.embed_patches(x) + self.patch_position_embedding(*grid)  # N x L x D
        cls = (self.class_token + self.position_embedding[:, :1]).expand(x.shape[0], -1, -1)  # N x 1 x D
        tokens = self.norm(self.blocks(torch.cat([cls, patches], dim=1)))  # N x (1 + L) x D
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)  # N x D


def plain_torchvision_vit(name: str, image_size: int, patch_size: int, depth: int | None = None) -> nn.Module:
    """The plain torchvision model an exported ViT encoder's ``state_dict`` loads into (strictly)::

        model = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=12, num_heads=3,
                                                     hidden_dim=192, mlp_dim=768)  # vit_tiny at 32 px
        model.heads = nn.Identity()
        model.load_state_dict(torch.load("encoder.pt", weights_only=True))
    """
    from torchvision.models import VisionTransformer

    width, default_depth, heads = VIT_SIZES[name]
    model = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=depth or default_depth,
                              num_heads=heads, hidden_dim=width, mlp_dim=4 * width)
    model.heads = nn.Identity()
    return model


def build_vit(name: str, config: ViTConfig) -> VisionTransformerEncoder:
    width, depth, heads = VIT_SIZES[name]
    return VisionTransformerEncoder(width, config.depth or depth, heads, config)


def vit_tiny(config: ViTConfig) -> VisionTransformerEncoder:
    """ViT-Ti: width 192, 12 blocks, 3 heads; see :class:`VisionTransformerEncoder`."""
    return build_vit("vit_tiny", config)


def vit_small(config: ViTConfig) -> VisionTransformerEncoder:
    """ViT-S: width 384, 12 blocks, 6 heads; see :class:`VisionTransformerEncoder`."""
    return build_vit("vit_small", config)


def vit_base(config: ViTConfig) -> VisionTransformerEncoder:
    """ViT-B: width 768, 12 blocks, 12 heads; see :class:`VisionTransformerEncoder`."""
    return build_vit("vit_base", config)


@hookimpl
def register_encoders(register: RegisterEncoder) -> None:
    register("resnet18", resnet18, config=ResNetConfig)
    register("resnet50", resnet50, config=ResNetConfig)
    register("vit_tiny", vit_tiny, config=ViTConfig, provides=VisionTransformerEncoder)
    register("vit_small", vit_small, config=ViTConfig, provides=VisionTransformerEncoder)
    register("vit_base", vit_base, config=ViTConfig, provides=VisionTransformerEncoder)
