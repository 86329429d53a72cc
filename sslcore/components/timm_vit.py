"""timm's ``VisionTransformer`` as a :class:`~sslcore.api.hookspecs.PatchEncoder`, for methods that run a ViT's
pieces on a subset of the patches (MAE). Imported only when a timm ViT is built (:mod:`sslcore.components.
timm_encoders`): importing timm takes about 1.5 s, which a registry load must not pay.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from sslcore.api.hookspecs import PatchEncoder


class TimmVisionTransformer(VisionTransformer, PatchEncoder):
    """timm's ViT with the PatchEncoder pieces under sslcore's names, each one of timm's own: ``class_token`` is
    ``cls_token`` (1 x 1 x D), ``position_embedding`` is ``pos_embed`` (1 x (1 + L) x D, the CLS token's row
    first, for the model's ``img_size``), ``blocks`` and ``norm`` are timm's, and :meth:`embed_patches` is
    ``patch_embed``. It adds no parameter, buffer or module, so its ``state_dict`` is timm's, key for key.

    The timm encoder sets a model's class to this one (timm's entrypoints construct ``VisionTransformer``
    itself) only where these pieces are how the model runs: one CLS token and no register tokens, position
    embeddings that include the CLS token's (not ``no_embed_class``), no norm before the blocks (CLIP's
    ``pre_norm``), square patches and grid (:func:`sslcore.components.timm_encoders.has_patch_pieces`).
    """

    @property
    def patch_size(self) -> int:
        """p: the side of the square patches, in pixels."""
        return self.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> int:
        """Patches per side of an ``img_size`` image."""
        return self.patch_embed.grid_size[0]

    @property
    def num_patches(self) -> int:
        """L = grid_size^2."""
        return self.patch_embed.num_patches

    @property
    def class_token(self) -> torch.Tensor:
        """timm's ``cls_token``: 1 x 1 x D."""
        return self.cls_token

    @property
    def position_embedding(self) -> torch.Tensor:
        """timm's ``pos_embed``: 1 x (1 + L) x D, the CLS token's row, then the patches' in row-major order."""
        return self.pos_embed

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x 3 x img_size x img_size -> N x L x D, ``patch_embed``'s output without position embeddings
        (with ``dynamic_img_size`` timm's patch embedding keeps the grid, N x h x w x D: flattened here)."""
        patches = self.patch_embed(x)
        return patches.flatten(1, 2) if patches.ndim == 4 else patches
