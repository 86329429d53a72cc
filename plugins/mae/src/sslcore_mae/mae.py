"""MAE: Masked Autoencoders Are Scalable Vision Learners (He, Chen, Xie, Li, Dollar, Girshick; CVPR 2022),
following the official code (facebookresearch/mae, ``models_mae.py``).

An image is cut into L patches of p x p pixels. Per sample, a random subset of L_keep = int(L (1 - r))
patches stays visible (r the mask ratio, 0.75): the patches are sorted by uniform noise and the first L_keep
kept; ``ids_restore``, the inverse permutation, puts a sequence in that shuffled order back in patch order.
The encoder (a ViT, the backbone) embeds the visible patches only, with their position embeddings, behind
the CLS token:

    latent = norm(blocks([cls; x_visible]))                          N x (1 + L_keep) x D

A lightweight decoder maps the latent to its own width D' (Linear), appends one shared learned mask token
per masked patch, unshuffles with ``ids_restore``, adds fixed sin-cos position embeddings, runs its own
Transformer blocks and norm, and predicts the p*p*3 pixel values of every patch. The loss is the mean
squared error over the masked patches only (M: the set of masked (sample, patch) pairs),

    loss = 1/|M| sum_{(i, l) in M} 1/(p*p*3) || pred_il - t_il ||^2

where the target t_il is patch l of image i (pixels as the augmentation normalized them) or, with
``norm_pix_loss`` (the paper's default), that patch normalized by its own mean and unbiased variance,
t = (t - mean(t)) / sqrt(var(t) + 1e-6). Only the encoder is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from sslcore.api.hookspecs import Method, PatchEncoder, Slots
from sslcore.components.encoders import sincos_position_embedding

if TYPE_CHECKING:
    from PIL import Image

    from sslcore.engine.context import MethodContext

NORM_PIX_EPS = 1e-6


class MAEConfig(BaseModel):
    """The ``method: {name: mae, ...}`` block."""

    model_config = ConfigDict(extra="forbid")

    mask_ratio: float = Field(0.75, gt=0, lt=1, description="r, the fraction of the patches removed from each "
                                                            "image (0.75 in the paper)")
    decoder_width: int = Field(512, ge=4, description="D', the decoder's width (official: 512, for ViT-B/L/H; "
                                                      "the CIFAR-10 example's ViT-Tiny: 128); divisible by 4 and "
                                                      "by decoder_heads")
    decoder_depth: int = Field(8, ge=1, description="Transformer blocks of the decoder (official: 8)")
    decoder_heads: int = Field(16, ge=1, description="attention heads of the decoder (official: 16)")
    norm_pix_loss: bool = Field(True, description="targets are each patch's pixels normalized by the patch's mean "
                                                  "and variance (the paper's default); false: the pixels")
    picture_every_epochs: int = Field(10, ge=0, description="write a PNG of originals, masked inputs and "
                                                            "reconstructions before every this many epochs; 0: none")
    picture_images: int = Field(8, ge=1, description="how many images the PNG shows (the first ones of the "
                                                     "training set, under the eval transform)")

    @model_validator(mode="after")
    def _decoder_width_fits(self) -> MAEConfig:
        if self.decoder_width % 4 or self.decoder_width % self.decoder_heads:
            raise ValueError(f"decoder_width {self.decoder_width} must be divisible by 4 (sin-cos position "
                             f"embeddings) and by decoder_heads {self.decoder_heads}")
        return self


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """images: N x 3 x H x W -> N x L x (p*p*3), the patches in row-major order, each patch's pixels in
    (row, column, channel) order, as the official ``patchify``."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // p, p, w // p, p)  # n c h' p w' q
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)  # n (h' w') (p q c)


def unpatchify(patches: torch.Tensor, p: int) -> torch.Tensor:
    """patches: N x L x (p*p*3) of a square image -> N x 3 x H x W, the inverse of :func:`patchify`."""
    n, length, _ = patches.shape
    side = round(length**0.5)  # h' = w'
    x = patches.reshape(n, side, side, p, p, 3)  # n h' w' p q c
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, 3, side * p, side * p)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of L_keep = int(L (1 - mask_ratio)) of each sample's L tokens.

    ``x``: N x L x D; ``noise``: N x L, uniform by default: each sample keeps its L_keep tokens of smallest
    noise, in increasing order of noise. Returns the visible tokens (N x L_keep x D), the mask (N x L, float,
    1 for a removed token, 0 for a kept one, in patch order) and ``ids_restore`` (N x L): a sequence in the
    shuffled order (kept tokens first) gathered at ``ids_restore`` is back in patch order.
    """
    n, length, dim = x.shape
    keep = int(length * (1 - mask_ratio))  # L_keep, as the official code rounds it
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # N x L: ascending, the smallest noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # N x L: each token's place in the shuffled order
    visible = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))  # N x L_keep x D
    mask = (ids_restore >= keep).float()  # N x L: removed iff its place is past the kept ones
    return visible, mask, ids_restore


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                        norm_pix_loss: bool) -> torch.Tensor:
    """The mean over the masked patches of the per-patch mean squared error; see the module docstring.

    ``pred``, ``target``: N x L x P (P = p*p*3 pixel values per patch); ``mask``: N x L, 1 for a masked patch.
    Computed in float32 even under autocast.
    """
    with torch.autocast(pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        if norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)  # N x L x 1
            var = target.var(dim=-1, keepdim=True)  # N x L x 1, unbiased as the official code
            target = (target - mean) / (var + NORM_PIX_EPS).sqrt()
        per_patch = ((pred - target) ** 2).mean(dim=-1)  # N x L
        return (per_patch * mask).sum() / mask.sum()


class MAEDecoder(nn.Module):
    """The decoder: Linear to D', mask tokens, unshuffle, sin-cos position embeddings, torchvision
    ``EncoderBlock``s, LayerNorm and a Linear prediction of each patch's p*p*3 pixel values."""

    def __init__(self, encoder_width: int, grid_size: int, patch_size: int, width: int, depth: int,
                 heads: int) -> None:
        from torchvision.models.vision_transformer import EncoderBlock

        super().__init__()
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        cls_and_patches = torch.cat([torch.zeros(1, width), sincos_position_embedding(width, grid_size)])
        self.register_buffer("position_embedding", cls_and_patches[None])  # 1 x (1 + L) x D', fixed
        self.blocks = nn.Sequential(*(EncoderBlock(heads, width, 4 * width, dropout=0.0, attention_dropout=0.0)
                                      for _ in range(depth)))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pred = nn.Linear(width, patch_size**2 * 3)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: N x (1 + L_keep) x D, the encoder's output; ids_restore: N x L -> N x L x (p*p*3)."""
        x = self.embed(latent)  # N x (1 + L_keep) x D'
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(n, length + 1 - x.shape[1], -1)  # N x (L - L_keep) x D'
        shuffled = torch.cat([x[:, 1:], mask_tokens], dim=1)  # N x L x D', kept tokens first
        patches = torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # in patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.position_embedding  # N x (1 + L) x D'
        return self.pred(self.norm(self.blocks(x)))[:, 1:]  # N x L x (p*p*3), the CLS token dropped


class MAE(nn.Module, Method):
    """MAE: the encoder (``backbone``, a :class:`PatchEncoder`: a ViT) on the visible patches and
    :class:`MAEDecoder`; see the module docstring. Uses views[0], one view per image (the ``mae``
    augmentation)."""

    backbone: PatchEncoder  # the encoder slot needs it (plugin.SLOTS), so validate refuses another encoder

    def __init__(self, config: MAEConfig, *, context: MethodContext, slots: Slots) -> None:
        super().__init__()
        encoder = slots.build("encoder")
        if int(encoder.num_patches * (1 - config.mask_ratio)) < 1:
            raise ValueError(f"mask_ratio {config.mask_ratio} leaves none of the {encoder.num_patches} patches "
                             f"visible; lower it or use a smaller patch_size")
        self.backbone = encoder
        self.decoder = MAEDecoder(encoder.feature_dim, encoder.grid_size, encoder.patch_size, config.decoder_width,
                                  config.decoder_depth, config.decoder_heads)
        self.patch_size = encoder.patch_size  # p
        self.mask_ratio = config.mask_ratio  # r
        self.norm_pix_loss = config.norm_pix_loss
        self.picture_every_epochs = config.picture_every_epochs
        self.picture_images = config.picture_images
        self._pictured: torch.Tensor | None = None  # the images of the PNGs, read once
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The official initialisation of encoder and decoder together: the patch embedding (the encoder's
        convolutions: a ViT has that one) as a Linear (Xavier uniform), the CLS and mask tokens N(0, 0.02^2),
        every Linear Xavier uniform with zero bias, LayerNorms 1 and 0. Learned position embeddings keep the
        encoder's initialisation."""
        for module in self.backbone.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        nn.init.normal_(self.backbone.class_token, std=0.02)
        nn.init.normal_(self.decoder.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):  # also the attention's output projection
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, views: list[torch.Tensor], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        images = views[0]  # N x 3 x H x W
        latent, mask, ids_restore = self.encode_visible(images)
        pred = self.decoder(latent, ids_restore)  # N x L x (p*p*3)
        return {"loss": reconstruction_loss(pred, patchify(images, self.patch_size), mask, self.norm_pix_loss)}

    def encode_visible(self, images: torch.Tensor, noise: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The encoder on a random subset of the patches: the latent (N x (1 + L_keep) x D), the mask (N x L)
        and ids_restore (N x L) of :func:`random_masking`."""
        vit = self.backbone
        x = vit.embed_patches(images) + vit.position_embedding[:, 1:]  # N x L x D
        x, mask, ids_restore = random_masking(x, self.mask_ratio, noise)  # N x L_keep x D
        cls = (vit.class_token + vit.position_embedding[:, :1]).expand(x.shape[0], -1, -1)  # N x 1 x D
        return vit.norm(vit.blocks(torch.cat([cls, x], dim=1))), mask, ids_restore

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reconstruction of ``images`` (N x 3 x H x W) with the visible patches pasted back, and the mask
        (N x L). With ``norm_pix_loss`` the prediction of a patch is de-normalized with the true patch's mean
        and variance, which the model is not asked to predict."""
        latent, mask, ids_restore = self.encode_visible(images, noise)
        pred = self.decoder(latent, ids_restore).float()  # N x L x (p*p*3)
        target = patchify(images.float(), self.patch_size)
        if self.norm_pix_loss:
            pred = pred * (target.var(dim=-1, keepdim=True) + NORM_PIX_EPS).sqrt() + target.mean(dim=-1, keepdim=True)
        pasted = torch.where(mask[..., None].bool(), pred, target)
        return unpatchify(pasted, self.patch_size), mask

    def on_epoch_start(self, epoch: int, context: MethodContext) -> dict[str, Image.Image] | None:
        """Before every ``picture_every_epochs``-th epoch (the first too), rank 0 writes
        ``reconstructions_epoch{epoch:03d}.png`` to the run folder (the model after ``epoch`` epochs) and
        returns it for aim."""
        every = self.picture_every_epochs
        if not every or epoch % every:
            return None
        return self.write_reconstructions(context, epoch)

    def on_train_end(self, context: MethodContext) -> dict[str, Image.Image] | None:
        """After the last epoch, the same picture of the trained model."""
        return self.write_reconstructions(context, context.epochs) if self.picture_every_epochs else None

    def write_reconstructions(self, context: MethodContext, epoch: int) -> dict[str, Image.Image] | None:
        """On rank 0: a PNG of the first ``picture_images`` training images under the eval transform: originals,
        masked inputs (masked patches grey) and reconstructions, one row each; the same masks every time."""
        if context.rank != 0 or context.run_dir is None or context.eval_context is None:
            return None
        if self._pictured is None:
            dataset = context.eval_context.dataset()
            self._pictured = torch.stack([dataset[i][0] for i in range(min(self.picture_images, len(dataset)))])
        images = self._pictured.to(context.device)
        noise = torch.rand(images.shape[0], self.backbone.num_patches, generator=torch.Generator().manual_seed(0))
        reconstruction, mask = self.reconstruct(images, noise.to(context.device))
        picture = picture_grid(images.float().cpu(), reconstruction.cpu(), mask.cpu(), self.patch_size)
        picture.save(Path(context.run_dir) / f"reconstructions_epoch{epoch:03d}.png")
        return {"reconstructions": picture}


def picture_grid(images: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor, p: int) -> Image.Image:
    """Three rows of N cells: ``images`` (N x 3 x S x S, normalized), the masked inputs and ``reconstruction``.

    The method does not know the augmentation's mean and std, so each image's channels are stretched to
    [0, 1] by the original's minimum and maximum, and its reconstruction by the same map. Cells are enlarged
    to at least 128 px by an integer factor (nearest), so patches stay sharp. The cells are laid out by
    torchvision's ``make_grid``; its own ``normalize`` is not this stretch (one range per image over all its
    channels, and the reconstruction by its own).
    """
    from PIL import Image
    from torchvision.utils import make_grid

    low = images.amin(dim=(2, 3), keepdim=True)  # N x 3 x 1 x 1
    span = (images.amax(dim=(2, 3), keepdim=True) - low).clamp(min=1e-6)
    original = (images - low) / span
    side = images.shape[-1] // p
    masked_pixels = mask.reshape(-1, 1, side, side).repeat_interleave(p, 2).repeat_interleave(p, 3).bool()
    masked = original.masked_fill(masked_pixels, 0.5)  # N x 3 x S x S
    rows = [original, masked, ((reconstruction - low) / span).clamp(0, 1)]
    factor = max(1, 128 // images.shape[-1])
    grid = make_grid(torch.cat(rows), nrow=images.shape[0], padding=0)  # 3 x 3S x NS
    grid = grid.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
    return Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy())
